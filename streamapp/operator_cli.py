"""Operator commands of the ``streamapp`` console script (quota, shed, project, status)."""

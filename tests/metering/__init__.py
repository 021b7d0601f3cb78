"""Tests of the metering domain (streamapp.metering, the meter agent, its tables and metrics)."""

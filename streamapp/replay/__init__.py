"""``streamapp replay``: the 2019 incident replayed on demand, unprotected and protected side by side.

scenario (parameters, spike sized from the measured capacity) · stack (where an arm runs) ·
traffic (the load generator process) · measure (S3 and shed watchers) · analysis (figures and
series) · report (table, plots, HTML) · command (the CLI and the phases).
"""

"""``streamapp replay``: the 2019 incident replayed on demand, unprotected and protected side by side.

scenario (parameters, spike sized from the measured capacity) · stack (where an arm runs) ·
traffic (the load generator process) · measure (S3 and shed watchers) · analysis (figures and
series) · report (table, plots, HTML) · arm (one arm's phases) · command (the CLI, both arms).

This package imports nothing on purpose: the traffic generator runs in a spawned process that
imports it, and must be sending within the second the command gives it. The ``streamapp replay``
command imports :mod:`streamapp.replay.command` itself.
"""

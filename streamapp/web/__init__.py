"""The HTTP edge's plumbing, shared by every domain's views: who may read or write (``auth``),
the other workers of the cluster and fan-out to them (``cluster``), the read views' base class
and query parsing (``read_view``), and the worker-wide pages (``health``, ``metrics_view``,
``dashboard``). The routes themselves are mounted by ``streamapp.wiring.register_routes``.
``client`` is the other side: calls to a running worker from outside it (the CLI, the replay).
"""

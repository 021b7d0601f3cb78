"""Faust tables of the app (RocksDB, changelogged), one module per domain with its row codecs:
``meter`` (the meter's rate rings and shed states)."""

"""Faust tables of the app (RocksDB, changelogged)."""

"""The Keen-compatible write API (split by concern in the next step)."""

"""The device tier: the LiteRT model served on the board (shared/tier_process.py)."""

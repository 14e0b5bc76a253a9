"""The cloud tier: a thin process around the shared engine and servicer (shared/tier_process.py)."""

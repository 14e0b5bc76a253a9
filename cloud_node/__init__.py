"""The cloud tier: the full-precision teacher, run by PyTorch (engine.py), as a process (process.py)."""

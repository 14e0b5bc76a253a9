"""Backends of the shared engine interface: torch (cloud), onnxruntime (edge), LiteRT (device)."""

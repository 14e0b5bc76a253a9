"""The edge tier: the distilled student, int8-quantized, run by ONNX Runtime (engine.py), as a process (process.py)."""

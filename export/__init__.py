"""GPT-2 -> ONNX exporter with per-layer KV-cache I/O. Run from the checkout: `python -m export`."""

"""Benchmarks against raw ONNX Runtime, measured in the same run."""

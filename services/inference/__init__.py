"""Inference worker: pulls requests from Redis Streams, runs ONNX Runtime, writes replies."""

"""Integration tests: real Redis, real gRPC servers, real processes."""

"""Gateway: the public KServe v2 gRPC endpoint; validates, enqueues, awaits replies."""

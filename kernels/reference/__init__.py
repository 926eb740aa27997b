"""Plain-PyTorch references of every kernel, used by tests and benchmarks alike."""

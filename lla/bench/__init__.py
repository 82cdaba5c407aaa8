"""Memory accounting and benchmarking."""

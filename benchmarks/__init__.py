"""Latency and throughput benchmarks of skingpt4-serve against the original pipeline."""

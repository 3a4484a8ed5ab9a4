"""Helpers of benchmarks/grpc_bench.py (the echo ceiling server)."""

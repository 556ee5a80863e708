"""Baseline servers the benchmarks compare kubeinfer against, run side by side."""

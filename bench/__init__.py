"""Benchmarks: scripts that print tables comparing kubeinfer with named baselines."""

"""Benchmark applications: the same logic served through every server's interface."""

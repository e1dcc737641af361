"""Experiment and benchmark scripts; each writes its results into a section of docs/benchmarks.md."""

"""Benchmarks of the library against references and of its stages against the engine alone."""

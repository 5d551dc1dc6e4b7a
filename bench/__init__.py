"""Training-free benchmarking of frozen foundation models."""

from bench.errors import BenchError

__version__ = "0.1.0"
__all__ = ["BenchError", "__version__"]

"""The set-based weight encoder (SNE): chunked weights (``chunking``), set layers (``sets``), the
encoder (``sne``), its Lightning fit and checkpoint (``training``), the StatNN and flattened-weights
baselines, scoring and the side-by-side evaluation; ``bench weights`` fits and applies it."""

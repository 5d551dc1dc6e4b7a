"""Embedding extraction (Trainer.predict) and the embedding cache."""

from bench.extract.cache import CacheEntry, EmbeddingCache, cache_key, open_entry
from bench.extract.extractor import EmbeddingExtractor, ShardWriter, entry_fields, extract

__all__ = ["CacheEntry", "EmbeddingCache", "EmbeddingExtractor", "ShardWriter", "cache_key", "entry_fields", "extract",
           "open_entry"]

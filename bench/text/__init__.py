"""Class text embeddings for zero-shot heads: prompt templates (:mod:`bench.text.templates`) and
cached per-class embeddings from a backbone's text tower (:mod:`bench.text.cache`)."""

from bench.text.cache import TextCache, class_text_embeddings, zeroshot_weights
from bench.text.templates import prompts, templates_for

__all__ = ["TextCache", "class_text_embeddings", "prompts", "templates_for", "zeroshot_weights"]

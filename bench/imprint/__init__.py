"""The imprinting method space: NORM_pre -> GEN -> NORM_post, NORM_inf, AGG.

Importing the package registers the built-in methods (``norm``, ``gen`` and ``agg`` register
themselves); :mod:`bench.imprint.registry` holds the registries and the decorators a user's
own methods use.
"""

from bench.imprint import agg, gen, norm, probes, text_heads  # noqa: F401  (register the built-in methods)
from bench.imprint.grid import build_head, build_head_grid, build_heads, score_heads
from bench.imprint.head import ImprintedHead, check_embeddings
from bench.imprint.presets import PRESET_TABLE, PRESETS, Grid, expand_grid, resolve
from bench.imprint.registry import Option, register_agg, register_gen, register_norm
from bench.imprint.spec import MethodSpec, StageSpec
from bench.imprint.support import Reference, SupportSet

__all__ = [
    "PRESETS",
    "PRESET_TABLE",
    "Grid",
    "ImprintedHead",
    "MethodSpec",
    "Option",
    "Reference",
    "StageSpec",
    "SupportSet",
    "build_head",
    "build_head_grid",
    "build_heads",
    "check_embeddings",
    "expand_grid",
    "register_agg",
    "register_gen",
    "register_norm",
    "resolve",
    "score_heads",
]

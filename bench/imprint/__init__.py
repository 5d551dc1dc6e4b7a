"""The imprinting method space: NORM_pre -> GEN -> NORM_post, NORM_inf, AGG."""

from bench.imprint.bank import build_head_grid, build_heads, score_heads
from bench.imprint.head import ImprintedHead, SupportSet, check_embeddings
from bench.imprint.presets import PRESETS, Grid, expand_grid, resolve
from bench.imprint.spec import MethodSpec, StageSpec

__all__ = [
    "PRESETS",
    "Grid",
    "ImprintedHead",
    "MethodSpec",
    "StageSpec",
    "SupportSet",
    "build_head_grid",
    "build_heads",
    "check_embeddings",
    "expand_grid",
    "resolve",
    "score_heads",
]

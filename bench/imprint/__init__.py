"""The imprinting method space: NORM_pre -> GEN -> NORM_post, NORM_inf, AGG."""

from bench.imprint.head import ImprintedHead, check_embeddings
from bench.imprint.presets import PRESETS, Grid, expand_grid, resolve
from bench.imprint.spec import MethodSpec, StageSpec

__all__ = [
    "PRESETS",
    "Grid",
    "ImprintedHead",
    "MethodSpec",
    "StageSpec",
    "check_embeddings",
    "expand_grid",
    "resolve",
]

"""Why a head works: neural collapse, CDNV, geometric complexity, transferability, CKA."""

from bench.diagnostics.collapse import (
    ClassStatistics,
    NearestCentreAgreement,
    etf,
    nc3_self_duality,
    neural_collapse,
)
from bench.diagnostics.geometry import exact_jacobian_sq_norm, geometric_complexity, jacobian_sq_norms
from bench.diagnostics.transferability import h_score, linear_cka, log_evidence, logme, ncc_accuracy, ncti_scores

__all__ = [
    "ClassStatistics", "NearestCentreAgreement", "etf", "exact_jacobian_sq_norm", "geometric_complexity",
    "h_score", "jacobian_sq_norms", "linear_cka", "log_evidence", "logme", "nc3_self_duality",
    "ncc_accuracy", "ncti_scores", "neural_collapse",
]

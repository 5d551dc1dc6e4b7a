"""Feature collapse of local (token-level) features grouped by a role label.

Token embeddings are grouped by their role (e.g. the concept a word stands for) and measured
with the same statistics as neural collapse: NC1 and CDNV of the roles, and the spectrum of the
centred role means (normalised singular values; a collapsed, well-spread set of roles has as
many comparable values as roles minus one).
"""

from __future__ import annotations

from typing import Any

import torch

from bench.diagnostics.collapse import ClassStatistics


class RoleCollapse(ClassStatistics):
    """ClassStatistics over tokens: ``update(tokens (N, D), roles (N,))``, merged across ranks.

    ``compute`` adds the spectrum of the centred role means to the neural-collapse measures.
    """

    def compute(self) -> dict[str, Any]:
        out = super().compute()
        counts, means, _, _ = self.merged()
        means = means[counts > 0]
        s = torch.linalg.svdvals(means - means.mean(0))
        out["role_mean_spectrum"] = (s / s.max()).tolist() if s.max() > 0 else s.tolist()
        out["role_effective_rank"] = float(torch.exp(-(p := s / s.sum()).mul(torch.log(p + 1e-300)).sum()))
        return out


def feature_collapse(tokens: torch.Tensor, roles: torch.Tensor) -> dict[str, Any]:
    classes, target = torch.unique(roles, return_inverse=True)
    metric = RoleCollapse(len(classes), tokens.shape[1])
    metric.update(tokens, target)
    return metric.compute()

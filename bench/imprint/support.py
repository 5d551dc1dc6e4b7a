"""The tensors a head is built from: one episode's support set, and reference statistics.

``bench.data.episodes.Episode`` says *which* samples an episode uses (indices); a
:class:`SupportSet` holds *their embeddings* (tensors), which is all the method space sees.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bench.errors import BenchError


@dataclass
class Reference:
    """Statistics of reference classes (e.g. a suite's base classes) that some methods read:
    ``mean`` centres center-l2; ``class_means`` and ``class_factors`` (F with F^T F the class
    covariance) let Distribution Calibration borrow the spread of the nearest classes."""

    mean: torch.Tensor  # (D,)
    class_means: torch.Tensor | None = None  # (B, D)
    class_factors: list[torch.Tensor] | None = None  # B tensors of shape (r_b, D)

    @classmethod
    def from_embeddings(cls, embeddings: torch.Tensor, labels: torch.Tensor, *,
                        class_statistics: bool = True) -> Reference:
        """The mean of all rows and, if asked, each class's mean and covariance factor.

        A factor is the smaller of the centred samples / sqrt(n - 1) (n rows) and the covariance's
        own square root from its eigendecomposition (D rows), so a few-sample class costs little
        and a large class costs a D x D matrix.
        """
        x = embeddings.double()
        if x.ndim != 2 or len(x) == 0:
            raise BenchError("reference embeddings must be a non-empty (samples, dim) tensor")
        mean = x.mean(0)
        if not class_statistics:
            return cls(mean.to(embeddings.dtype))
        means, factors = [], []
        for c in torch.unique(labels):
            xc = x[labels == c]
            mu = xc.mean(0)
            centred = xc - mu
            if len(xc) < 2:
                raise BenchError(f"reference class {int(c)} has one sample; class statistics need 2 or more")
            if len(xc) <= x.shape[1]:
                factor = centred / (len(xc) - 1) ** 0.5
            else:
                vals, vecs = torch.linalg.eigh(centred.T @ centred / (len(xc) - 1))
                factor = (vecs * vals.clamp_min(0).sqrt()).T
            means.append(mu)
            factors.append(factor.to(embeddings.dtype))
        return cls(mean.to(embeddings.dtype), torch.stack(means).to(embeddings.dtype), factors)

    def to(self, like: torch.Tensor) -> Reference:
        """On ``like``'s device and dtype."""
        return Reference(
            self.mean.to(like),
            None if self.class_means is None else self.class_means.to(like),
            None if self.class_factors is None else [f.to(like) for f in self.class_factors],
        )


@dataclass
class SupportSet:
    """One episode's support: what its heads are imprinted from.

    ``reference`` is either a :class:`Reference` or, for convenience, just a reference mean
    (a (D,) tensor) for center-l2. ``classes`` fixes the head's classes (default: the labels').
    """

    embeddings: torch.Tensor
    labels: torch.Tensor
    seed: int = 0
    classes: torch.Tensor | None = None
    reference: Reference | torch.Tensor | None = None
    # (embeddings, labels) of the episode's validation samples (disjoint from support and queries)
    validation: tuple[torch.Tensor, torch.Tensor] | None = None
    # (C, D) text embeddings of the head's classes in sorted class order, for GENs that need text
    text: torch.Tensor | None = None

    @property
    def reference_stats(self) -> Reference | None:
        if self.reference is None or isinstance(self.reference, Reference):
            return self.reference
        return Reference(self.reference)

"""StatNN (Unterthiner et al. 2020): statistics of the weights, fed to a regressor.

For each layer: mean, variance and the 0, 25, 50, 75 and 100% quantiles of its weights and of
its biases. Unterthiner et al. concatenate these per layer for one fixed architecture; for a
zoo of mixed architectures the layers go into four slots so every network has the same
features: the first weight layer, the hidden weight layers (their values pooled), the last
weight layer, and the batch-norm layers (gamma as weights, beta as biases, pooled), each with a
flag saying whether the slot is present, plus the number of weight layers and log10 of the
number of parameters. On the fixed architecture of the zoo (conv2) the slots are exactly its
layers, as in the paper.

Heads: the proxies are one weight matrix, so the same statistics of its values, of its rows'
norms and of the cosines between class means, plus the number of classes, the proxies per class
and the dimension.

Regressors: gradient-boosted trees (scikit-learn's HistGradientBoostingRegressor) or an MLP
(scikit-learn's MLPRegressor on standardised features).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from bench.errors import BenchError
from bench.weightspace.encoder.chunking import head_class_positions
from bench.weightspace.zoo.architectures import WEIGHT_KINDS, Layer
from bench.weightspace.zoo.heads import HeadWeights

QUANTILES = (0.0, 0.25, 0.5, 0.75, 1.0)
STAT_NAMES = ("mean", "var") + tuple(f"q{int(q * 100)}" for q in QUANTILES)
NETWORK_SLOTS = ("first", "hidden", "last", "bn")
REGRESSORS = ("gbt", "mlp")


def tensor_stats(values: torch.Tensor) -> torch.Tensor:
    """mean, variance (unbiased) and the quantiles of a tensor's values, in float64."""
    v = values.detach().reshape(-1).double()
    if v.numel() == 0:
        return torch.zeros(len(STAT_NAMES), dtype=torch.float64)
    var = v.var() if v.numel() > 1 else v.new_zeros(())
    return torch.cat([v.mean()[None], var[None], torch.quantile(v, torch.tensor(QUANTILES, dtype=torch.float64))])


def network_feature_names() -> list[str]:
    names = []
    for slot in NETWORK_SLOTS:
        names.append(f"{slot}.present")
        names += [f"{slot}.weight.{s}" for s in STAT_NAMES] + [f"{slot}.bias.{s}" for s in STAT_NAMES]
    return names + ["num_weight_layers", "log10_params"]


def network_features(layers: Sequence[Layer]) -> torch.Tensor:
    weight_layers = [layer for layer in layers if layer.kind in WEIGHT_KINDS]
    if not weight_layers:
        raise BenchError("StatNN needs at least one conv or linear layer")
    bn = [layer for layer in layers if layer.kind == "bn"]
    slots = {
        "first": weight_layers[:1],
        "hidden": weight_layers[1:-1],
        "last": weight_layers[-1:] if len(weight_layers) > 1 else [],
    }
    feats = []
    for name in ("first", "hidden", "last"):
        group = slots[name]
        feats.append(torch.tensor([float(bool(group))], dtype=torch.float64))
        feats.append(tensor_stats(torch.cat([g.weight.reshape(-1) for g in group])) if group
                     else torch.zeros(len(STAT_NAMES), dtype=torch.float64))
        feats.append(tensor_stats(torch.cat([g.bias.reshape(-1) for g in group])) if group
                     else torch.zeros(len(STAT_NAMES), dtype=torch.float64))
    feats.append(torch.tensor([float(bool(bn))], dtype=torch.float64))
    feats.append(tensor_stats(torch.cat([b.weight[:, 0] for b in bn])) if bn
                 else torch.zeros(len(STAT_NAMES), dtype=torch.float64))
    feats.append(tensor_stats(torch.cat([b.weight[:, 1] for b in bn])) if bn
                 else torch.zeros(len(STAT_NAMES), dtype=torch.float64))
    n_params = sum(g.weight.numel() + g.bias.numel() for g in weight_layers) + sum(2 * b.out_units for b in bn)
    feats.append(torch.tensor([float(len(weight_layers)), math.log10(n_params)], dtype=torch.float64))
    return torch.cat(feats)


def head_features(head: HeadWeights) -> torch.Tensor:
    p = head.proxies.double()
    cls = head_class_positions(head.proxy_labels, head.classes)
    c = len(head.classes)
    means = torch.zeros(c, p.shape[1], dtype=torch.float64).index_add_(0, cls, p)
    means = means / torch.bincount(cls, minlength=c).clamp_min(1)[:, None]
    unit = means / means.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos = unit @ unit.T
    off = cos[~torch.eye(c, dtype=torch.bool)] if c > 1 else cos.reshape(-1)
    return torch.cat([tensor_stats(p), tensor_stats(p.norm(dim=1)), tensor_stats(off),
                      torch.tensor([float(c), len(p) / c, float(p.shape[1])], dtype=torch.float64)])


def features(items: Sequence) -> np.ndarray:
    """One row of StatNN features per network (a list of layers) or head (HeadWeights)."""
    rows = [head_features(it) if isinstance(it, HeadWeights) else network_features(it) for it in items]
    return torch.stack(rows).numpy()


class StatNN:
    """StatNN features and a regressor: ``fit(items, y)``, ``predict(items)``."""

    def __init__(self, regressor: str = "gbt", seed: int = 0) -> None:
        if regressor not in REGRESSORS:
            raise BenchError(f"StatNN regressor '{regressor}' is not one of {REGRESSORS}")
        self.regressor, self.seed = regressor, seed
        self.model = None

    @property
    def name(self) -> str:
        return f"statnn-{self.regressor}"

    def _make(self):
        if self.regressor == "gbt":
            from sklearn.ensemble import HistGradientBoostingRegressor

            return HistGradientBoostingRegressor(max_iter=300, learning_rate=0.05, min_samples_leaf=8,
                                                 random_state=self.seed)
        from sklearn.neural_network import MLPRegressor
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        return make_pipeline(StandardScaler(), MLPRegressor(hidden_layer_sizes=(64, 64), alpha=1e-3, max_iter=3000,
                                                            random_state=self.seed))

    def fit(self, items: Sequence, y) -> StatNN:
        self.model = self._make().fit(features(items), np.asarray(y, dtype=np.float64))
        return self

    def predict(self, items: Sequence) -> np.ndarray:
        if self.model is None:
            raise BenchError("StatNN.predict before fit")
        return self.model.predict(features(items))

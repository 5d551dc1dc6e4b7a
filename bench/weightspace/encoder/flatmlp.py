"""The flattened-weights MLP baseline: every parameter of a network, in layer order, as one
vector, standardised, into an MLP. It only makes sense when all networks share one
architecture (the vector's i-th entry must mean the same weight in every network), so fitting
or predicting on mixed shapes is an error."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from bench.errors import BenchError
from bench.weightspace.zoo.architectures import Layer


def flatten_layers(layers: Sequence[Layer]) -> torch.Tensor:
    parts = []
    for layer in layers:
        parts.append(layer.weight.reshape(-1))
        if layer.bias is not None:
            parts.append(layer.bias.reshape(-1))
    return torch.cat(parts).double()


def layout(layers: Sequence[Layer]) -> tuple:
    return tuple((layer.kind, tuple(layer.weight.shape)) for layer in layers)


class FlatMLP:
    name = "flat-mlp"

    def __init__(self, seed: int = 0, hidden: tuple[int, ...] = (64, 64)) -> None:
        self.seed, self.hidden = seed, hidden
        self.model = None
        self.layout: tuple | None = None

    def _matrix(self, items: Sequence[Sequence[Layer]]) -> np.ndarray:
        for i, layers in enumerate(items):
            if layout(layers) != self.layout:
                raise BenchError(
                    f"network {i} has layers {layout(layers)}, not the fixed architecture {self.layout}; "
                    "the flattened-weights MLP only reads one architecture (select the zoo's fixed-arch subset)")
        return torch.stack([flatten_layers(layers) for layers in items]).numpy()

    def fit(self, items: Sequence[Sequence[Layer]], y) -> FlatMLP:
        from sklearn.neural_network import MLPRegressor
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        if not items:
            raise BenchError("the flattened-weights MLP needs at least one network to fit")
        self.layout = layout(items[0])
        self.model = make_pipeline(StandardScaler(), MLPRegressor(hidden_layer_sizes=self.hidden, alpha=1e-2,
                                                                  max_iter=3000,
                                                                  random_state=self.seed))
        self.model.fit(self._matrix(items), np.asarray(y, dtype=np.float64))
        return self

    def predict(self, items: Sequence[Sequence[Layer]]) -> np.ndarray:
        if self.model is None:
            raise BenchError("FlatMLP.predict before fit")
        return self.model.predict(self._matrix(items))

"""``bench weights fit``'s config: what the encoder reads, its architecture, how it trains, where
the checkpoint goes.

Written in the style of the run config (``bench.config``): every key typed, loaded from a YAML
file plus ``key=value`` overrides by ``bench.config.load_config``, a bad value stopped with one
line. A fit saves its resolved config as ``config.yaml`` in the checkpoint folder, so
``bench weights fit -c <checkpoint>/config.yaml`` replays it.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, NonNegativeInt, PositiveInt, StrictBool, field_validator, model_validator

from bench.config import Section, WandbConfig, _desc
from bench.weightspace.encoder.sne import SNEConfig


class EncoderFitConfig(Section):
    zoo: Annotated[str | None, _desc("a network zoo folder, or null")] = None
    heads: Annotated[list[str], _desc("a list of run folders with saved heads (`bench run ... save_heads=true`)")] = []
    families: Annotated[list[str], _desc("a list of architecture families to keep, e.g. [conv2, mlp1] "
                                         "(network zoos only; empty: all)")] = []
    out: Annotated[str | None, _desc("the checkpoint folder")] = None
    model: SNEConfig = SNEConfig()
    epochs: Annotated[PositiveInt, _desc("a positive int")] = 60
    batch_size: Annotated[PositiveInt, _desc("a positive int")] = 16
    lr: Annotated[float, Field(gt=0, allow_inf_nan=False, description="a finite number > 0")] = 2e-3
    weight_decay: Annotated[float, Field(ge=0, allow_inf_nan=False, description="a finite number >= 0")] = 1e-4
    invariance: Annotated[float, Field(ge=0, allow_inf_nan=False, description=(
        "a finite number >= 0 (logit-invariance strength; 0: off)"))] = 0.0
    augment: Annotated[float, Field(ge=0, le=1, description=(
        "a probability in [0, 1] that a drawn training network is a hidden-unit permuted copy (0: off)"))] = 0.0
    seed: Annotated[NonNegativeInt, _desc("an int >= 0")] = 0
    wandb: WandbConfig = WandbConfig()
    progress: Annotated[StrictBool, _desc("true or false")] = True

    @field_validator("heads", "families", mode="before")
    @classmethod
    def _as_list(cls, value: Any) -> Any:
        """One run folder as text is a list of one; families may be comma-separated text."""
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()] if value else []
        return value

    @model_validator(mode="before")
    @classmethod
    def _kind_from_source(cls, value: Any) -> Any:
        """The encoder reads what the source holds: networks of a zoo, or heads."""
        if not isinstance(value, dict) or bool(value.get("zoo")) == bool(value.get("heads")):
            return value  # no source, or two: the check after says so
        kind = "head" if value.get("heads") else "network"
        model = value.get("model") or {}
        model = model.model_dump() if isinstance(model, SNEConfig) else model
        if not isinstance(model, dict):
            return value  # not a section: the field's own check reports it
        if model.get("kind", kind) != kind:
            raise ValueError(f"model.kind is '{model['kind']}' but the source holds {kind}s; leave model.kind out")
        return {**value, "model": {**model, "kind": kind}}

    @model_validator(mode="after")
    def _one_source(self) -> EncoderFitConfig:
        if self.zoo is not None and self.heads:
            raise ValueError("give zoo or heads, not both")
        if self.families and self.heads:
            raise ValueError("families applies to network zoos, not heads")
        return self

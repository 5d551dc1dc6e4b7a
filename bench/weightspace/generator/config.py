"""``bench generator fit``'s config: the meta-training data, the model's sizes, the two stages'
training, where the checkpoint goes.

Written in the style of the run config (``bench.config``): every key typed, loaded from a YAML
file plus ``key=value`` overrides by ``bench.config.load_config``, a bad value stopped with one
line. A fit saves its resolved config as ``config.yaml`` in the checkpoint folder, so
``bench generator fit -c <checkpoint>/config.yaml out=<new folder>`` replays it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Field, NonNegativeInt, PositiveInt, StrictBool, field_validator, model_validator

from bench.config import Section, WandbConfig, _desc

DEFAULT_SOURCES = ["digits", "gmm:a"]
DEFAULT_TASKS = [400, 3000]  # meta-training tasks per default source; other sources get the first
ClassList = Annotated[Union[str, list[int]], _desc("a class list, e.g. 0-4,7 or [0, 1, 2]")]


class GeneratorWandbConfig(WandbConfig):
    project: Annotated[str, _desc("a W&B project name")] = "bench-generator"


class GeneratorFitConfig(Section):
    out: Annotated[str, _desc("the checkpoint folder")] = "runs/generator/d2nwg"
    sources: Annotated[list[str], _desc("a list of meta-task sources: digits, cache:<entry folder>, "
                                        "gmm:<family>")] = list(DEFAULT_SOURCES)
    tasks: Annotated[list[PositiveInt], _desc("a list of positive ints, one per source (meta-training tasks)")] = \
        list(DEFAULT_TASKS)
    train_classes: Annotated[dict[str, ClassList], _desc(
        "a mapping dataset -> meta-train classes, e.g. {digits: 0-4} (default: digits 0-4, gmm 0-1999)")] = {}
    test_classes: Annotated[dict[str, ClassList], _desc(
        "a mapping dataset -> meta-test classes, never used in training, e.g. {digits: 5-9}")] = {}
    ways: Annotated[tuple[PositiveInt, PositiveInt], _desc("[MIN, MAX] classes per meta-training task")] = (2, 10)
    per_class: Annotated[tuple[PositiveInt, PositiveInt], _desc(
        "[MIN, MAX] pool size per class of a meta-training task (the trained head sees all of it)")] = (40, 100)
    shots: Annotated[list[PositiveInt], _desc("a list of positive ints (support sizes drawn in training)")] = \
        [1, 2, 5, 10, 20]
    norm: Annotated[Literal["l2", "none"], _desc("l2 or none")] = "l2"
    dim: Annotated[PositiveInt, _desc("a positive int (procedural sources' width when no cached source "
                                      "fixes it)")] = 64
    latent: Annotated[PositiveInt, _desc("a positive int")] = 32
    vae_hidden: Annotated[PositiveInt, _desc("a positive int")] = 256
    vae_depth: Annotated[PositiveInt, _desc("a positive int")] = 2
    width: Annotated[PositiveInt, _desc("a positive int")] = 128
    set_width: Annotated[PositiveInt, _desc("a positive int")] = 64
    heads: Annotated[PositiveInt, _desc("a positive int (attention heads)")] = 4
    set_layers: Annotated[PositiveInt, _desc("a positive int")] = 2
    class_layers: Annotated[PositiveInt, _desc("a positive int")] = 3
    vae_steps: Annotated[PositiveInt, _desc("a positive int")] = 2000
    diffusion_steps: Annotated[PositiveInt, _desc("a positive int")] = 4000
    batch_size: Annotated[PositiveInt, _desc("a positive int (tasks per diffusion step)")] = 32
    noise_levels: Annotated[PositiveInt, _desc("a positive int (timesteps drawn per support draw)")] = 4
    prediction: Annotated[Literal["epsilon", "sample", "v_prediction"],
                          _desc("what the denoiser predicts: epsilon, sample or v_prediction")] = "v_prediction"
    lr: Annotated[float, Field(gt=0, allow_inf_nan=False, description="a finite number > 0")] = 1e-3
    kl_weight: Annotated[float, Field(ge=0, allow_inf_nan=False, description="a finite number >= 0")] = 1e-3
    seed: Annotated[NonNegativeInt, _desc("an int >= 0")] = 0
    val_tasks: Annotated[float, Field(ge=0, lt=1, description="a share in [0, 1) of tasks held out "
                                                               "for the check")] = 0.05
    cache_dir: Annotated[str, _desc("a folder (embeddings and meta-tasks)")] = ".cache"
    wandb: GeneratorWandbConfig = GeneratorWandbConfig()
    accelerator: Annotated[Literal["cpu", "gpu", "cuda", "mps", "auto"],
                           _desc("cpu, gpu, cuda, mps or auto")] = "auto"
    overwrite: Annotated[StrictBool, _desc("true or false (replace an existing checkpoint)")] = False
    progress: Annotated[StrictBool, _desc("true or false")] = True
    # The matrices are small, so one thread is about as fast as two and does not stall when
    # other processes share the cores (oversubscribed threads spin for up to 100x).
    threads: Annotated[PositiveInt, _desc("a positive int (torch threads)")] = 1

    @field_validator("sources", "tasks", "shots", mode="before")
    @classmethod
    def _as_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, (str, int)) and not isinstance(value, bool) else value

    @model_validator(mode="before")
    @classmethod
    def _tasks_per_source(cls, value: Any) -> Any:
        """Without ``tasks``, each source other than the defaults gets the first default count."""
        if isinstance(value, dict) and "tasks" not in value and "sources" in value:
            sources = value["sources"]
            sources = [sources] if isinstance(sources, str) else sources
            if isinstance(sources, list) and sources != DEFAULT_SOURCES:
                value = {**value, "tasks": [DEFAULT_TASKS[0]] * len(sources)}
        return value

    @model_validator(mode="after")
    def _consistent(self) -> GeneratorFitConfig:
        if len(self.tasks) != len(self.sources):
            raise ValueError(f"{len(self.sources)} source(s) but {len(self.tasks)} task count(s); give one tasks "
                             "value per source")
        for name in ("ways", "per_class"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ValueError(f"{name} is [MIN, MAX]; got MIN {lo} > MAX {hi}")
        return self

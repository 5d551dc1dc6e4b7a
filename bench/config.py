"""Run configuration: YAML files under ``configs/`` plus ``key.sub=value`` overrides, typed.

Every key is declared here with its type and constraints (pydantic models with unknown keys
forbidden), so a typo or a bad value stops the run before any work, with one line that names
the key, the value and the accepted form. The defaults are the quickstart: the embedded tiny
backbone on digits, base and novel classes.

Shorthands: a section given as a plain string is its ``name``: ``dataset: imagefolder:/data``,
``backbone: timm:vit_small_patch16_224``, ``task: digits-base-novel``. Task fields
(``task.shots=[1,5]``, ``task.seeds=[0,1,2]``) override the suite's.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ByteSize, ConfigDict, Field, NonNegativeInt, PositiveInt, StrictBool, ValidationError
from pydantic import model_validator

from bench import packaged
from bench.data.sources import known_sources
from bench.data.tasks import TaskSuite
from bench.errors import BenchError
from bench.imprint.presets import PRESETS, TEXT_PRESETS, split_top
from bench.validation import format_validation_error, read_yaml_mapping

# Every preset but the text ones (the quickstart's backbone has none), plus a k-means grid.
QUICKSTART_METHODS = [*(p for p in PRESETS if p not in TEXT_PRESETS), "l2/kmeans:k=[2,5,10]/l2/l2/max"]


def _desc(text: str) -> Any:
    """The accepted form of a key, as error messages print it."""
    return Field(description=text)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _named(value: Any) -> Any:
    """``section: text`` is ``section: {name: text}``."""
    return {"name": value} if isinstance(value, str) else value


class BackboneConfig(Section):
    name: Annotated[str, _desc("a backbone name, e.g. tiny-digits, torchvision:resnet18, timm:<model>, "
                               "hf:<name or folder>, openclip:<arch>, checkpoint:<file.safetensors>")] = "tiny-digits"
    # torchvision/timm/hf: DEFAULT (the hub), a local file, or null (random init, seeded by `seed`);
    # openclip: a pretrained tag
    weights: Annotated[str | None, _desc("DEFAULT, a weights enum or pretrained tag, a local file, or null")] = None
    transform: Annotated[dict[str, Any] | None, _desc("a transform mapping (size, crop, channels, mean, std)")] = None
    pool: Annotated[str | None, _desc("timm's global_pool: avg, max, token, ...")] = None
    pooling: Annotated[Literal["cls", "mean"] | None, _desc("cls or mean")] = None
    config: Annotated[dict[str, Any] | None,
                      _desc("a transformers (hf) or open_clip (openclip) model config mapping")] = None
    tokenizer: Annotated[str | None, _desc("hf vision-language models: a tokenizer name or local folder")] = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return _named(value)

    def options(self) -> dict[str, Any]:
        """The family options as given (None where not set). Which apply to which family is the
        backbone registry's rule (bench.backbones.check_backbone), read from each family."""
        return self.model_dump(exclude={"name"})


class DatasetConfig(Section):
    name: Annotated[str | None, _desc(", ".join(known_sources()[:-1]) + f" or {known_sources()[-1]} (default: the "
                                      "task suite's dataset)")] = None
    train_split: Annotated[str, _desc("a split name")] = "train"
    test_split: Annotated[str, _desc("a split name")] = "test"
    options: Annotated[dict[str, Any], _desc("a mapping of the source's options, e.g. {image_key: img}")] = {}

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return _named(value)


class ExtractConfig(Section):
    batch_size: Annotated[PositiveInt, _desc("a positive int")] = 256
    num_workers: Annotated[Union[Literal["auto"], NonNegativeInt], _desc("auto or an int >= 0")] = "auto"
    dtype: Annotated[Literal["float32", "float16"], _desc("float32 or float16")] = "float32"
    skip_corrupt: Annotated[StrictBool, _desc("true or false")] = False
    rebuild: Annotated[StrictBool, _desc("true or false")] = False
    shard_size: Annotated[PositiveInt, _desc("a positive int (rows per shard file)")] = 65536


STRATEGIES = ("auto", "ddp", "ddp_spawn", "ddp_fork", "ddp_notebook")


class TrainerConfig(Section):
    accelerator: Annotated[Literal["cpu", "gpu", "cuda", "mps", "auto"], _desc("cpu, gpu, cuda, mps or auto")] = "cpu"
    devices: Annotated[Union[PositiveInt, Literal["auto"], list[NonNegativeInt]],
                       _desc("a positive int, auto, or a list of device ids")] = 1
    num_nodes: Annotated[PositiveInt, _desc("a positive int")] = 1
    strategy: Annotated[Literal[STRATEGIES], _desc("one of " + ", ".join(STRATEGIES))] = "auto"
    precision: Annotated[Literal["32-true", "32", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true"],
                         _desc("32-true, 16-mixed, bf16-mixed, 16-true, bf16-true or 64-true")] = "32-true"

    @property
    def processes(self) -> int:
        """Processes per node that the devices setting asks for (1 when it is 'auto')."""
        if isinstance(self.devices, list):
            return len(self.devices)
        return self.devices if isinstance(self.devices, int) else 1

    def resolved_strategy(self) -> str:
        """``auto`` with several processes is our DDP; a single process needs no strategy."""
        if self.strategy == "auto" and self.processes * self.num_nodes > 1:
            return "ddp"
        return self.strategy

    def kwargs(self) -> dict[str, Any]:
        return {**self.model_dump(), "strategy": self.resolved_strategy()}


class ImprintConfig(Section):
    max_batch_bytes: Annotated[ByteSize, _desc("a positive size, e.g. 1073741824 or 1GiB")] = ByteSize(1 << 30)

    @model_validator(mode="after")
    def _positive(self) -> ImprintConfig:
        if self.max_batch_bytes <= 0:
            raise ValueError("imprint.max_batch_bytes must be positive")
        return self


class SelectConfig(Section):
    """A family of methods whose member is chosen per episode on the task's validation part
    (bench.selection): a row ``<name>@val`` and an oracle row ``<name>@oracle``."""

    name: Annotated[str, Field(min_length=1, pattern=r"^[^@/\s]+$",
                               description="a family name without @, / or spaces")]
    methods: Annotated[list[str] | None, _desc("a list of presets or method grids, e.g. "
                                               "l2/kmeans:k=[1,5,10,20]/l2/l2/max; null: the named family's")] = None

    @model_validator(mode="before")
    @classmethod
    def _methods_as_list(cls, value: Any) -> Any:
        if isinstance(value, str):  # a named family (bench.imprint.presets.FAMILIES)
            return {"name": value}
        if isinstance(value, dict) and isinstance(value.get("methods"), str):
            value = {**value, "methods": parse_method_list(value["methods"])}
        return value


class TextConfig(Section):
    """Zero-shot prompts: the template set (a name from bench/assets/zeroshot_templates.json or a list of
    templates with {c} for the class name) and class-name overrides (a list in class-id order or a
    mapping id -> name); null: the dataset's set (imagenet's 80 for an unknown dataset) and its names."""

    templates: Annotated[Union[str, list[str], None],
                         _desc("a template set name (imagenet, cifar10, ...), a list of templates with {c}, "
                               "or null")] = None
    class_names: Annotated[Union[list[str], dict[int, str], None],
                           _desc("a list of class names in class-id order, a mapping id -> name, or null")] = None


class WandbConfig(Section):
    mode: Annotated[Literal["auto", "offline", "online", "disabled"],
                    _desc("auto (online only with credentials), offline, online or disabled")] = "auto"
    project: Annotated[str, _desc("a W&B project name")] = "bench"
    entity: Annotated[str | None, _desc("a W&B entity or null")] = None


class DiagnoseConfig(Section):
    backbones: Annotated[list[Union[str, BackboneConfig]], _desc("a list of backbone names or sections")] = []
    methods: Annotated[list[str], _desc("a list of methods")] = ["qi2018", "l2/kmeans:k=5/l2/l2/max"]
    gc_samples: Annotated[PositiveInt, _desc("a positive int")] = 256
    gc_probes: Annotated[PositiveInt, _desc("a positive int")] = 16
    pool_split: Annotated[str | None, _desc("a split name or null")] = None

    def backbone_configs(self, default: BackboneConfig) -> list[BackboneConfig]:
        if not self.backbones:
            return [default]
        return [BackboneConfig(name=b) if isinstance(b, str) else b for b in self.backbones]


class TaskConfig(Section):
    """A task suite (``suite``: a shipped suite name, one in ./tasks, or a YAML path) with optional
    field overrides; without a suite, the fields define the whole suite inline."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    suite: Annotated[str | None, _desc("a suite name under tasks/ or a YAML path")] = "digits-base-novel"
    overrides: dict[str, Any] = {}

    @model_validator(mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"suite": value}
        if isinstance(value, dict) and set(value) - {"suite", "overrides"}:
            fields = {k: v for k, v in value.items() if k not in ("suite", "overrides")}
            # Without a suite, a mapping naming its own name and dataset is a whole suite; other
            # fields override the default suite's.
            inline = "suite" not in value and {"name", "dataset"} <= set(fields)
            suite = value.get("suite", None if inline else cls.model_fields["suite"].default)
            return {"suite": suite, "overrides": {**value.get("overrides", {}), **fields}}
        return value

    def resolve(self) -> TaskSuite:
        return TaskSuite.load(self.suite, self.overrides) if self.suite else TaskSuite.build(self.overrides, "task")

    def __str__(self) -> str:
        return self.overrides.get("name") or Path(self.suite or "task").stem


class RunConfig(Section):
    backbone: BackboneConfig = BackboneConfig()
    task: TaskConfig = TaskConfig()
    dataset: DatasetConfig = DatasetConfig()
    methods: Annotated[list[str], _desc("a list of presets or method grids, e.g. [qi2018,l2/kmeans:k=[5,20]/l2/l2/max]")] = list(QUICKSTART_METHODS)
    reference: Annotated[Union[str, list[int], None],
                         _desc("a class subset (e.g. base) whose pool samples give the reference statistics "
                               "(center-l2's mean, dc's class statistics), or null")] = None
    name: Annotated[str | None, _desc("a run name or null")] = None
    cache_dir: Annotated[str, _desc("a folder")] = ".cache/bench"
    out_dir: Annotated[str, _desc("a folder")] = "runs"
    seed: Annotated[NonNegativeInt, _desc("an int >= 0 (seeds random backbone weights)")] = 0
    save_heads: Annotated[StrictBool, _desc("true or false")] = False
    plugins: Annotated[list[str], _desc("a list of modules or .py files that register methods, backbone "
                                        "families or dataset sources")] = []
    select: Annotated[list[SelectConfig],
                      _desc("a list of families chosen on the task's validation part: {name, methods} or a "
                            "named family (dinov2-knn, kmeans, ls, logreg, tip)")] = []
    extract: ExtractConfig = ExtractConfig()
    trainer: TrainerConfig = TrainerConfig()
    imprint: ImprintConfig = ImprintConfig()
    wandb: WandbConfig = WandbConfig()
    diagnose: DiagnoseConfig = DiagnoseConfig()
    text: TextConfig = TextConfig()

    @model_validator(mode="before")
    @classmethod
    def _methods_as_list(cls, value: Any) -> Any:
        if isinstance(value, dict) and isinstance(value.get("methods"), str):
            value = {**value, "methods": parse_method_list(value["methods"])}
        return value


def parse_method_list(text: str) -> list[str]:
    """``[qi2018,l2/kmeans:k=[5,20]/l2/l2/max]`` or ``qi2018``: split on commas outside
    brackets, which YAML cannot do for grids with bracketed option lists."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    items: list[str] = []
    for piece in split_top(text, ","):
        # A comma also separates a stage's options: a piece starting `key=` continues the
        # previous method (`l2/kmeans:k=5,n_init=3/l2/l2/max`).
        if items and re.match(r"\s*[A-Za-z_][\w.-]*\s*=", piece):
            items[-1] += "," + piece
        elif piece.strip():
            items.append(piece)
    return [item.strip() for item in items]


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    cur = data
    for i, p in enumerate(parts[:-1]):
        if isinstance(cur.get(p), str):  # a shorthand string becomes its section
            cur[p] = {"suite" if p == "task" and i == 0 else "name": cur[p]}
        cur = cur.setdefault(p, {})
        if not isinstance(cur, dict):
            raise BenchError(f"cannot set '{dotted}': '{'.'.join(parts[:i + 1])}' is not a section")
    cur[parts[-1]] = value


def _parse_value(key: str, raw: str) -> Any:
    """An override's value: YAML, except method lists (grids hold brackets YAML cannot read)."""
    if key.split(".")[-1] == "methods" or key == "diagnose.methods":
        return parse_method_list(raw)
    try:
        return yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        return raw  # not YAML: take the text as it is, and let the key's type judge it


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                model: type[BaseModel] = RunConfig) -> Any:
    """Defaults, then the YAML file, then ``key.sub=value`` overrides, checked as ``model``: a run
    config, or another config written in the same style (the weight-space fits'). A path under
    ``configs/`` that the working directory lacks is the packaged copy (bench.packaged)."""
    data: dict[str, Any] = {}
    if path is not None:
        p = packaged.locate(path, "configs")
        if p is None or not p.is_file():
            where = ""
            if Path(path).parts[:1] == ("configs",):
                shipped = ", ".join("configs/" + c for c in packaged.listing("configs"))
                where = f" here nor among the shipped configs ({shipped})"
            raise BenchError(f"config file {path} does not exist{where}")
        data = read_yaml_mapping(p, "config file")
    for item in overrides or []:
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise BenchError(f"override '{item}' must look like key=value, e.g. trainer.devices=2")
        _set_path(data, key, _parse_value(key, raw))
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise BenchError(format_validation_error(err, model, "config")) from None


def _yaml(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip()


def config_table() -> str:
    """The README's config reference (markdown): every key, its accepted form and default,
    then the task suite's fields (settable as ``task.<field>``)."""
    lines = ["| key | accepted | default |", "| --- | --- | --- |"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, info in model.model_fields.items():
            default = info.default
            if isinstance(default, BaseModel) and name != "task":
                walk(type(default), f"{prefix}{name}.")
                continue
            if name == "task":
                accepted, shown = "a suite name under tasks/ or a YAML path (`task.<field>` overrides a field)", \
                    default.suite
            elif f"{prefix}{name}" == "methods":
                accepted, shown = info.description, (f"the {len(QUICKSTART_METHODS) - 1} presets without text "
                                           "+ l2/kmeans:k=[2,5,10]/l2/l2/max")
            else:
                accepted = info.description
                # bool is an int: keep true/false, but show sizes such as 1GiB's int as a plain number
                shown = _yaml(default if isinstance(default, bool) or not isinstance(default, int) else int(default))
            lines.append(f"| `{prefix}{name}` | {accepted} | `{shown}` |")

    walk(RunConfig, "")
    for name, info in TaskSuite.model_fields.items():
        default = "required" if info.is_required() else _yaml(info.default)
        lines.append(f"| `task.{name}` | {info.description} | `{default}` |")
    return "\n".join(lines)

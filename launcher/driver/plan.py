"""The resolved plan of a run: what `launch --check` prints and what `launch` starts from.

Building it reads and validates the data files (so a malformed line fails before Ray starts)
and locates the encoder without downloading anything.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from launcher.data.augment import augment
from launcher.data.estimate import DataEstimate, estimate
from launcher.data.parse import Dataset, load_dataset
from launcher.data.sources import describe, expand
from launcher.recipe.ds_config import build_ds_config
from launcher.recipe.schema import PACKAGED_PREFIX, Recipe, resolve_encoder
from launcher.runs.observe import check_mlflow
from launcher.runs.storage import check_storage
from zeroship.errors import DataError, Problem, RecipeError
from zeroship.tasks import Task


@dataclass
class Plan:
    recipe: Recipe  # as the run starts it: a warm start's init_from settled to its folder
    dataset: Dataset
    encoder_source: str
    ds_config: dict
    warnings: list[str] = field(default_factory=list)
    parent: str | None = None  # warm start: the run id or folder this run starts from
    augmentation: dict = field(default_factory=dict)  # examples each augmentation produced
    zero_auto: list[str] = field(default_factory=list)  # zero_stage auto: the estimate and the choice
    figures: DataEstimate | None = None  # training windows per epoch and the cache decision


DATA_CPUS = 1  # what a run leaves free beside its workers for Ray Data's reading and tokenization


def local_cpus() -> int:
    """The CPUs a private local Ray declares (zeroship.ray_session): this machine's and DATA_CPUS more."""
    return (os.cpu_count() or 1) + DATA_CPUS


def resource_problems(recipe: Recipe, have: dict, where: str) -> list[Problem]:
    """What the recipe's workers (and Ray Data beside them) need and `have` (Ray resources) lacks."""
    sc = recipe.scaling
    need_cpu = sc.workers * sc.cpus_per_worker + DATA_CPUS
    problems = []
    if need_cpu > have.get("CPU", 0):
        problems.append(Problem("scaling", f"{sc.workers} workers × {sc.cpus_per_worker:g} CPU + {DATA_CPUS} for"
                                f" reading data = {need_cpu:g} CPUs, but {where} has {have.get('CPU', 0):g}",
                                "lower scaling.workers or scaling.cpus_per_worker, or use a bigger cluster"))
    if sc.use_gpu and sc.workers * sc.gpus_per_worker > have.get("GPU", 0):
        problems.append(Problem("scaling", f"{sc.workers} workers × {sc.gpus_per_worker:g} GPU, but {where}"
                                f" has {have.get('GPU', 0):g} GPUs", "set scaling.use_gpu: false on CPU"))
    return problems


def check_encoder_positions(source: str, max_length: int, where: str) -> None:
    """data.max_length must fit the encoder's position embeddings (else the first long batch fails)."""
    config = Path(source) / "config.json"
    try:
        positions = json.loads(config.read_text(encoding="utf-8")).get("max_position_embeddings")
    except (OSError, ValueError, AttributeError, RecursionError):
        return  # not a local folder (a hub name), or its config is for transformers to judge
    if isinstance(positions, int) and max_length > positions:
        raise RecipeError(Problem(where, f"{max_length} is more than the encoder's {positions} positions",
                                  f"set data.max_length to at most {positions} (long sentences are cut into "
                                  "overlapping windows)"))


def check_casing(source: str, where: str) -> None:
    """model.casing needs token-type embeddings to carry the classes (BERT-family encoders have them)."""
    try:
        config = json.loads((Path(source) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return  # a hub name: the workers' launcher.nn.model.enable_casing says it if the encoder has none
    if isinstance(config, dict) and not config.get("type_vocab_size"):
        raise RecipeError(Problem(where, f"the encoder ({config.get('model_type', 'unknown type')}) has no token-type "
                                  "embeddings to carry the casing classes",
                                  "use a BERT-family encoder, or set model.casing: false"))


def locate_encoder(encoder: str, recipe_path: str) -> tuple[str, list[str]]:
    """Where the encoder comes from. Local paths must exist; hub names only warn (no download here)."""
    if encoder.startswith(PACKAGED_PREFIX):
        return resolve_encoder(encoder), []
    path = Path(encoder)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise RecipeError(Problem(f"{recipe_path} model.encoder", f"{encoder} has no config.json",
                                      "point at a Hugging Face model folder"))
        return str(path), []
    if encoder.startswith((".", "/", "~")) or path.exists():
        raise RecipeError(Problem(f"{recipe_path} model.encoder", f"local model folder {encoder} not found",
                                  "fix the path, or use a hub name / packaged:all-MiniLM-L6-v2"))
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(encoder, "config.json")
    if isinstance(cached, str):
        return encoder, []
    return encoder, [f"model.encoder {encoder!r} is not a local folder nor in the local Hugging Face cache;"
                     " every node must be able to download it when the run starts"]


def build_plan(recipe: Recipe, recipe_path: str, check: bool = False) -> Plan:
    """`check` (launch --check) checks a big split on a sample of it (launcher.data.parse.read_sample) and
    previews `zero_stage: auto` for GPU workers with the model's memory per ZeRO stage — it builds the
    model's shapes and imports DeepSpeed's estimators, ~12 s that a launch need not pay (the workers
    estimate for themselves) and CPU workers need not at all."""
    missing = []
    for split in ("train", "validation", "test"):  # every split's missing files at once, before any parsing
        if getattr(recipe.data, split):
            try:
                expand(getattr(recipe.data, split), f"{recipe_path} data.{split}")
            except DataError as exc:
                missing += exc.problems
    if missing:
        raise RecipeError(missing)
    check_mlflow(recipe.run.mlflow_uri)
    check_storage(recipe.run.storage)
    source, warnings = locate_encoder(recipe.model.encoder, recipe_path)
    check_encoder_positions(source, recipe.data.max_length, f"{recipe_path} data.max_length")
    if recipe.model.casing:
        check_casing(source, f"{recipe_path} model.casing")
    # a launch plans from a sample of a big train split; Ray Data tasks check all of it once Ray is up
    data = recipe.as_dict()["data"]
    dataset = load_dataset(data, recipe.model.task, sample=True if check else "train")
    warnings += dataset.warnings()
    train = dataset.splits["train"]
    # a preview: the workers' stream makes the same copies (launcher.data.ingest.AugmentRows)
    _, augmented = augment(train.examples, recipe.model.task, data["augmentation"], recipe.train.seed)
    parent = None
    if recipe.model.init_from:
        parent, parent_dir = resolve_parent(recipe.model.init_from, recipe.run.storage, recipe_path)
        from launcher.nn.model import check_warm_start

        problems = check_warm_start(parent_dir, dataset.labels, recipe.model.task,
                                    recipe.model.head.model_dump(mode="json"),
                                    recipe.model.init_from_head, recipe.model.casing)
        if problems:
            raise RecipeError([Problem(f"{recipe_path} model.init_from", p) for p in problems])
        recipe = recipe.updated({"model.init_from": str(parent_dir.resolve())})  # workers read it from here
        source = str(parent_dir.resolve())  # the parent's tokenizer
    sc = recipe.scaling
    local = {"CPU": local_cpus(), "GPU": 0}  # as zeroship.ray_session starts it
    if sc.use_gpu:
        try:
            import torch

            local["GPU"] = torch.cuda.device_count()
            if not torch.cuda.is_available():
                warnings.append("scaling.use_gpu is on but this machine has no GPU; the cluster must have them")
        except ImportError:
            pass
    if not os.environ.get("RAY_ADDRESS"):  # the run would start a local Ray of this machine's size
        warnings += [
            f"a launch on this machine would refuse: {p.what} (fine for a cluster recipe: check it there"
            " with RAY_ADDRESS=<head>:6379 launch --check)"
            for p in resource_problems(recipe, local, "this machine")
        ]
    shown, zero_lines = recipe, []
    if recipe.deepspeed.zero_stage == "auto":
        shown, zero_lines = (auto_stage_preview(recipe, dataset.labels, local["GPU"])
                             if check and sc.use_gpu else auto_stage_note(recipe))
    return Plan(recipe, dataset, source, build_ds_config(shown.as_dict(), sc.workers), warnings, parent,
                augmented, zero_lines, estimate(recipe, dataset))


def auto_stage_note(recipe: Recipe) -> tuple[Recipe, list[str]]:
    """`zero_stage: auto` at launch, without the estimate: CPU workers take stage 0; GPU workers
    choose when they start (launcher.recipe.zero_auto)."""
    if recipe.scaling.use_gpu:
        return recipe, ["zero_stage auto: the workers choose from their GPU memory when they start"
                        " (launch --check prints the estimate per stage)"]
    return recipe.updated({"deepspeed.zero_stage": 0}), ["zero_stage auto → ZeRO-0 (CPU workers: no device memory "
                                                         "to save)"]


def auto_stage_preview(recipe: Recipe, labels: list[str], local_gpus: int) -> tuple[Recipe, list[str]]:
    """What `zero_stage: auto` would pick for GPU workers, for --check: the estimate per option, and
    the choice for GPUs like this machine's when it has one. The workers decide for real from their
    own devices (launcher.recipe.zero_auto)."""
    import torch

    from launcher.nn.model import build_model
    from launcher.recipe import zero_auto

    with torch.device("meta"):  # shapes only: no weights read, no memory
        model = build_model(recipe.as_dict()["model"], labels, pretrained=False)
    workers = recipe.scaling.workers
    total, largest = zero_auto.parameter_counts(model)
    per_node = min(workers, local_gpus) if local_gpus else workers
    table = zero_auto.estimates(total, largest, workers, per_node)
    lines = [f"model states ({total / 1e6:.1f}M parameters, {workers} workers): " + zero_auto.describe(table)]
    if not local_gpus:
        return recipe, [*lines, "zero_stage auto: each launch picks from the workers' GPU memory"
                          f" (the lowest option within {1 - zero_auto.ACTIVATION_MARGIN:.0%} of it)"]
    import psutil

    device, host = torch.cuda.get_device_properties(0).total_memory, psutil.virtual_memory().total
    try:
        shown, why = zero_auto.resolve(recipe, model, device, host, per_node)
    except ValueError as exc:
        return recipe, [*lines, str(exc)]
    return shown, [*lines, why + " — with GPUs like this machine's"]


def resolve_parent(init_from: str, storage: str, recipe_path: str) -> tuple[str, Path]:
    """`run-41` / `41` / `latest` in this recipe's storage, or a folder holding a saved model."""
    from launcher.runs.registry import RUN_ID, Registry

    if RUN_ID.match(init_from) or init_from.isdigit() or init_from == "latest":
        run = Registry(storage).get(init_from)
        if run.status().get("state") != "succeeded" or not (run.best_dir / "model.json").is_file():
            raise RecipeError(Problem(f"{recipe_path} model.init_from", f"{run.id} has no winning checkpoint",
                                      "start from a run that succeeded (see `zeroship runs`)"))
        return run.id, run.best_dir
    folder = Path(init_from).expanduser()
    if not folder.is_absolute():
        folder = Path(recipe_path).resolve().parent / folder
    if not (folder / "model.json").is_file():
        raise RecipeError(Problem(f"{recipe_path} model.init_from", f"{folder} holds no saved model (model.json)",
                                  "use a run id like run-41 or a run's best/ folder"))
    return str(folder), folder


def print_plan(plan: Plan, console: Console) -> None:
    r = plan.recipe
    t = Table(title="zeroship plan", show_header=False, title_justify="left")
    t.add_column("what", style="bold")
    t.add_column("value")
    head = r.model.head
    t.add_row(
        "model", f"{r.model.encoder}" + (f" → {plan.encoder_source}" if plan.encoder_source != r.model.encoder else "")
    )
    t.add_row("task", r.model.task + (f" (pooling {r.model.pooling})" if r.model.task == Task.SEQUENCE else ""))
    t.add_row("head", f"{head.layers} × Linear({head.dim}) {head.activation}"
              f"{' + LayerNorm' if head.layernorm else ''}, dropout {head.dropout}")
    if plan.parent:
        t.add_row("init from", f"{plan.parent}" + ("" if r.model.init_from_head else " (encoder only, new head)"))
    if r.model.casing:
        from zeroship.casing import NAMES

        t.add_row("casing", f"each token's casing class as its token type ({'/'.join(NAMES)})")
    if r.model.freeze != "none":
        t.add_row("freeze", str(r.model.freeze))
    if r.model.lora is not None:
        lo = r.model.lora
        t.add_row("lora", f"r {lo.r}, alpha {lo.alpha:g}, dropout {lo.dropout:g} on {', '.join(lo.targets)}"
                  " (encoder frozen; adapters merged into best/)")
    labels = plan.dataset.labels
    sampled = plan.dataset.splits["train"].sampled_bytes is not None and not r.data.labels
    t.add_row("labels", f"{len(labels)}{' in the sample' if sampled else ''}: {', '.join(labels[:12])}"
              f"{' …' if len(labels) > 12 else ''}")
    added = plan.augmentation.get("examples", 0)
    for name, split in plan.dataset.splits.items():
        extra = f" + {added} augmented" if name == "train" and added else ""
        if extra and split.sampled_bytes is not None:
            extra += " in the sample"
        n = len(split.examples)
        count = str(n) if split.sampled_bytes is None else f"≈ {split.estimate(n)}"
        t.add_row(f"data.{name}", f"{split.path} ({describe(split.files)}, {count} examples{extra})")
    if plan.augmentation:
        t.add_row("augmentation", f"{added} copies (seed {r.train.seed}); changed by: " + ", ".join(
            f"{op} {n}" for op, n in plan.augmentation.items() if op != "examples"))
    t.add_row("max length / stride", f"{r.data.max_length} / {r.data.stride}")
    if plan.figures is not None:
        t.add_row("windows", plan.figures.describe())
    sc = r.scaling
    res = f"{sc.cpus_per_worker:g} CPU" + (f" + {sc.gpus_per_worker:g} GPU" if sc.use_gpu else "")
    t.add_row("workers", f"{sc.workers} × ({res}), {sc.placement_strategy}; "
              f"{'NCCL' if sc.use_gpu else 'gloo'}, collective timeout {sc.timeout_s} s")
    ds = r.deepspeed
    off = [f"optimizer→{ds.offload_optimizer}"] if ds.offload_optimizer != "none" else []
    off += [f"params→{ds.offload_params}"] if ds.offload_params != "none" else []
    t.add_row("deepspeed", f"ZeRO-{ds.zero_stage}, {ds.precision}" + (f", offload {' '.join(off)}" if off else ""))
    tr = r.train
    t.add_row("batch", f"{tr.batch_size}/worker × {tr.grad_accum} accum × {sc.workers} workers"
              f" = {r.effective_batch_size} effective")
    length = f"{tr.max_steps} optimizer steps (train.max_steps)" if tr.max_steps else f"{tr.epochs} epochs"
    t.add_row("train", f"{length}, lr {tr.lr:g} ({tr.schedule}, warmup {tr.warmup_ratio:g}),"
              f" seed {tr.seed}, eval every {tr.eval_every}"
              + (f", layer-wise lr decay {tr.layer_decay:g}" if tr.layer_decay < 1 else ""))
    t.add_row("select", f"{r.metric} ({r.mode})" + (
        f", early stop after {tr.early_stopping.patience} evals without gain" if tr.early_stopping else ""))
    reg = r.regularization
    t.add_row("regularization", f"weight decay {reg.weight_decay:g}, label smoothing {reg.label_smoothing:g},"
              f" max grad norm {reg.max_grad_norm:g}")
    if r.sweep:
        params = ", ".join(f"{k}∈{v}" for k, v in r.sweep.parameters.items())
        t.add_row("sweep", f"{r.sweep.method}, {r.sweep_size()} trials: {params}")
    t.add_row("storage", f"{plan.recipe.run.storage}")
    console.print(t)
    for line in plan.zero_auto:
        console.print(escape(line), highlight=False, soft_wrap=True)
    console.print("deepspeed config: " + json.dumps(plan.ds_config), highlight=False, soft_wrap=True)
    for w in plan.warnings:
        console.print(f"[yellow]warning:[/] {escape(w)}", highlight=False)

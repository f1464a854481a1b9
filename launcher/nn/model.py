"""Encoder + projection head + task classifier: one class for training, checkpoints and export.

Saved form (`best/`): `model.safetensors` (every weight, head included), `model.json` (what it
takes to rebuild: encoder config, head, task, labels) and the tokenizer files. Loading reads only
safetensors and JSON, never a pickle.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zeroship.errors import Problem, RunError
from zeroship.tasks import Task

FORMAT_VERSION = 1
ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh, "silu": nn.SiLU}


class ProjectionHead(nn.Module):
    """`layers` × (Linear → activation → LayerNorm? → Dropout), projecting into the task space."""

    def __init__(self, in_dim: int, dim: int, layers: int, activation: str, dropout: float,
                 layernorm: bool):
        super().__init__()
        blocks: list[nn.Module] = []
        for i in range(layers):
            blocks += [nn.Linear(in_dim if i == 0 else dim, dim), ACTIVATIONS[activation]()]
            if layernorm:
                blocks.append(nn.LayerNorm(dim))
            blocks.append(nn.Dropout(dropout))
        self.net = nn.Sequential(*blocks)
        self.out_dim = dim if layers else in_dim
        self.dropout = nn.Dropout(dropout) if not layers else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.net(x))


class ZeroshipModel(nn.Module):
    def __init__(self, encoder: nn.Module, task: str, labels: list[str], head: dict, pooling: str = "cls",
                 casing: bool = False):
        super().__init__()
        self.encoder = encoder
        if getattr(self.encoder, "pooler", None) is not None:
            self.encoder.pooler = None  # unused, and unused params upset ZeRO's gradient hooks
        self.task, self.labels, self.head_config, self.pooling = task, list(labels), dict(head), pooling
        self.casing = casing  # token type ids are casing classes (zeroship.casing)
        hidden = encoder.config.hidden_size
        self.head = ProjectionHead(hidden, head["dim"], head["layers"], head["activation"],
                                   head["dropout"], head["layernorm"])
        self.classifier = nn.Linear(self.head.out_dim, len(labels))

    @property
    def uses_token_type_ids(self) -> bool:
        return getattr(self.encoder.config, "type_vocab_size", 0) > 0

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        # inputs_embeds: word embeddings given directly (FGM perturbs them); positions/types still added
        kwargs = {"attention_mask": attention_mask}
        if inputs_embeds is not None:
            kwargs["inputs_embeds"] = inputs_embeds
        else:
            kwargs["input_ids"] = input_ids
        if token_type_ids is not None and self.uses_token_type_ids:
            kwargs["token_type_ids"] = token_type_ids
        hidden = self.encoder(**kwargs).last_hidden_state
        if self.task == Task.SEQUENCE:
            if self.pooling == "mean":
                mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
                hidden = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            else:
                hidden = hidden[:, 0]
        return self.classifier(self.head(hidden))

    # ------------------------------------------------------------ describe / save / load
    def describe(self, extra: dict | None = None) -> dict:
        return {"format_version": FORMAT_VERSION, "task": self.task, "labels": self.labels,
                "head": self.head_config, "pooling": self.pooling, "casing": self.casing,
                "encoder_config": self.encoder.config.to_dict(), **(extra or {})}

    def save(self, folder: Path, tokenizer=None, extra: dict | None = None,
             state_dict: dict | None = None) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = state_dict if state_dict is not None else self.state_dict()
        save_file({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()},
                  str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "model.json").write_text(json.dumps(self.describe(extra), indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(folder))


DROPOUT_NAMES = {"hidden": ("hidden_dropout_prob", "dropout"),
                 "attention": ("attention_probs_dropout_prob", "attention_dropout")}


def _encoder_config(source: str, num_hidden_layers: int | None, attn: str | None,
                    dropout: dict[str, float | None] | None = None):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source)
    if num_hidden_layers is not None:
        config.num_hidden_layers = min(num_hidden_layers, config.num_hidden_layers)
    for kind, value in (dropout or {}).items():
        if value is None:
            continue
        name = next((n for n in DROPOUT_NAMES[kind] if hasattr(config, n)), None)
        if name is None:
            raise RunError(
                Problem(
                    f"regularization.{kind}_dropout",
                    f"{config.model_type} has no {kind} dropout setting ({', '.join(DROPOUT_NAMES[kind])})",
                )
            )
        setattr(config, name, value)
    if attn:
        config._attn_implementation = attn
    return config


def build_model(model_cfg: dict, labels: list[str], attn: str | None = None,
                pretrained: bool = True, dropout: dict[str, float | None] | None = None) -> ZeroshipModel:
    """A model from the recipe's `model` section: pretrained encoder (or an empty skeleton of
    the same shape, to load a checkpoint into) and a new head."""
    from transformers import AutoModel

    from launcher.recipe.schema import resolve_encoder

    source = resolve_encoder(model_cfg["encoder"])
    config = _encoder_config(source, model_cfg.get("num_hidden_layers"), attn, dropout)
    encoder = AutoModel.from_pretrained(source, config=config) if pretrained else AutoModel.from_config(config)
    if model_cfg.get("casing"):
        enable_casing(encoder)
    return ZeroshipModel(encoder, model_cfg["task"], labels, model_cfg["head"], model_cfg.get("pooling", "cls"),
                         bool(model_cfg.get("casing")))


def casing_table(encoder: nn.Module) -> nn.Embedding | None:
    """The encoder's token-type embedding table (BERT-family encoders have one), or None."""
    table = getattr(getattr(encoder, "embeddings", None), "token_type_embeddings", None)
    return table if isinstance(table, nn.Embedding) else None


def new_rows(model: ZeroshipModel) -> set[int]:
    """ids of the encoder parameters the pretrained model did not have (the casing table, with
    model.casing): they train whatever is frozen, and at the head's lr."""
    return {id(p) for p in casing_table(model.encoder).parameters()} if getattr(model, "casing", False) else set()


def enable_casing(encoder: nn.Module) -> None:
    """Grow the token-type table to the casing classes (zeroship.casing), every new row a copy of the
    pretrained row 0: until training moves them, the model computes what it computed before."""
    from zeroship.casing import CLASSES

    table = casing_table(encoder)
    if table is None:
        raise RunError(Problem("model.casing", f"{encoder.config.model_type} has no token-type embeddings to carry "
                               "the casing classes", "use a BERT-family encoder, or set model.casing: false"))
    grown = nn.Embedding(CLASSES, table.embedding_dim, dtype=table.weight.dtype)
    with torch.no_grad():
        grown.weight.copy_(table.weight[:1].expand(CLASSES, -1))
    encoder.embeddings.token_type_embeddings = grown
    encoder.config.type_vocab_size = CLASSES


def read_model_json(folder: Path) -> dict:
    path = Path(folder) / "model.json"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise RunError(Problem(str(path), "missing", "this folder is not a zeroship checkpoint")) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunError(Problem(str(path), f"corrupt: {exc}")) from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise RunError(Problem(str(path), f"format_version {meta.get('format_version')!r} is not "
                               f"{FORMAT_VERSION}", "re-run with this zeroship version"))
    return meta


def load_model(folder: str | Path, attn: str | None = None) -> tuple[ZeroshipModel, dict]:
    """Rebuild a saved model from `model.json` + `model.safetensors` (no pickle involved)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel

    folder = Path(folder)
    meta = read_model_json(folder)
    enc = dict(meta["encoder_config"])
    config = AutoConfig.for_model(enc.pop("model_type"), **{
        k: v for k, v in enc.items() if k not in ("transformers_version", "architectures")})
    if attn:
        config._attn_implementation = attn
    encoder = AutoModel.from_config(config)
    model = ZeroshipModel(encoder, meta["task"], meta["labels"], meta["head"], meta.get("pooling", "cls"),
                          bool(meta.get("casing")))
    weights = folder / "model.safetensors"
    try:
        state = load_file(str(weights))
    except FileNotFoundError:
        raise RunError(Problem(str(weights), "missing")) from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise RunError(Problem(str(weights), f"corrupt weights: {exc}")) from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RunError(Problem(str(weights), f"weights do not fit model.json: missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]}"))
    model.eval()
    return model, meta


def apply_freeze(model: ZeroshipModel, freeze: Any) -> int:
    """Freeze none / embeddings / encoder / bottom N layers. Returns the number of frozen tensors.
    The casing rows (model.casing) are new, so they train whatever else is frozen."""
    frozen = 0
    targets: list[nn.Module] = []
    if freeze == "encoder":
        targets = [model.encoder]
    elif freeze == "embeddings" or (isinstance(freeze, int) and freeze > 0):
        targets = [model.encoder.embeddings]
        if isinstance(freeze, int):
            targets += list(model.encoder.encoder.layer[:freeze])
    keep = new_rows(model)
    for module in targets:
        for p in module.parameters():
            if id(p) not in keep:
                p.requires_grad_(False)
                frozen += 1
    return frozen


def apply_lora(model: ZeroshipModel, lora: dict) -> int:
    """Wrap the encoder with LoRA adapters (peft): its weights freeze, the adapters train.
    Returns the number of adapter parameters."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                        target_modules=list(lora["targets"]), bias="none")
    try:
        model.encoder = get_peft_model(model.encoder, config)
    except ValueError as exc:  # no module matched the targets
        raise RunError(Problem("model.lora.targets", str(exc).splitlines()[0],
                               "name the encoder's linear modules, e.g. query, key, value, dense (BERT)")) from None
    if model.casing:  # peft froze the whole base encoder; the casing rows are new and must train
        casing_table(model.encoder.get_base_model()).weight.requires_grad_(True)
    return sum(p.numel() for n, p in model.encoder.named_parameters() if "lora_" in n)


def trainable_params(model: torch.nn.Module) -> int:
    """Elements the optimizer updates (frozen parameters and LoRA's base weights excluded)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merge_lora(model: ZeroshipModel) -> ZeroshipModel:
    """Fold the adapters into the encoder's weights: a plain encoder again, same outputs."""
    if hasattr(model.encoder, "merge_and_unload"):
        model.encoder = model.encoder.merge_and_unload()
    return model


def layer_depth(name: str, num_layers: int) -> int:
    """Depth of an encoder parameter for layer-wise lr decay: embeddings 0, layer i → i + 1, and
    anything above the layers (pooler) num_layers."""
    match = re.search(r"\.(?:layer|layers)\.(\d+)\.", name)
    if match:
        return int(match.group(1)) + 1
    return 0 if "embeddings" in name else num_layers


def param_groups(model: nn.Module, weight_decay: float, lr: float, head_lr: float | None,
                 layer_decay: float = 1.0) -> list[dict]:
    """Decoupled weight decay on weights only (not biases, not LayerNorm); head may get its own lr.
    With layer_decay < 1, encoder layer d (of L) trains at lr · layer_decay^(L − d): the embeddings
    slowest, the top layer at lr (layer-wise learning-rate decay). The casing rows (model.casing) are new
    like the head, and train at its lr."""
    layers = getattr(getattr(model, "encoder", None), "config", None)
    num_layers = getattr(layers, "num_hidden_layers", 0) or 0
    new = new_rows(model)
    groups: dict[tuple, list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim < 2 or "LayerNorm" in name or "layer_norm" in name or ".norm" in name
        if not name.startswith("encoder.") or id(p) in new:
            group_lr = head_lr or lr
        else:
            group_lr = lr * layer_decay ** (num_layers - layer_depth(name, num_layers))
        key = (0.0 if no_decay else weight_decay, group_lr)
        groups.setdefault(key, []).append(p)
    return [{"params": ps, "weight_decay": wd, "lr": glr} for (wd, glr), ps in groups.items()]


def warm_start(parent_dir: str | Path, labels: list[str], head: dict, take_head: bool,
               casing: bool = False) -> ZeroshipModel:
    """A model initialised from an earlier run's winner (encoder, and head unless take_head is off).

    Classifier rows of labels the parent knew are copied bit for bit; rows of new labels keep their
    fresh initialisation. A label set that drops or renames a parent label cannot reuse the head.
    `casing` grows a parent trained without casing classes (check_warm_start refuses the reverse).
    """
    parent, meta = load_model(parent_dir)
    if casing and not parent.casing:
        enable_casing(parent.encoder)
    casing = casing or parent.casing
    if not take_head:
        return ZeroshipModel(parent.encoder, meta["task"], labels, head, meta.get("pooling", "cls"), casing)
    model = ZeroshipModel(parent.encoder, meta["task"], labels, head, meta.get("pooling", "cls"), casing)
    model.head.load_state_dict(parent.head.state_dict())  # same shapes (checked); the recipe's dropout
    index = {label: i for i, label in enumerate(labels)}
    with torch.no_grad():
        for old_row, label in enumerate(meta["labels"]):
            model.classifier.weight[index[label]] = parent.classifier.weight[old_row]
            model.classifier.bias[index[label]] = parent.classifier.bias[old_row]
    return model


def check_warm_start(parent_dir: Path, labels: list[str], task: str, head: dict, take_head: bool,
                     casing: bool = False) -> list[str]:
    """Problems with starting from `parent_dir` (empty when it can be done)."""
    meta = read_model_json(parent_dir)
    problems = []
    if meta["task"] != task:
        problems.append(f"the parent is {meta['task']}, this recipe is {task}")
    if meta.get("casing") and not casing:
        problems.append("the parent was trained with casing classes as its token types; set model.casing: true")
    if take_head:
        lost = [label for label in meta["labels"] if label not in labels]
        if lost:
            problems.append(f"the new label set drops or renames {', '.join(lost)}; set model.init_from_head: false"
                            " to start a fresh head on the parent's encoder")
        if {k: meta["head"][k] for k in ("dim", "layers", "activation", "layernorm")} != {
                k: head[k] for k in ("dim", "layers", "activation", "layernorm")}:
            problems.append(f"the parent's head is {meta['head']}, the recipe's {head}; make model.head match or"
                            " set model.init_from_head: false")
    return problems

"""Evaluation shared by the workers, the driver (merged checkpoint) and the exporter (parity): runs a
model over features (launcher.data.features) and scores the predictions.

`predict` runs any forward function over batches of features and returns per-feature argmax
predictions (and the summed loss); `score` turns those into the task metrics on whole examples,
stitching NER windows back into sentences first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from launcher.data.features import Feature, collate, encode, length_grouped_batches, merge_word_predictions
from launcher.data.parse import Example
from launcher.eval.metrics import cls_metrics, ner_metrics
from zeroship.tasks import Task


def predict(forward: Callable, features: list[Feature], batches: list[list[int]], real: list[bool],
            pad_id: int, with_type_ids: bool, device: Any = "cpu") -> tuple[dict[int, list[int] | int], float, int]:
    """Argmax per feature over the given batches, each moved to `device` (where `forward`'s model
    is). Padding batches (real=False) run but are dropped. Logits and the loss are scored in fp32.

    Returns ({feature index: prediction}, summed token/example loss, number of labelled items).
    """
    import torch
    import torch.nn.functional as F

    from launcher.nn.device import to_device

    preds: dict[int, list[int] | int] = {}
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    with torch.no_grad():
        for batch_ids, is_real in zip(batches, real):
            batch = collate([features[i] for i in batch_ids], pad_id, with_type_ids)
            gold = batch.pop("labels").reshape(-1)
            logits = forward(**to_device(batch, device)).float()
            if not is_real:
                continue
            flat = logits.reshape(-1, logits.shape[-1])
            loss_sum += F.cross_entropy(flat, to_device(gold, device), ignore_index=-100, reduction="sum")
            count += int((gold != -100).sum())  # labels are still on the host: no device sync
            arg = logits.argmax(-1).cpu().tolist()
            for i, p in zip(batch_ids, arg):
                preds[i] = p
    return preds, float(loss_sum.cpu()), count


def gold_and_pred(task: str, labels: list[str], examples: list[Example], features: list[Feature],
                  preds: dict[int, list[int] | int]) -> tuple[list, list]:
    """NER: tag sequences per sentence (windows stitched back). Classification: label ids."""
    if task == Task.TOKEN:
        window_preds = [preds[i] for i in range(len(features))]
        merged = merge_word_predictions(features, window_preds, [len(ex.tokens) for ex in examples])
        return [ex.tags for ex in examples], [[labels[p] if p is not None else "O" for p in row] for row in merged]
    label2id = {label: i for i, label in enumerate(labels)}
    return [label2id[ex.label] for ex in examples], [preds[i] for i in range(len(features))]


def score(task: str, labels: list[str], examples: list[Example], features: list[Feature],
          preds: dict[int, list[int] | int], loss_sum: float, count: int,
          with_report: bool = False) -> dict[str, Any]:
    gold, pred = gold_and_pred(task, labels, examples, features, preds)
    return metrics_of(task, labels, gold, pred, loss_sum, count, with_report)


def metrics_of(task: str, labels: list[str], gold: list, pred: list, loss_sum: float, count: int,
               with_report: bool = False) -> dict[str, Any]:
    """The task metrics of gold/predicted pairs (any order: a worker's gathered shards)."""
    if task == Task.TOKEN:
        metrics: dict[str, Any] = ner_metrics(gold, pred)
    else:
        metrics = cls_metrics(gold, pred, len(labels))
    metrics["eval_loss"] = loss_sum / max(count, 1)
    if with_report:
        from launcher.eval.report import cls_report, ner_report

        metrics["report"] = ner_report(gold, pred) if task == Task.TOKEN else cls_report(gold, pred, labels)
    return metrics


def evaluate_model(model, tokenizer, task: str, labels: list[str], examples: list[Example],
                   max_length: int, stride: int, batch_size: int = 32, with_report: bool = False,
                   forward: Callable | None = None) -> dict[str, Any]:
    """Single-process evaluation of a plain (non-DeepSpeed) model, as the driver and export use it,
    on the device the model is on. `forward` replaces the model's own (e.g. an onnxruntime session
    with the same signature, which takes CPU tensors)."""
    from launcher.nn.device import module_device

    features = encode(task, tokenizer, examples, labels, max_length, stride, getattr(model, "casing", False))
    batches = length_grouped_batches([len(f.input_ids) for f in features], batch_size, 0, shuffle=False)
    model.eval()
    device = "cpu" if forward is not None else module_device(model)
    return evaluate_features(forward or model, task, labels, examples, features, batches, tokenizer.pad_token_id,
                             model.uses_token_type_ids, device, with_report)


def evaluate_features(forward: Callable, task: str, labels: list[str], examples: list[Example],
                      features: list[Feature], batches: list[list[int]], pad_id: int, with_type_ids: bool,
                      device: Any = "cpu", with_report: bool = False) -> dict[str, Any]:
    """The metrics of `forward` on features already encoded (export scores every variant on the same ones)."""
    preds, loss_sum, count = predict(forward, features, batches, [True] * len(batches), pad_id, with_type_ids, device)
    return score(task, labels, examples, features, preds, loss_sum, count, with_report)

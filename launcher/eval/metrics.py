"""Task metrics: entity-level P/R/F1 (seqeval) for NER; accuracy and macro-F1 for classification."""

from __future__ import annotations


def ner_metrics(gold: list[list[str]], pred: list[list[str]]) -> dict[str, float]:
    from seqeval.metrics import f1_score, precision_score, recall_score

    words = sum(len(g) for g in gold)
    correct = sum(a == b for g, p in zip(gold, pred) for a, b in zip(g, p))
    return {
        "eval_precision": float(precision_score(gold, pred, zero_division=0)),
        "eval_recall": float(recall_score(gold, pred, zero_division=0)),
        "eval_f1": float(f1_score(gold, pred, zero_division=0)),
        "eval_accuracy": correct / words if words else 0.0,
    }


def cls_metrics(gold: list[int], pred: list[int], num_labels: int) -> dict[str, float]:
    from sklearn.metrics import f1_score  # ships with seqeval

    correct = sum(g == p for g, p in zip(gold, pred))
    return {
        "eval_accuracy": correct / len(gold) if gold else 0.0,
        "eval_macro_f1": float(f1_score(gold, pred, labels=list(range(num_labels)), average="macro",
                                        zero_division=0)),
    }

"""Per-label evaluation reports: what users read to judge a run.

NER: entity-level precision/recall/F1/support per type with micro/macro/weighted averages, in
seqeval's default (conlleval-like) and strict IOB2 modes, plus the token-level report including `O`.
Classification: per-class precision/recall/F1/support and the confusion matrix.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def _plain(obj: Any) -> Any:
    """numpy scalars → Python numbers, recursively (for JSON)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if hasattr(obj, "item"):
        return obj.item()
    return obj


def ner_report(gold: list[list[str]], pred: list[list[str]]) -> dict:
    from seqeval.metrics import classification_report
    from seqeval.scheme import IOB2
    from sklearn.metrics import classification_report as token_report

    flat_gold = [t for seq in gold for t in seq]
    flat_pred = [t for seq in pred for t in seq]
    return _plain({
        "entity": classification_report(gold, pred, output_dict=True, zero_division=0),
        "entity_strict": classification_report(gold, pred, output_dict=True, mode="strict", scheme=IOB2,
                                               zero_division=0),
        "token": token_report(flat_gold, flat_pred, output_dict=True, zero_division=0),
    })


def cls_report(gold: list[int], pred: list[int], labels: list[str]) -> dict:
    from sklearn.metrics import classification_report, confusion_matrix

    ids = list(range(len(labels)))
    return _plain(
        {
            "classes": classification_report(
                gold, pred, labels=ids, target_names=labels, output_dict=True, zero_division=0
            ),
            "confusion_matrix": {
                "labels": labels,
                "rows_gold_cols_pred": confusion_matrix(gold, pred, labels=ids).tolist(),
            },
        }
    )


def report_table(report: dict, title: str) -> Table:
    """The per-label table: entity level (default mode) for NER, classes for classification."""
    section = report.get("entity") or report.get("classes") or {}
    table = Table(title=title)
    for col in ("label", "precision", "recall", "f1", "support"):
        table.add_column(col, justify="left" if col == "label" else "right")
    for label, row in section.items():
        if not isinstance(row, dict):  # sklearn's plain "accuracy" entry
            continue
        name = f"[bold]{label}[/]" if label.endswith("avg") else label
        table.add_row(name, f"{row['precision']:.4f}", f"{row['recall']:.4f}", f"{row['f1-score']:.4f}",
                      str(int(row["support"])))
    return table


def print_report(report: dict, title: str, console: Console) -> None:
    console.print(report_table(report, title))
    if "entity_strict" in report:
        strict = report["entity_strict"].get("micro avg", {})
        token = report["token"]
        console.print(f"strict IOB2 micro F1 {strict.get('f1-score', 0):.4f}; token level (incl. O): "
                      f"accuracy {token.get('accuracy', 0):.4f}, macro F1 {token['macro avg']['f1-score']:.4f}",
                      highlight=False)
    if "confusion_matrix" in report:
        cm = report["confusion_matrix"]
        table = Table(title="confusion matrix (rows: gold, columns: predicted)")
        table.add_column("")
        for label in cm["labels"]:
            table.add_column(label, justify="right")
        for label, row in zip(cm["labels"], cm["rows_gold_cols_pred"]):
            table.add_row(label, *map(str, row))
        console.print(table)

"""The bundle's model card (README.md beside the model): what it predicts, how well each variant does on
the validation and test splits, how it was trained, and how to load it from Python, any onnxruntime
binding and HTTP. Written from the manifest and the run's recipe alone, with no path of the machine
that trained it (a bundle is copied to the machines that serve it)."""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

from zeroship.casing import NAMES as CASING_NAMES
from zeroship.tasks import Task

METRIC_NAMES = {"eval_f1": "entity-level F1 (seqeval, BIO)", "eval_accuracy": "accuracy",
                "eval_macro_f1": "macro F1", "eval_precision": "entity-level precision",
                "eval_recall": "entity-level recall", "eval_loss": "cross-entropy loss"}
VARIANT_ORDER = ("fp32", "optimized", "int8", "fp16")


def encoder_name(encoder: str) -> str:
    """How the card names the encoder: a packaged model by its name, a folder by its last part only."""
    if encoder.startswith("packaged:"):
        return encoder.split(":", 1)[1]
    return PurePosixPath(encoder.replace("\\", "/")).name or encoder


def _value(metrics: dict | None, metric: str) -> str:
    value = (metrics or {}).get(metric)
    return f"{value:.4f}" if isinstance(value, (int, float)) else "—"


def quality_table(manifest: dict) -> list[str]:
    metric = manifest["metric"]
    val, test = manifest.get("metrics", {}), manifest.get("test_metrics") or {}
    drops = manifest.get("metric_drop_points", {})
    rows = ["| variant | file | validation | test | drop vs PyTorch (validation, points) |",
            "|---|---|---|---|---|",
            f"| PyTorch (reference) | — | {_value(val.get('torch'), metric)} | "
            f"{_value(test.get('torch'), metric)} | — |"]
    for name in VARIANT_ORDER:
        entry = manifest.get("variants", {}).get(name)
        if entry is None:
            continue
        key = "onnx" if name == "fp32" else name
        how = f" ({entry['method']})" if entry.get("method") else ""
        drop = f"{drops[name]:+.2f}" if name in drops else "0.00 (parity-checked)" if name == "fp32" else "—"
        rows.append(f"| {name}{how} | `{entry['file']}` | {_value(val.get(key), metric)} | "
                    f"{_value(test.get(key), metric)} | {drop} |")
    return rows


def training_summary(recipe: dict) -> list[str]:
    model, data, train = recipe.get("model", {}), recipe.get("data", {}), recipe.get("train", {})
    ds, scaling, reg = recipe.get("deepspeed", {}), recipe.get("scaling", {}), recipe.get("regularization", {})
    lines = [f"- encoder: `{encoder_name(str(model.get('encoder', '?')))}`, head: {model.get('head', {})}"]
    if model.get("lora"):
        lines.append(f"- LoRA adapters (merged into the weights): {model['lora']}")
    steps = f"{train.get('max_steps')} optimizer steps" if train.get("max_steps") else f"{train.get('epochs')} epochs"
    lines.append(f"- {steps}, lr {train.get('lr')}, {train.get('schedule')} schedule, batch {train.get('batch_size')}"
                 f" × {train.get('grad_accum', 1)} accumulation × {scaling.get('workers')} workers, seed "
                 f"{train.get('seed')}")
    lines.append(f"- DeepSpeed ZeRO stage {ds.get('zero_stage')}, precision {ds.get('precision')}")
    active = {k: v for k, v in reg.items() if v not in (None, 0, 0.0, False)}
    if active:
        lines.append("- regularization: " + ", ".join(f"{k} {v}" for k, v in sorted(active.items())))
    augmentation = {k: v for k, v in (data.get("augmentation") or {}).items() if v}
    if augmentation:
        lines.append("- augmentation: " + ", ".join(f"{k} {v}" for k, v in sorted(augmentation.items())))
    return lines


def node_usage(manifest: dict[str, Any], ner: bool, every: bool) -> list[str]:
    """How to load the folder with Transformers.js (Node.js or the browser), or why not to."""
    if manifest.get("casing"):
        return ["Transformers.js: its pipeline feeds zero token types, not the casing classes this model reads; "
                "use onnxruntime-node with the casing classes computed (zeroship's `examples/node`, engine "
                "`ort`).", ""]
    task = "token-classification" if ner else "text-classification"
    call = "'Mara Okafor joined Kestrel Systems.', { aggregation_strategy: 'simple' }" if ner else "'A text to label.'"
    lines = ["Node.js or the browser, with Transformers.js (`dtype: 'q8'` reads `onnx/model_quantized.onnx`, "
             "`'fp32'` `onnx/model.onnx`):", "", "```js",
             "import { pipeline, env } from '@huggingface/transformers';", "",
             "env.localModelPath = '/path/to/';  // the folder that holds this one",
             "env.allowRemoteModels = false;",
             f"const model = await pipeline('{task}', 'this-folder', {{ dtype: 'q8' }});",
             f"console.log(await model({call}));", "```", ""]
    if ner and not every:
        lines += ["(This model was trained on first sub-tokens only: `simple` aggregation splits words whose other "
                  "sub-tokens it mislabels; read each word's first sub-token instead.)", ""]
    return lines


def model_card(manifest: dict[str, Any], recipe: dict[str, Any]) -> str:
    task, metric = manifest["task"], manifest["metric"]
    ner = task == Task.TOKEN
    variants = manifest.get("variants", {})
    fp32 = variants.get("fp32", {}).get("file", "model.onnx")
    inputs = ", ".join(f"`{name}`" for name in manifest.get("inputs", {}))
    labels = ", ".join(f"`{label}`" for label in manifest["labels"])
    out = [
        f"# {manifest.get('run', 'zeroship model')}: {'named-entity recognition' if ner else 'text classification'}",
        "",
        f"An ONNX bundle exported by zeroship from run `{manifest.get('run')}`: "
        f"`{encoder_name(str(recipe.get('model', {}).get('encoder', '?')))}` fine-tuned for "
        + ("token classification with BIO tags." if ner else "sequence classification."),
        "",
        "## Labels",
        "",
        labels,
        "",
        f"## Quality ({METRIC_NAMES.get(metric, metric)})",
        "",
        *quality_table(manifest),
        "",
        f"Every variant other than fp32 is held to {manifest.get('metric_budget_points')} points of PyTorch's "
        "validation metric; fp32 matches PyTorch's logits to 1e-4 with the same argmax. The test column is "
        "empty when the run had no test split.",
        "",
        "## Input and windowing",
        "",
        f"- inputs {inputs} (int64, `[batch, sequence]`), output `logits` "
        + ("`[batch, sequence, labels]`" if ner else "`[batch, labels]`") + "; the label of index i is "
        "`config.json`'s `id2label[i]`",
        (f"- at most {manifest['max_length']} tokens per window (special tokens included); a longer text is cut "
         f"into windows that overlap by {manifest['stride']} tokens, and each word takes its prediction from the "
         "window where it sits most centrally" if ner else
         f"- at most {manifest['max_length']} tokens (special tokens included); a longer text is truncated"),
    ]
    every = bool(recipe.get("data", {}).get("label_all_tokens"))  # absent in runs before the option: first only
    if ner and every:
        out.append("- every sub-token was trained (`data.label_all_tokens`: a word's later sub-tokens as `I-X` "
                   "after a `B-X` word start): read each word's first sub-token, as zeroship's runtime does, or "
                   "aggregate every token (Transformers.js's `aggregation_strategy: 'simple'`) for the same entities")
    elif ner:
        out.append("- a word's label is its **first sub-token's** prediction: the model was trained on first "
                   "sub-tokens only, so read the others as noise (aggregation `first`)")
    if manifest.get("casing"):
        out.append("- `token_type_ids` carry each token's casing class (" + ", ".join(
            f"{i} {name}" for i, name in enumerate(CASING_NAMES)) + "), not segment ids: compute them as "
            "zeroship's runtime does (`zeroship/casing.py`), or load the bundle with `Predictor`")
    out += ["", "## Training", "", *training_summary(recipe), "",
            "## Use", "",
            "Python, with zeroship's runtime (onnxruntime, tokenizers and numpy; no torch):", "",
            "```python", "from export.runtime import Predictor", "",
            'predictor = Predictor.load("path/to/this/folder")  # variant="auto": int8 on CPU when present',
            'print(predictor.predict(["' + ("Mara Okafor joined Kestrel Systems." if ner else "A text to label.")
            + '"]))', "```", "",
            f"Any onnxruntime binding (C++, Java, C#, Go, Rust, Node): tokenize with `tokenizer.json` (Hugging "
            f"Face tokenizers), run `{fp32}` on {inputs}, take the argmax of `logits` and map it through "
            "`config.json`'s `id2label`" + (", reading each word's first sub-token" if ner else "") + ".",
            "", *node_usage(manifest, ner, every), "Over HTTP:", "", "```bash", "zeroship serve path/to/this/folder   # http://127.0.0.1:8000",
            "curl -s localhost:8000/predict -H 'content-type: application/json' -d '{\"texts\": [\"...\"]}'",
            "```", ""]
    return "\n".join(out)

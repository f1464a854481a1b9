"""End to end: real Ray Train workers, real DeepSpeed (CPU, gloo), real models, through the CLI."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    TOY_CLS,
    TOY_NER,
    cli,
    evaluate_best_in_fresh_process,
    tiny_ner_recipe,
)

from launcher.driver.startup import PHASES

pytestmark = pytest.mark.e2e

def random_tagger_f1() -> float:
    """Chance level from the data: tag each validation word by sampling the train tag frequencies."""
    from seqeval.metrics import f1_score

    from launcher.data.parse import read_conll

    train, val = read_conll(str(TOY_NER / "train.conll")), read_conll(str(TOY_NER / "validation.conll"))
    tags = [t for ex in train for t in ex.tags]
    rng = random.Random(0)
    return f1_score([ex.tags for ex in val], [[rng.choice(tags) for _ in ex.tags] for ex in val])


def run_dir(tmp_path: Path, out: str) -> Path:
    status = sorted((tmp_path / "runs").glob("run-*/status.json"))
    assert status, out
    return status[-1].parent


def check_ner_run(run: Path, epochs: int) -> None:
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "succeeded" and status["error"] is None
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [e["epoch"] for e in evals] == list(range(1, epochs + 1))  # one line per evaluation
    # the first record says where the time before the first optimizer step went: every phase, in order
    first = records[0]
    assert first["kind"] == "startup" and first["from"] == "process" and first["resumed_from_step"] is None
    assert list(first["seconds"]) == [name for name, _, _ in PHASES] and min(first["seconds"].values()) >= 0
    assert abs(sum(first["seconds"].values()) - first["to_first_step_s"]) < 0.1  # the phases tile the total
    assert first["to_first_step_s"] < status["wall_seconds"] + first["seconds"]["launch_and_plan"]
    winner = status["winner"]
    assert winner["value"] == max(e["eval_f1"] for e in evals)
    # best/ loads into the model class in a fresh process and reproduces the winner's metric
    data = {"format": "conll", "train": str(TOY_NER / "train.conll"),
            "validation": str(TOY_NER / "validation.conll"), "test": None, "labels": None}
    again = evaluate_best_in_fresh_process(run / "best", data)
    assert abs(again["eval_f1"] - winner["value"]) <= 1e-6
    chance = random_tagger_f1()
    assert chance < 0.2
    assert winner["value"] >= chance + 0.5, (winner, chance)
    assert {"model.safetensors", "model.json", "metrics.json", "tokenizer.json"} <= {
        p.name for p in (run / "best").iterdir()}
    assert not (run / ".best.tmp").exists()


def test_ner_run_zero2(ner_run):
    check_ner_run(ner_run, epochs=2)
    # model.casing: the token-type table grew to the casing classes, whose rows started as copies of
    # the pretrained row 0 and trained apart (the classes reached the model through Ray Data and ZeRO-2)
    from safetensors.torch import load_file

    from zeroship.casing import CLASSES, LOWER, TITLE, UPPER

    table = load_file(str(ner_run / "best" / "model.safetensors"))["encoder.embeddings.token_type_embeddings.weight"]
    assert table.shape[0] == CLASSES and json.loads((ner_run / "best" / "model.json").read_text())["casing"] is True
    assert not torch.equal(table[TITLE], table[LOWER]) and not torch.equal(table[UPPER], table[LOWER])


def test_sequence_classification_zero_auto_is_stage0_on_cpu(cls_run):
    # zero_stage auto on CPU workers: stage 0, said on the console, recorded with the model
    console = (cls_run.parent.parent / "console.txt").read_text()
    assert f"{cls_run.name}: zero_stage auto → ZeRO-0 (" in console and "CPU workers" in console
    assert json.loads((cls_run / "best" / "model.json").read_text())["zero_stage"] == 0
    status = json.loads((cls_run / "status.json").read_text())
    metrics = json.loads((cls_run / "best" / "metrics.json").read_text())
    labels = [line.rsplit(",", 1)[1] for line in (TOY_CLS / "validation.csv").read_text().splitlines()[1:]]
    majority = max(labels.count(x) for x in set(labels)) / len(labels)
    assert status["state"] == "succeeded" and status["winner"]["metric"] == "eval_accuracy"
    assert abs(metrics["validation"]["eval_accuracy"] - status["winner"]["value"]) <= 1e-6
    assert metrics["validation"]["eval_accuracy"] >= majority + 0.3, (metrics, majority)
    assert "test" in metrics


def test_malformed_data_fails_before_ray(tmp_path):
    bad = tmp_path / "bad.conll"
    bad.write_text("Anna B-PER\nruns O\n\nBerlin\n")
    recipe = tiny_ner_recipe(tmp_path, data={"train": str(bad)})
    start = time.time()
    res = cli("launch", str(recipe))
    assert res.returncode == 2
    assert f"{bad}:4" in res.stderr and "Traceback" not in res.stderr
    assert time.time() - start < 30 and "ray" not in res.stdout.lower()
    assert not (tmp_path / "runs").exists()  # no run allocated for a recipe that cannot start


def test_unschedulable_run_is_marked_failed(tmp_path, ray_tmp):
    recipe = tiny_ner_recipe(tmp_path, scaling={"workers": 64})
    res = cli("launch", str(recipe), env={"ZEROSHIP_RAY_TMPDIR": ray_tmp})
    assert res.returncode == 2, res.stderr
    assert "64 workers" in res.stderr
    run = run_dir(tmp_path, res.stderr)
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "failed" and "64 workers" in status["error"]
    assert not (run / "best").exists()
    # a local Ray's CPUs are known before it starts: none was started for a run it could not hold
    assert not list(Path(ray_tmp).iterdir()) and "ray:" not in res.stdout


def test_warm_start_with_every_regularizer_freezes_and_stops_early(tmp_path, ray_tmp, ner_run):
    """A child of the session run (`model.init_from` its best/) with every regularizer on at ZeRO-2, 2 workers
    (one launch for warm start and regularization, ~100 CPU-s less than one each): before any step it scores
    what the parent's winner scored; each term shows up in the logged loss; the frozen layers stay
    bit-identical to the parent's; and early stopping halts both ranks at the same step."""
    from safetensors.torch import load_file

    parent = json.loads((ner_run / "status.json").read_text())
    recipe = tiny_ner_recipe(
        tmp_path, model={"init_from": str(ner_run / "best"), "casing": True, "freeze": 1},
        train={"epochs": 1, "eval_every": 4, "metric": "eval_loss",
               "early_stopping": {"patience": 1, "min_delta": 10.0}},  # nothing improves by 10: stop at eval 2
        regularization={"l2_sp": 0.01, "l2_head": 0.001, "r_drop": 1.0, "fgm_epsilon": 0.5,
                        "label_smoothing": 0.1})  # no encoder dropout: refused on a warm start (LoRA run has it)
    res = cli("launch", str(recipe), env={"ZEROSHIP_RAY_TMPDIR": ray_tmp})
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    run = run_dir(tmp_path, res.stdout)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["kind"] for x in lines[:3]] == ["startup", "initial", "eval"]
    initial = lines[1]
    assert initial["step"] == 0 and lines[0]["seconds"]["first_step"] > 0
    # before any step, the child scores what the parent's winner scored on the same validation data
    assert abs(initial["eval_f1"] - parent["winner"]["value"]) <= 1e-6
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "succeeded" and status["parent"] == str(ner_run / "best")
    assert "early stopping" in status["stop_reason"]
    evals = [x for x in lines if x["kind"] == "eval"]
    assert [e["step"] for e in evals] == [4, 8]  # both ranks stopped together (else the run would hang)
    for term in ("l2_sp", "r_drop", "fgm", "l2_head", "ce"):
        assert evals[1][f"train_loss_{term}"] > 0, term
    baseline = [json.loads(line) for line in (ner_run / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    assert not any(k.startswith("train_loss_") and k != "train_loss_ce" for k in baseline[0])  # absent when off
    # freeze: 1 → embeddings and layer 0 are bit-identical to the parent's, but for the casing classes'
    # table, which trains whatever is frozen (tests/base/test_casing.py)
    start = load_file(str(ner_run / "best" / "model.safetensors"))
    trained = load_file(str(run / "best" / "model.safetensors"))
    casing = "encoder.embeddings.token_type_embeddings.weight"
    frozen = [k for k in trained if k.startswith(("encoder.embeddings.", "encoder.encoder.layer.0.")) and k != casing]
    assert frozen and all(torch.equal(trained[k], start[k]) for k in frozen)
    assert not torch.equal(trained[casing], start[casing])
    moved = [k for k in trained if k.startswith("encoder.encoder.layer.1.") and k in start]
    assert any(not torch.equal(trained[k], start[k]) for k in moved)  # the rest did train

    res = cli("zeroship", "runs", "--runs", str(tmp_path / "runs"))
    row = next(line for line in res.stdout.splitlines() if run.name in line)
    assert "parent" in res.stdout and row.count(ner_run.name) == 2  # the child's own id, and its parent's
    # a label set that drops the parent's labels is refused before anything starts
    bad = tmp_path / "bad"
    bad.mkdir()
    recipe = tiny_ner_recipe(bad, model={"init_from": str(ner_run / "best"), "casing": True},
                             data={"labels": ["O", "B-PER", "I-PER"]})
    short = tmp_path / "short.conll"
    short.write_text("Mara B-PER\nOkafor I-PER\nleft O\n")
    recipe.write_text(recipe.read_text().replace(str(TOY_NER / "train.conll"), str(short))
                      .replace(str(TOY_NER / "validation.conll"), str(short)))
    res = cli("launch", "--check", str(recipe))
    assert res.returncode == 2 and "drops or renames" in res.stderr and "init_from_head" in res.stderr


def test_lora_run_merges_its_adapters_into_best_and_exports(tmp_path, ray_tmp):
    """LoRA at ZeRO-2 with 2 workers: best/ is a plain model whose logits match the unmerged
    adapters' from the winning checkpoint; the base encoder's untargeted weights never moved."""
    from conftest import train_run
    from safetensors.torch import load_file

    from launcher.data.features import collate, encode
    from launcher.data.parse import read_conll
    from launcher.nn.model import apply_lora, build_model, load_model
    from launcher.worker.checkpoint import STATE_FILE, merged_state_dict

    lora = {"r": 8, "alpha": 16, "dropout": 0.0, "targets": ["query", "key", "value", "dense"]}
    # with the encoder's dropout overridden too, end to end (its effect on the modules: tests/nn/test_model.py)
    run = train_run(tmp_path, ray_tmp, model={"lora": lora, "freeze": "none"}, train={"epochs": 1, "lr": 2e-3},
                    regularization={"hidden_dropout": 0.2, "attention_dropout": 0.0})
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "succeeded"
    merged, meta = load_model(run / "best")
    saved = load_file(str(run / "best" / "model.safetensors"))
    assert not any("lora_" in k or "base_layer" in k for k in saved)  # a plain encoder
    recipe = yaml_load(run / "recipe.yaml")
    pretrained = build_model(recipe["model"] | {"lora": None}, meta["labels"])
    for name, p in pretrained.encoder.named_parameters():
        got = dict(merged.encoder.named_parameters())[name]
        if "embeddings" in name or "LayerNorm" in name:
            assert torch.equal(got, p), name  # frozen and not targeted: bit-identical
    q = "encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(dict(merged.encoder.named_parameters())[q], dict(pretrained.encoder.named_parameters())[q])

    winner = status["winner"]["step"]
    ckpt = next(p.parent for p in sorted((run / "ray" / "train").glob(f"checkpoint_*/{STATE_FILE}"))
                if json.loads(p.read_text())["step"] == winner)
    unmerged = build_model(recipe["model"], meta["labels"], pretrained=False)
    apply_lora(unmerged, recipe["model"]["lora"])
    unmerged.load_state_dict(merged_state_dict(ckpt), strict=False)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(run / "best"))
    feats = encode("token_classification", tok, read_conll(str(TOY_NER / "validation.conll"))[:16],
                   meta["labels"], 48, 8)
    batch = collate(feats, tok.pad_token_id, merged.uses_token_type_ids)
    batch.pop("labels")
    with torch.no_grad():
        a, b = unmerged.eval()(**batch), merged.eval()(**batch)
    assert torch.allclose(a, b, atol=1e-4), float((a - b).abs().max())

    res = cli("zeroship", "export", "onnx", run.name, "--runs", str(run.parent))
    assert res.returncode == 0, res.stderr[-3000:]
    assert (run / "onnx" / "manifest.json").is_file()


def yaml_load(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())

"""Real sweeps on local Ray: a grid under ASHA and a k-fold grid; trials are recorded, the winner is the best
evaluation of all."""

from __future__ import annotations

import hashlib
import json

import pytest
import yaml
from conftest import cli, tiny_ner_recipe
from test_e2e_train import evaluate_best_in_fresh_process

pytestmark = pytest.mark.e2e


def test_grid_sweep_with_asha_winner_is_best_evaluation_over_all_trials(tmp_path, ray_tmp):
    # A grid (head size × lr: 1 × 2 points) under ASHA, one trial at a time (the k-fold test below runs
    # two at once). At lr 1e-7 (encoder and head) trial-1 barely learns: at the first rung (step 5) it is
    # behind what trial-0 recorded there and is stopped. Tune's stop reaches the trial's workers some
    # seconds after that report while they train on, so the trial is left 35 of its 40 steps: with 10 left
    # (a rung at step 10 of 20) a busy CI machine once let it finish first. eval_loss is continuous, so
    # the winner is unambiguous (F1 ties on the toy data). Head size 32 is not the recipe's own (64):
    # best/ must be rebuilt with the winner's.
    recipe = tiny_ner_recipe(
        tmp_path, scaling={"workers": 1},
        train={"epochs": 1, "max_steps": 40, "eval_every": 5, "metric": "eval_loss", "head_lr": None},
        sweep={"method": "grid", "parameters": {"model.head.dim": [32], "train.lr": [4e-4, 1e-7]},
               "scheduler": "asha", "max_concurrent": 1})
    res = cli("launch", str(recipe), env={"ZEROSHIP_RAY_TMPDIR": ray_tmp})
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    run = tmp_path / "runs" / "run-1"
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "succeeded"
    assert [t["params"] for t in status["trials"]] == [
        {"model.head.dim": 32, "train.lr": lr} for lr in (4e-4, 1e-7)]  # the grid, in order
    states = {t["name"]: t["state"] for t in status["trials"]}
    assert states == {"trial-0": "done", "trial-1": "pruned"}, states
    assert "pruned" in res.stdout and "sweep trials" in res.stdout
    evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert sorted({e["trial"] for e in evals}) == ["trial-0", "trial-1"]
    trial1 = sorted(e["step"] for e in evals if e["trial"] == "trial-1")
    assert trial1[0] == 5 and trial1[-1] < 40, trial1  # stopped after the first rung, before its end
    best = min(evals, key=lambda e: e["eval_loss"])
    winner = status["winner"]
    assert (winner["trial"], winner["step"]) == (best["trial"], best["step"])
    assert winner["value"] == best["eval_loss"] and winner["params"]["train.lr"] == 4e-4
    # each trial's resolved recipe is recorded, and the winner's params are the ones it ran with
    trial_recipe = yaml.safe_load((run / "trials" / f"{winner['trial']}.yaml").read_text())
    assert trial_recipe["train"]["lr"] == winner["params"]["train.lr"]
    assert trial_recipe["model"]["head"]["dim"] == winner["params"]["model.head.dim"]
    assert len(status["trials"]) == 2 and not any(t["error"] for t in status["trials"])
    # the trials share one data variant: Ray Data tokenized each split once, before the first trial
    # (its own statistics), and no trial's workers tokenized anything
    data = status["data"]
    (shared,) = data["shared"]
    assert shared["trials"] == 2 and shared["tokenized"].startswith("once")
    assert shared["train"]["examples"] == 600 and shared["validation"]["examples"] == 150
    assert shared["train"]["windows"] >= 600 and shared["validation"]["windows"] >= 150
    # (a trial ASHA stopped ends before it reports its tally)
    assert "trial-0" in data["trials"] and set(data["trials"]) <= {"trial-0", "trial-1"}
    for tally in data["trials"].values():
        assert tally["train"]["examples"] == 0 and tally["validation"]["examples"] == 0, tally
    # best/ is the winner, rebuilt with the winner's head size, and reproduces its metric
    meta = json.loads((run / "best" / "model.json").read_text())
    assert meta["head"]["dim"] == winner["params"]["model.head.dim"]
    again = evaluate_best_in_fresh_process(run / "best", trial_recipe["data"] | {"labels": None, "test": None})
    assert again["eval_loss"] == pytest.approx(winner["value"], abs=1e-5)


def test_kfold_with_grid_scores_points_by_fold_mean_and_refits(tmp_path, ray_tmp):
    import statistics

    from conftest import TOY_NER

    from launcher.data.parse import read_conll

    sentences = (TOY_NER / "train.conll").read_text().split("\n\n")[1:151]  # 150 sentences, no DOCSTART
    small = tmp_path / "small.conll"
    small.write_text("\n\n".join(sentences) + "\n")
    n = len(read_conll(str(small)))
    recipe = tiny_ner_recipe(
        tmp_path, data={"train": str(small), "stride": 4}, scaling={"workers": 1},
        train={"epochs": 1, "metric": "eval_loss"}, sweep={"kfold": 2, "parameters": {"data.max_length": [48, 12]}})
    res = cli("launch", str(recipe), env={"ZEROSHIP_RAY_TMPDIR": ray_tmp})
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    run = tmp_path / "runs" / "run-1"
    folds = json.loads((run / "trials" / "folds.json").read_text())
    # each sentence validates in exactly one fold, chosen by the documented hash of its file:line
    expected = [0, 0]
    for ex in read_conll(str(small)):
        expected[int.from_bytes(hashlib.blake2b(ex.where.encode(), digest_size=8).digest(), "big") % 2] += 1
    assert folds["k"] == 2 and folds["held_out"] == expected and sum(expected) == n and min(expected) > 0
    status = json.loads((run / "status.json").read_text())
    assert len(status["trials"]) == 4
    evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    best = {}
    for e in evals:
        best[e["trial"]] = min(best.get(e["trial"], float("inf")), e["eval_loss"])
    # each point trains on data tokenized at its own max_length: at 12 (windows of 10 subtokens, stride 4)
    # these 150 sentences make about twice as many windows as at 48, so the same folds take more steps
    steps = {}
    for e in evals:
        steps[e["trial"]] = max(steps.get(e["trial"], 0), e["step"])
    for fold in range(2):
        assert steps[f"trial-{2 + fold}"] > steps[f"trial-{fold}"], steps
    for point in status["cross_validation"]:
        names = [t["name"] for t in status["trials"] if t["point"] == point["point"]]
        values = [best[name] for name in sorted(names, key=lambda x: int(x.split("-")[1]))]
        assert point["folds"] == pytest.approx(values, abs=1e-12)
        assert point["mean"] == pytest.approx(statistics.fmean(values), abs=1e-12)
        assert point["std"] == pytest.approx(statistics.stdev(values), abs=1e-12)
    top = min(status["cross_validation"], key=lambda p: p["mean"])
    winner = status["winner"]
    assert winner["trial"] == "refit" and winner["params"] == top["params"] and winner["cv_mean"] == top["mean"]
    assert any(e["trial"] == "refit" for e in evals) and (run / "best" / "model.safetensors").is_file()
    assert "2-fold cross-validation" in res.stdout
    # each max_length tokenized the training sentences once for its two folds' trials and the refit (Ray
    # Data's statistics); the trials' workers filtered their folds out of it and tokenized nothing
    data = status["data"]
    assert [(v["trials"], v["train"]["examples"]) for v in data["shared"]] == [(2, n), (2, n)], data["shared"]
    assert data["shared"][1]["train"]["windows"] > data["shared"][0]["train"]["windows"]  # 12 makes more windows
    assert set(data["trials"]) == {f"trial-{i}" for i in range(4)}
    assert all(t["train"]["examples"] == t["validation"]["examples"] == 0 for t in data["trials"].values())

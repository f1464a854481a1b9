"""Each epoch's order over the ranks (launcher.data.stream) with real Ray Train workers and real Ray Data: in
epoch 1 every rank's share spans the whole file; later epochs deal the kept pieces afresh over the ranks (a
global shuffle), with every training window once per epoch and the corpus tokenized once."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT, TOY_NER, tiny_ner_recipe

from launcher.data.parse import read_conll

pytestmark = pytest.mark.e2e

ORDER = r"""
import json, os, sys
import ray.train
from ray.train.torch import TorchTrainer
from launcher.data import stream
from launcher.data.ingest import build_datasets
from launcher.data.parse import load_dataset
from launcher.driver.trainer import shard_config
from launcher.recipe.schema import load_recipe
from zeroship.ray_session import init_ray

recipe, out = load_recipe(sys.argv[1]), sys.argv[2]
# the private loopback Ray first, as the driver does: Ray Data would otherwise start a default one, and
# build_datasets sizes its tokenization tasks by the cluster's CPUs
init_ray()
dataset = load_dataset(recipe.as_dict()["data"], recipe.model.task, sample="train")
datasets = build_datasets(recipe, dataset.labels, dataset.splits["train"].examples, 600)

def worker(config):
    # the one stand-in: a batch's rows as their `where` (file:line) instead of model inputs
    stream.features = lambda columns, rows: [str(columns["where"][i]) for i in rows]
    shards = stream.Shards(recipe.model.task, dataset.labels, 16, 7, keep=True)
    epochs = [[w for batch in shards.epoch(e) for w in batch] for e in (1, 2, 3)]
    rank = ray.train.get_context().get_world_rank()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
        json.dump({"epochs": epochs, "data": shards.data_record()}, fh)

# half a CPU per worker: Ray Data keeps the rest (a launch declares a CPU more than the machine has)
TorchTrainer(worker, datasets=datasets, dataset_config=shard_config(),
             scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5})).fit()
"""


def test_every_rank_spans_the_file_and_later_epochs_are_dealt_afresh(tmp_path, ray_tmp):
    recipe = tiny_ner_recipe(tmp_path)
    res = subprocess.run([sys.executable, "-c", ORDER, str(recipe), str(tmp_path)], capture_output=True, text=True,
                         cwd=ROOT, timeout=600, env={"PATH": "/usr/bin:/bin", "ZEROSHIP_RAY_TMPDIR": ray_tmp,
                                                     "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    wheres = [ex.where for ex in read_conll(str(TOY_NER / "train.conll"))]
    position = {w: i for i, w in enumerate(wheres)}
    for e in range(3):
        got = [ranks[r]["epochs"][e] for r in (0, 1)]
        assert len(got[0]) == len(got[1]) == 300  # the same rows on each rank
        assert sorted(got[0] + got[1]) == sorted(wheres)  # every sentence once per epoch (one window each)
    first = [{position[w] for w in ranks[r]["epochs"][0]} for r in (0, 1)]
    for mine in first:  # epoch 1: each rank's share comes from every part of the file, not a contiguous half
        assert all(any(lo <= p < lo + 150 for p in mine) for lo in range(0, 600, 150))
    for r in (0, 1):
        seen = [set(ranks[r]["epochs"][e]) for e in range(3)]
        assert seen[1] != seen[0] and seen[2] != seen[1]  # a global reshuffle: other sentences, not just another order
        assert len(seen[1] & seen[0]) < 250
        assert ranks[r]["epochs"][1] != ranks[r]["epochs"][2]
    data = ranks[0]["data"]  # Ray Data's own statistics, over every pass rank 0 saw
    assert data["train"]["passes"] == 1 and data["train"]["examples"] == 600 and data["train"]["windows"] == 600

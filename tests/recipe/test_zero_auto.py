"""`deepspeed.zero_stage: auto`: which option it picks for a given model and hardware.

The expected choices are worked out by hand from DeepSpeed's byte counts per parameter (see
launcher/recipe/zero_auto.py): stage 0 needs 20 B, stage 1 4 B + 16 B / N, stage 2 2 B + 18 B / N, stage 3
4 B × the largest layer + 18 B / N on each device (N = workers); model states may use 70% of a device.
"""

from __future__ import annotations

import re

import pytest
from conftest import cli

from launcher.recipe.zero_auto import GiB, Option, choose, estimates, nothing_fits, resolve

B = 10**9


def pick(params: float, workers: int, device_gib: float | None, host_gib: float = 512, fgm: bool = False,
         largest: float = 50e6) -> Option | None:
    table = estimates(int(params), int(largest), workers, workers_per_node=min(workers, 8))
    chosen = choose(table, None if device_gib is None else int(device_gib * GiB), int(host_gib * GiB),
                    allow_stage3=not fgm)
    return chosen and chosen.option


@pytest.mark.parametrize("params,workers,device_gib,expected", [
    (110e6, 1, 16, Option(0)),  # BERT-base: 2.2 GB of 11.2 GiB
    (1.3e9, 8, 24, Option(1)),  # stage 0 26 GB > 16.8 GiB; stage 1 5.2 + 2.6 = 7.8 GB
    (7e9, 8, 80, Option(1)),  # stage 1: 28 + 14 = 42 GB ≤ 56 GiB
    (7e9, 8, 40, Option(2)),  # stage 1 42 GB > 28 GiB (30.1 GB); stage 2 14 + 15.75 = 29.75 GB fits
    (7e9, 8, 32, Option(3)),  # stage 2 29.75 GB > 24.1 GB; stage 3 0.2 + 15.75 = 15.95 GB
    (7e9, 4, 40, Option(2, "cpu")),  # stage 3 0.2 + 31.5 GB > 30.1 GB → offload: 14 GB on the device
])
def test_lowest_stage_that_fits(params, workers, device_gib, expected):
    assert pick(params, workers, device_gib) == expected


def test_offload_when_no_stage_fits_and_the_host_has_room():
    # 1.3B on one 24 GiB GPU: every stage needs ≥ 20 B × 1.3e9 = 26 GB; offloading the optimizer leaves
    # 2.6 GB on the device and needs 1.3e9 × 16 × 1.5 = 31.2 GB of host memory
    assert pick(1.3e9, 1, 24, host_gib=64) == Option(2, "cpu")
    assert pick(1.3e9, 1, 24, host_gib=32) is None  # 80% of 32 GiB is 27.5 GB: no room to offload to
    why = nothing_fits(estimates(int(1.3e9), int(50e6), 1, 1), 24 * GiB, 32 * GiB, True)
    assert why.startswith("only ZeRO-2 + offload optimizer→cpu fits the devices, and it needs 29.06 GiB of host")


def test_fgm_keeps_auto_off_stage3():
    # 70B on 8 × 80 GiB: nothing below stage 3 fits without offload; stage 3 + optimizer offload does
    # (device 4 × 50M + 2 × 70e9 / 8 = 17.7 GB; host 70e9 × 16 × 1.5 = 1.68 TB of 2 TiB × 0.8)
    assert pick(70e9, 8, 80, host_gib=2048) == Option(3, "cpu")
    # FGM needs whole embeddings (no stage 3): stage 2 + offload still keeps 2 B × 70e9 on each device
    assert pick(70e9, 8, 80, host_gib=2048, fgm=True) is None


def test_cpu_workers_get_stage0_whatever_the_size():
    assert pick(70e9, 8, None) == Option(0)


def test_resolve_replaces_auto_and_says_why(tmp_path):
    from conftest import tiny_ner_recipe

    from launcher.nn.model import build_model
    from launcher.recipe.schema import load_recipe

    recipe = load_recipe(tiny_ner_recipe(tmp_path, deepspeed={"zero_stage": "auto"}), [])
    model = build_model(recipe.as_dict()["model"], ["O", "B-PER", "I-PER"], pretrained=False)
    params = sum(p.numel() for p in model.parameters())
    out, why = resolve(recipe, model, None, 64 * GiB, 2)
    assert out.deepspeed.zero_stage == 0 and recipe.deepspeed.zero_stage == "auto"  # a copy
    assert why.startswith("zero_stage auto → ZeRO-0") and f"{params / 1e6:.1f}M parameters" in why
    out, why = resolve(recipe, model, 16 * GiB, 64 * GiB, 2)
    assert out.deepspeed.zero_stage == 0 and "fits in 70% of 16.00 GiB" in why
    with pytest.raises(ValueError, match="per device even at ZeRO"):
        resolve(recipe, model, 2**20, 2**20, 2)  # a 1 MiB device, no host to offload to


def test_check_previews_auto():
    # CPU workers: stage 0, said at once (no estimate needed, none of its imports paid)
    res = cli("launch", "--check", "recipes/quickstart_ner.yaml", env={"COLUMNS": "400"})
    assert res.returncode == 0, res.stderr
    assert "zero_stage auto → ZeRO-0 (CPU workers: no device memory to save)" in res.stdout
    assert '"stage": 0' in res.stdout and "model states" not in res.stdout
    # GPU workers: the estimate per option; with no GPU here, the choice is left to the workers
    res = cli("launch", "--check", "recipes/quickstart_ner.yaml", "scaling.use_gpu=true", env={"COLUMNS": "400"})
    assert res.returncode == 0, res.stderr
    assert re.search(r"model states \(2\d\.\dM parameters, 2 workers\): ZeRO-0 \d+ MiB/device; ZeRO-1", res.stdout)
    assert "each launch picks from the workers' GPU memory" in res.stdout

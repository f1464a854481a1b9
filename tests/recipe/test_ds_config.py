"""The DeepSpeed config a recipe becomes: what the workers add to it once they know the model."""

from __future__ import annotations

from launcher.recipe.ds_config import build_ds_config


def recipe(stage, config=None) -> dict:
    return {"deepspeed": {"zero_stage": stage, "offload_optimizer": "none", "offload_params": "none",
                          "precision": "bf16", "config": config or {}},
            "train": {"batch_size": 16, "grad_accum": 2}, "regularization": {"max_grad_norm": 1.0}}


def test_the_reduce_bucket_holds_the_trainable_parameters_and_no_more_than_deepspeeds_default():
    # DeepSpeed reserves its default 500,000,000 elements for any model (1 GB of bf16 on the GPU) at ZeRO-1-3
    assert build_ds_config(recipe(2), 2, 3_960_000)["zero_optimization"]["reduce_bucket_size"] == 3_960_000
    assert build_ds_config(recipe(3), 2, 3_960_000)["zero_optimization"]["reduce_bucket_size"] == 3_960_000
    assert build_ds_config(recipe(1), 1, 7 * 10**9)["zero_optimization"]["reduce_bucket_size"] == 500_000_000
    assert build_ds_config(recipe(2), 1, 0)["zero_optimization"]["reduce_bucket_size"] == 1  # DeepSpeed needs > 0


def test_without_the_model_or_at_zero_0_deepspeed_keeps_its_own_bucket():
    assert "reduce_bucket_size" not in build_ds_config(recipe(2), 2)["zero_optimization"]  # the driver's plan
    assert "reduce_bucket_size" not in build_ds_config(recipe(0), 2, 3_960_000)["zero_optimization"]


def test_the_recipes_own_deepspeed_config_still_wins():
    cfg = build_ds_config(recipe(2, {"zero_optimization": {"reduce_bucket_size": 1234}}), 2, 3_960_000)
    assert cfg["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1234}
    assert cfg["train_batch_size"] == 16 * 2 * 2

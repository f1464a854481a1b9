"""What `launcher.driver.trainer` hands Ray Train: on a lean private Ray (one run, no dashboard) every default
callback but the placement-group cleaner; on a cluster or the Ray of a sweep whose scheduler stops trials,
all of them."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("lean", [False, True])
def test_lean_runs_leave_out_only_the_placement_group_cleaner(lean):
    # the callback is imported from where zeroship.ray_compat takes it: a Ray upgrade that moves it fails here
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    from launcher.driver.trainer import trainer_class

    scaling = ray.train.ScalingConfig(num_workers=1)
    ours = trainer_class(lean)(lambda config: None, scaling_config=scaling)
    assert isinstance(ours, TorchTrainer)
    names = [type(cb).__name__ for cb in ours._create_default_callbacks()]
    rays = [type(cb).__name__ for cb in TorchTrainer(lambda config: None, scaling_config=scaling)
            ._create_default_callbacks()]
    assert "PlacementGroupCleanerCallback" in rays and "BackendSetupCallback" in rays
    expected = [n for n in rays if not (lean and n == PlacementGroupCleanerCallback.__name__)]
    assert names == expected


@pytest.mark.parametrize("sweep,stops", [
    (None, False),
    ({"parameters": {"train.lr": [1e-4, 2e-4]}}, False),  # a grid: every trial's fit ends by itself
    ({"kfold": 3, "parameters": {"train.lr": [1e-4, 2e-4]}}, False),
    ({"parameters": {"train.lr": [1e-4, 2e-4]}, "scheduler": "asha"}, True),  # ASHA kills pruned trials
])
def test_only_a_sweep_that_prunes_trials_keeps_the_cleaner_and_its_dashboard(tmp_path, sweep, stops):
    import yaml
    from conftest import tiny_ner_recipe

    from launcher.driver.cluster import stops_trials_early
    from launcher.recipe.schema import Recipe

    path = tiny_ner_recipe(tmp_path, **({"sweep": sweep} if sweep else {}))
    assert stops_trials_early(Recipe.model_validate(yaml.safe_load(path.read_text()))) is stops

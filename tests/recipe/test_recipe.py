"""Recipe schema: defaults, overrides, and a corpus of broken recipes that must fail cleanly."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import ROOT, cli

from launcher.recipe.schema import load_recipe, parse_override, sweep_points
from zeroship.errors import RecipeError

BROKEN = sorted((Path(__file__).parent / "broken").glob("*.yaml"))
SPECIAL = {"21_empty.yaml": "empty", "22_binary.yaml": "not UTF-8"}


def expectation(path: Path) -> str:
    if path.name in SPECIAL:
        return SPECIAL[path.name]
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect: "), f"{path.name} needs an '# expect:' first line"
    return first.removeprefix("# expect: ")


def test_corpus_is_large_enough():
    assert len(BROKEN) >= 25


@pytest.mark.parametrize("path", BROKEN, ids=lambda p: p.stem)
def test_broken_recipe_exits_2_with_field_path(path: Path):
    res = cli("launch", "--check", str(path), cwd=path.parent)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    assert expectation(path) in res.stderr, res.stderr
    # the message names the recipe file, or the data file and line the recipe led to
    assert path.name in res.stderr or re.search(r"\.conll:\d+", res.stderr), res.stderr


BROKEN_OVERRIDES = [
    (["train.lr=abc"], "train.lr"),
    (["train.lr"], "expected key.path=value"),
    (["train..lr=1"], "not a dotted field path"),
    (["deepspeed.zero_stage=9"], "deepspeed.zero_stage"),
    (["scaling.workers=-2"], "scaling.workers"),
    (["model.head.dimm=3"], "did you mean 'dim'"),
    (["train.batch_size=[1, 2"], "not valid YAML"),
    (["deepspeed.zero_stage=0", "deepspeed.offload_params=cpu"], "offload_params"),
    (["train.batch_size=[/x]"], "train.batch_size"),  # text that looks like console markup is printed as is
    # hostile values: YAML 1.1 coercions, non-finite numbers, past Python's integer digit limit
    (["train.epochs=true"], "got the boolean true"),
    (["train.epochs=1:30"], "got '1:30'"),
    (["train.lr=.nan"], "finite number"),
    (["regularization.l2_sp=1e999"], "finite number"),
    (["train.seed=" + "9" * 5000], "an integer of 5000 digits is too large"),
    (["deepspeed.config=" + "[" * 5000 + "]" * 5000], "nested deeper than 64 levels"),
    (["train={epochs: 2, epochs: 3}"], "duplicate key 'epochs'"),
    (["train.max_steps=0"], "train.max_steps"),
    (["deepspeed.zero_stage=auto", "deepspeed.offload_optimizer=cpu"], "zero_stage auto chooses offload itself"),
    (["train.max_steps=" + "9" * 12], "train.max_steps"),
]


@pytest.mark.parametrize("overrides,expected", BROKEN_OVERRIDES)
def test_broken_overrides_exit_2(overrides, expected):
    res = cli("launch", "--check", "recipes/quickstart_ner.yaml", *overrides)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    assert expected in res.stderr


def test_every_error_reported_at_once_with_lines(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        "model:\n  encoder: packaged:all-MiniLM-L6-v2\n  task: token_classification\n  haed: {}\n"
        "data:\n  format: conll\n  train: a\n  validation: b\n"
        "train:\n  lr: -1\n  epochs: 0\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    text = str(err.value)
    assert f"{path}:4 model.haed" in text and "did you mean 'head'" in text
    assert f"{path}:10 train.lr" in text
    assert f"{path}:11 train.epochs" in text


@pytest.mark.parametrize("recipe", ["quickstart_ner.yaml", "quickstart_cls.yaml", "large_ner.yaml"])
def test_shipped_recipes_check_ok(recipe):
    res = cli("launch", "--check", f"recipes/{recipe}")
    assert res.returncode == 0, res.stderr
    assert "zeroship plan" in res.stdout and "recipe OK" in res.stdout


def test_conll_recipe_validates_and_names_its_fetched_data():
    # its data is fetched at run time (benchmarks/conll.py), so only the schema is checked here
    recipe = load_recipe(ROOT / "recipes/conll2003_minilm.yaml")
    resolved = recipe.as_dict()
    assert recipe.model.encoder == "packaged:all-MiniLM-L6-v2" and recipe.metric == "eval_f1"
    assert resolved["data"]["train"] == str(ROOT / "recipes/data/conll2003/train.txt")


def test_check_prints_plan_details():
    # wide enough that no row wraps, whatever the checkout's path length (rich wraps at COLUMNS)
    res = cli("launch", "--check", "recipes/quickstart_ner.yaml", "scaling.workers=4", "train.grad_accum=2",
              "train.max_steps=50", env={"COLUMNS": "400"})
    assert res.returncode == 0, res.stderr
    assert "16/worker × 2 accum × 4 workers = 128 effective" in res.stdout
    assert "50 optimizer steps (train.max_steps), lr" in res.stdout
    assert "600 examples" in res.stdout  # rows counted from the data file
    assert '"stage": 0' in res.stdout  # the DeepSpeed config (zero_stage auto: 0 on CPU workers)
    assert "gloo, collective timeout 900 s" in res.stdout


def test_overrides_apply_and_parse_as_yaml():
    recipe = load_recipe(ROOT / "recipes/quickstart_ner.yaml",
                                   ["train.lr=3e-5", "scaling.workers=4", "data.labels=[O, B-PER, I-PER]"])
    resolved = recipe.as_dict()
    assert recipe.train.lr == 3e-5 and recipe.scaling.workers == 4
    assert recipe.data.labels == ["O", "B-PER", "I-PER"]
    assert resolved["data"]["train"].startswith(str(ROOT))  # relative to the recipe file
    assert parse_override("train.eval_every=epoch") == ("train.eval_every", "epoch")


def test_defaults_and_derived_values():
    recipe = load_recipe(ROOT / "recipes/quickstart_cls.yaml")
    assert recipe.metric == "eval_accuracy" and recipe.mode == "max"
    assert recipe.deepspeed.precision == "fp32" and recipe.run.storage == "runs"
    recipe = load_recipe(ROOT / "recipes/quickstart_ner.yaml", ["train.metric=eval_loss"])
    assert recipe.mode == "min"


def test_sweep_points_grid():
    recipe = load_recipe(ROOT / "recipes/large_ner.yaml",
                            ["sweep.parameters={train.lr: [1.0e-5, 2.0e-5], train.batch_size: [8, 16, 32]}"])
    points = sweep_points(recipe)
    assert len(points) == recipe.sweep_size() == 6
    assert {p["train.batch_size"] for p in points} == {8, 16, 32}


def test_sweep_points_random_is_seeded_and_draws_from_values():
    recipe = load_recipe(
        ROOT / "recipes/quickstart_ner.yaml",
        [
            "sweep={method: random, num_trials: 5, parameters: "
            "{train.lr: [1.0e-5, 2.0e-5, 3.0e-5], model.head.dim: [64, 128]}}"
        ],
    )
    points = sweep_points(recipe)
    assert len(points) == 5 == recipe.sweep_size()
    assert all(p["train.lr"] in (1e-5, 2e-5, 3e-5) and p["model.head.dim"] in (64, 128) for p in points)
    assert sweep_points(recipe) == points  # same seed, same trials


def test_cross_field_messages_with_semicolons_stay_whole():
    with pytest.raises(RecipeError) as err:
        load_recipe(ROOT / "recipes/quickstart_ner.yaml",
                    ["deepspeed.config.fp16.enabled=true", "deepspeed.config.bf16.enabled=true"])
    lines = [str(p) for p in err.value.problems]
    assert len(lines) == 1 and "fp16 and bf16 are both enabled; enable at most one" in lines[0]


def test_fgm_refused_on_zero3_but_l2_sp_accepted():
    with pytest.raises(RecipeError, match="fgm_epsilon: FGM needs whole word embeddings"):
        load_recipe(ROOT / "recipes/quickstart_ner.yaml", ["deepspeed.zero_stage=3", "regularization.fgm_epsilon=0.1"])
    recipe = load_recipe(
        ROOT / "recipes/quickstart_ner.yaml", ["deepspeed.zero_stage=3", "regularization.l2_sp=0.01"]
    )
    assert recipe.regularization.l2_sp == 0.01


def test_check_warns_when_this_machine_cannot_place_the_workers():
    # a cluster recipe may be checked on a laptop, so this is a warning (a local launch refuses it with exit 2)
    res = cli("launch", "--check", "recipes/quickstart_ner.yaml", "scaling.workers=64", env={"COLUMNS": "400"})
    assert res.returncode == 0, res.stderr
    out = res.stdout + res.stderr
    assert ("a launch on this machine would refuse: 64 workers × 1 CPU + 1 for reading data = 65 CPUs, but this"
            " machine has") in out
    assert "RAY_ADDRESS=<head>:6379 launch --check" in out


def test_a_recipe_is_updated_by_copy_and_travels_to_workers_as_itself():
    import pickle

    recipe = load_recipe(ROOT / "recipes/quickstart_ner.yaml")
    moved = recipe.updated({"run.storage": "/mnt/elsewhere", "deepspeed.zero_stage": 2})
    assert moved.run.storage == "/mnt/elsewhere" and moved.deepspeed.zero_stage == 2
    assert recipe.run.storage == "runs" and recipe.deepspeed.zero_stage == "auto"  # the original is untouched
    with pytest.raises(KeyError, match="run.nope"):
        recipe.updated({"run.nope": 1})
    with pytest.raises(KeyError, match="storage"):
        recipe.updated({"storage": "/x"})
    back = pickle.loads(pickle.dumps(moved))  # what Ray does to a worker's config
    assert back == moved and back.metric == "eval_f1" and back.as_dict()["run"]["storage"] == "/mnt/elsewhere"


def test_label_all_tokens_needs_an_i_label_for_each_b_label():
    with pytest.raises(RecipeError, match="B-LOC has no I-LOC"):
        load_recipe(ROOT / "recipes/quickstart_ner.yaml", ["data.labels=[O, B-PER, I-PER, B-LOC]"])
    recipe = load_recipe(ROOT / "recipes/quickstart_ner.yaml",
                         ["data.labels=[O, B-PER, I-PER, B-LOC]", "data.label_all_tokens=false"])
    assert recipe.data.label_all_tokens is False
    assert load_recipe(ROOT / "recipes/quickstart_ner.yaml").data.label_all_tokens is True  # the default


def test_a_run_recorded_before_label_all_tokens_resumes_without_it(tmp_path):
    import yaml

    from launcher.driver.launch import resume_run
    from launcher.runs.registry import Registry

    recorded = load_recipe(ROOT / "recipes/quickstart_ner.yaml").as_dict()
    run = Registry(tmp_path).allocate()
    (run.dir / "recipe.yaml").write_text(yaml.safe_dump(recorded))
    assert resume_run(run).data.label_all_tokens is True  # recorded with the option: as recorded
    del recorded["data"]["label_all_tokens"]
    (run.dir / "recipe.yaml").write_text(yaml.safe_dump(recorded))
    assert resume_run(run).data.label_all_tokens is False  # the earlier runs trained first sub-tokens only

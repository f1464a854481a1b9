"""The GPU suite: runs whenever CUDA is there (`make test-gpu` installs the CUDA stack first), skips
with its reason everywhere else, CI included.

Real launches on one GPU (NCCL, DeepSpeed's CUDA accelerator) at ZeRO 0/2/3 in bf16 and fp16,
ZeRO-3 with parameters offloaded to the CPU, a warm start, the fp16 ONNX variant checked on
onnxruntime's CUDA provider, the Predictor on CUDA, and the refusals for workers that would share
a GPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TOY_NER, cli, evaluate_best_in_fresh_process, tiny_ner_recipe

pytestmark = [
    pytest.mark.gpu, pytest.mark.e2e,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="no CUDA GPU here: the GPU suite runs on a GPU machine (make test-gpu)"),
]

# bf16/fp16 evaluation in the workers vs fp32 evaluation of the merged masters (see test_e2e_precision)
TOLERANCE = 0.02
DATA = {"format": "conll", "train": str(TOY_NER / "train.conll"),
        "validation": str(TOY_NER / "validation.conll"), "test": None, "labels": None}
ONE_GPU = {"workers": 1, "use_gpu": True, "gpus_per_worker": 1}


def launch_gpu(folder: Path, ray_tmp: str, **sections) -> tuple[Path, str]:
    sections.setdefault("train", {"epochs": 2})
    recipe = tiny_ner_recipe(folder, scaling=ONE_GPU, **sections)
    res = cli("launch", str(recipe), env={"ZEROSHIP_RAY_TMPDIR": ray_tmp})
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    runs = sorted((folder / "runs").glob("run-*"), key=lambda p: int(p.name.split("-")[1]))
    return runs[-1], res.stdout


def check_gpu_run(run: Path, out: str, precision: str, stage: int) -> None:
    assert "NCCL" in out  # the plan names the backend Ray Train sets up
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "succeeded", status
    meta = json.loads((run / "best" / "model.json").read_text())
    assert meta["training_precision"] == precision and meta["zero_stage"] == stage
    evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert all(e.get("train_peak_gpu_mb", 0) > 0 for e in evals)  # it really ran on the GPU
    # the tiny model's states, gradients and activations: on an H200 ZeRO-0 peaked at 157 MB, and ZeRO-2/3 at
    # 1,048-1,117 MB while DeepSpeed reserved its default reduce bucket (954 MB in bf16; launcher.recipe.ds_config)
    assert max(e["train_peak_gpu_mb"] for e in evals) < 600, [e["train_peak_gpu_mb"] for e in evals]
    again = evaluate_best_in_fresh_process(run / "best", DATA)  # fp32 masters, fresh process, CPU
    assert abs(again["eval_f1"] - status["winner"]["value"]) <= TOLERANCE, (again, status["winner"])
    assert again["eval_f1"] >= 0.8


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory) -> Path:
    import tempfile

    folder = tmp_path_factory.mktemp("gpu")
    with tempfile.TemporaryDirectory(prefix="zs-", dir="/tmp") as ray_tmp:
        run, out = launch_gpu(folder, ray_tmp, deepspeed={"zero_stage": 2, "precision": "bf16"})
    check_gpu_run(run, out, "bf16", 2)
    return run


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_launch_on_one_gpu(stage, precision, tmp_path, ray_tmp):
    run, out = launch_gpu(tmp_path, ray_tmp, deepspeed={"zero_stage": stage, "precision": precision})
    check_gpu_run(run, out, precision, stage)


def test_zero3_with_parameters_offloaded_to_cpu(tmp_path, ray_tmp):
    run, out = launch_gpu(tmp_path, ray_tmp, deepspeed={"zero_stage": 3, "precision": "bf16", "offload_params": "cpu",
                                                        "offload_optimizer": "cpu"})
    check_gpu_run(run, out, "bf16", 3)


def test_warm_start_on_gpu(gpu_run, tmp_path, ray_tmp):
    run, out = launch_gpu(tmp_path, ray_tmp, model={"init_from": str(gpu_run / "best")},
                          deepspeed={"zero_stage": 2, "precision": "bf16"}, train={"epochs": 1})
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    initial = [x for x in lines if x["kind"] == "initial"]
    assert initial and initial[0]["eval_f1"] >= 0.8  # the parent's weights, evaluated on the GPU first
    assert json.loads((run / "status.json").read_text())["state"] == "succeeded"


TEXTS = [" ".join(line.split()[0] for line in block.splitlines())
         for block in (TOY_NER / "validation.conll").read_text().strip().split("\n\n")]


def spans(predictions: list) -> list:
    return [[(e["label"], e["start"], e["end"]) for e in p] for p in predictions]


@pytest.fixture(scope="module")
def gpu_bundle(request) -> Path:
    """gpu_run exported with its fp16 variant (checked on onnxruntime's CUDA provider); skips before
    gpu_run trains where onnxruntime has no CUDA provider."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDA provider: make test-gpu installs onnxruntime-gpu")
    gpu_run = request.getfixturevalue("gpu_run")
    res = cli("zeroship", "export", "onnx", gpu_run.name, "--runs", str(gpu_run.parent), "--fp16")
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    return gpu_run / "onnx"


def test_fp16_export_checked_on_cuda_and_predictor_on_cuda(gpu_bundle):
    from export.runtime import Predictor

    bundle, texts = gpu_bundle, TEXTS
    fp16 = json.loads((bundle / "manifest.json").read_text())["variants"]["fp16"]["parity"]
    assert fp16["provider"] == "CUDAExecutionProvider" and fp16["io_binding"] and fp16["argmax_agreement"] >= 0.99
    cpu = spans(Predictor.load(bundle, variant="fp32").predict(texts))
    cuda32 = Predictor.load(bundle, variant="fp32", device="cuda")
    assert cuda32.io_binding and cuda32.session.get_providers()[0] == "CUDAExecutionProvider"
    assert spans(cuda32.predict(texts)) == cpu
    cuda16 = spans(Predictor.load(bundle, variant="fp16", device="cuda").predict(texts))
    same = sum(a == b for a, b in zip(cuda16, cpu)) / len(cpu)
    assert same >= 0.98, same  # fp16 may flip a near-tie; the metric gate is in the export


@pytest.mark.parametrize("runner", [[], ["--ray-serve"]], ids=["local", "ray"])
def test_serve_on_cuda_answers_as_the_predictor_on_cuda(gpu_bundle, runner):
    """`zeroship serve --device cuda`, in process and on Ray Serve (a replica holding the GPU): /metadata names
    the CUDA provider and the fp16 variant `auto` picks there, and the answers are the CUDA Predictor's."""
    import signal

    from conftest import Server, http

    from export.runtime import Predictor

    server = Server(gpu_bundle, "--device", "cuda", *runner)
    try:
        status, meta = http(f"{server.url}/metadata")
        assert meta["device"] == "cuda" and meta["provider"] == "CUDAExecutionProvider", meta
        assert meta["model"]["variant"] == "fp16"
        status, body = http(f"{server.url}/predict", json.dumps({"texts": TEXTS[:64]}).encode(), timeout=120)
        assert status == 200, body
        served = spans(body["predictions"])
        alone = spans(Predictor.load(gpu_bundle, variant="fp16", device="cuda").predict(TEXTS[:64]))
        # fp16 logits can differ in the last digit with the batch's shape: a near-tie may flip (as above)
        assert sum(a == b for a, b in zip(served, alone)) / len(alone) >= 0.98
    finally:
        code = server.stop(signal.SIGTERM)
    assert code == 0, server.output()


def test_two_workers_cannot_share_one_gpu(tmp_path):
    recipe = tiny_ner_recipe(tmp_path, scaling={"workers": 2, "use_gpu": True, "gpus_per_worker": 0.5})
    res = cli("launch", str(recipe), timeout=120)
    assert res.returncode == 2 and "NCCL refuses" in res.stderr and "Traceback" not in res.stderr
    if torch.cuda.device_count() == 1:
        recipe = tiny_ner_recipe(tmp_path, scaling={"workers": 2, "use_gpu": True, "gpus_per_worker": 1})
        res = cli("launch", str(recipe), timeout=300)
        assert res.returncode == 2 and "the cluster has 1 GPUs" in res.stderr, res.stderr[-2000:]

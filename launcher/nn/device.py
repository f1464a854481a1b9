"""Where tensors live: the one place that knows the device.

A Ray Train worker computes on `ray.train.torch.get_device()` (its GPU under `scaling.use_gpu`, which
honours CUDA_VISIBLE_DEVICES and the local rank; the CPU otherwise); the driver, which evaluates the
merged winner itself, uses its own GPU when it has one. Batches are built on the CPU by
`launcher.data.features.collate` and moved with `to_device` right before the forward pass: training,
evaluation, warm start and export parity all go through it, and nothing else calls `.cuda()`.
"""

from __future__ import annotations

from typing import Any

import torch


def worker_device() -> torch.device:
    """The device of this Ray Train worker (call inside the training function). Makes it the current
    CUDA device, so NCCL collectives and DeepSpeed use the same GPU as the batches."""
    from ray.train.torch import get_device

    device = get_device()
    if isinstance(device, list):  # several GPUs per worker: the model and its batches use the first
        device = device[0]
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def driver_device() -> torch.device:
    """The driver's device for its own evaluation of the merged model: a GPU if it has one."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def module_device(module: torch.nn.Module) -> torch.device:
    """Where a (plain, unpartitioned) module's weights are."""
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def to_device(batch: Any, device: torch.device | str) -> Any:
    """`batch` (tensors, or dicts/lists/tuples of them) with every tensor on `device`. Integer inputs
    keep their dtype: precision is DeepSpeed's business, not the batch's. Copies from the CPU are
    asynchronous on CUDA (the next kernel waits for them, the host does not)."""
    device = torch.device(device)
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=device.type == "cuda")
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch

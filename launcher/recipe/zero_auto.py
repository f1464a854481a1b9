"""`deepspeed.zero_stage: auto`: the lowest ZeRO stage (then offload) whose model states fit.

Model states (16-bit weights, gradients, fp32 master weights, Adam's two moments) are estimated with
DeepSpeed's own estimators for stages 2 and 3 (`estimate_zero{2,3}_model_states_mem_needs`); it has
none for stages 0 and 1, so those use the same per-parameter byte counts: 2 (16-bit weights)
+ 18 (16-bit and fp32 gradients, fp32 weights, two moments) — nothing partitioned at stage 0, the 16
fp32 bytes partitioned at stage 1. The counts assume mixed precision and every parameter trainable, so
they overestimate fp32 runs (16 bytes, not 20) and frozen/LoRA encoders: a safe side.

An option fits when its model states per device take at most `1 - ACTIVATION_MARGIN` of the smallest
worker device's memory — the rest is for activations, the CUDA context and the allocator, which grow
with batch × sequence length and are not estimated — and, when it offloads, its host memory per node
fits in 80% of the smallest node's RAM. CPU workers have no device memory to save: `auto` is stage 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from launcher.recipe.schema import Recipe

ACTIVATION_MARGIN = 0.3  # share of device memory kept for activations, CUDA context, fragmentation
HOST_SHARE = 0.8  # share of a node's RAM that offloaded states may use
GiB = 2**30


@dataclass(frozen=True)
class Option:
    stage: int
    offload_optimizer: str = "none"
    offload_params: str = "none"

    @property
    def label(self) -> str:
        off = [f"optimizer→{self.offload_optimizer}"] if self.offload_optimizer != "none" else []
        off += [f"params→{self.offload_params}"] if self.offload_params != "none" else []
        return f"ZeRO-{self.stage}" + (f" + offload {' '.join(off)}" if off else "")


# in the order `auto` tries them: partition more before offloading, offload the optimizer before params
OPTIONS = (Option(0), Option(1), Option(2), Option(3), Option(2, "cpu"), Option(3, "cpu"), Option(3, "cpu", "cpu"))


@dataclass(frozen=True)
class Estimate:
    option: Option
    device_bytes: int  # model states per worker device
    host_bytes: int  # per node (DeepSpeed's figure; it matters only when offloading)


def parameter_counts(model) -> tuple[int, int]:
    """(total parameters, largest single module's own parameters). Counted by object, not by
    storage as DeepSpeed's `model_to_params` does, so a model on the meta device (`--check`) counts
    too; tied weights are one Parameter and count once either way."""
    total = sum(p.numel() for p in model.parameters())
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)
    return total, largest


def size(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2**20:.0f} MiB"


def estimates(total: int, largest_layer: int, workers: int, workers_per_node: int) -> list[Estimate]:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    nodes = max(1, -(-workers // max(1, workers_per_node)))
    per_node = min(workers, max(1, workers_per_node))
    out = []
    for opt in OPTIONS:
        if opt.stage == 0:
            device, host = 20 * total, 0
        elif opt.stage == 1:
            device, host = 4 * total + 16 * total // workers, 0
        elif opt.stage == 2:
            host, device = estimate_zero2_model_states_mem_needs(
                total, per_node, nodes, cpu_offload=opt.offload_optimizer != "none")
        else:
            host, device, _ = estimate_zero3_model_states_mem_needs(
                total, largest_layer, per_node, nodes, cpu_offload=opt.offload_optimizer != "none",
                cpu_offload_params=opt.offload_params != "none")
        offloads = opt.offload_optimizer != "none" or opt.offload_params != "none"
        out.append(Estimate(opt, int(device), int(host) if offloads else 0))
    return out


def choose(table: list[Estimate], device_bytes: int | None, host_bytes: int | None,
           allow_stage3: bool = True) -> Estimate | None:
    """The first option that fits (None: nothing does). `device_bytes` None means CPU workers."""
    if device_bytes is None:
        return next(e for e in table if e.option == Option(0))
    for e in table:
        if e.option.stage == 3 and not allow_stage3:
            continue
        if e.device_bytes > (1 - ACTIVATION_MARGIN) * device_bytes:
            continue
        if e.host_bytes and (host_bytes is None or e.host_bytes > HOST_SHARE * host_bytes):
            continue
        return e
    return None


def describe(table: list[Estimate]) -> str:
    return "; ".join(f"{e.option.label} {size(e.device_bytes)}/device"
                     + (f" + {size(e.host_bytes)} host/node" if e.host_bytes else "") for e in table)


def resolve(recipe: Recipe, model, device_bytes: int | None, host_bytes: int | None,
            workers_per_node: int) -> tuple[Recipe, str]:
    """A copy of the recipe with `auto` replaced by the chosen stage/offload, and one line saying why.
    Raises ValueError when nothing fits (the message names the smallest option's need)."""
    total, largest = parameter_counts(model)
    table = estimates(total, largest, recipe.scaling.workers, workers_per_node)
    allow3 = not recipe.regularization.fgm_epsilon  # FGM needs whole embeddings (launcher.recipe.schema)
    pick = choose(table, device_bytes, host_bytes, allow3)
    if pick is None:
        raise ValueError(f"deepspeed.zero_stage auto: {total / 1e6:.0f}M parameters: "
                         + nothing_fits(table, device_bytes, host_bytes, allow3))
    where = ("CPU workers: no device memory to save" if device_bytes is None else
             f"{size(pick.device_bytes)} of model states per device fits in"
             f" {1 - ACTIVATION_MARGIN:.0%} of {size(device_bytes)}")
    why = f"zero_stage auto → {pick.option.label} ({total / 1e6:.1f}M parameters; {where})"
    chosen = recipe.updated({"deepspeed.zero_stage": pick.option.stage,
                             "deepspeed.offload_optimizer": pick.option.offload_optimizer,
                             "deepspeed.offload_params": pick.option.offload_params})
    return chosen, why


def nothing_fits(table: list[Estimate], device_bytes: int, host_bytes: int | None, allow3: bool) -> str:
    """Why no option fits: the device even at the leanest option, or the host for offloading."""
    usable = [e for e in table if allow3 or e.option.stage < 3]
    leanest = min(usable, key=lambda e: e.device_bytes)
    budget = (1 - ACTIVATION_MARGIN) * device_bytes
    if leanest.device_bytes > budget:
        return (f"{size(leanest.device_bytes)} per device even at {leanest.option.label}, more than"
                f" {1 - ACTIVATION_MARGIN:.0%} of the {size(device_bytes)} the smallest worker device has;"
                " add workers or use larger GPUs")
    fits = min((e for e in usable if e.device_bytes <= budget), key=lambda e: e.host_bytes)
    return (f"only {fits.option.label} fits the devices, and it needs {size(fits.host_bytes)} of host memory"
            f" per node, more than {HOST_SHARE:.0%} of the {size(host_bytes or 0)} the smallest node has;"
            " add workers or nodes with more memory")


def worker_memory(device) -> tuple[int | None, int, int]:
    """Called on every rank (a collective): the smallest worker device's memory (None on CPU
    workers), the smallest node's RAM, and the most workers on one node — so every rank makes the
    same choice."""
    import psutil
    import ray.train
    import torch
    import torch.distributed as dist

    mine = (torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None,
            psutil.virtual_memory().total, ray.train.get_context().get_local_world_size())
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    devices = [d for d, _, _ in everyone if d is not None]
    return (min(devices) if devices else None, min(h for _, h, _ in everyone), max(n for _, _, n in everyone))

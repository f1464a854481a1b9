"""The training loss and the regularizers that act inside it.

`TaskLoss` computes, for one batch: cross-entropy (with label smoothing) + R-Drop (symmetric KL
between two dropout passes) + FGM (the loss again on word embeddings pushed ε along their normalized
gradient) + L2-SP (α/2·‖θ−θ₀‖² toward the pretrained encoder) + a plain L2 on the head. Each term is
off unless its strength is set, and every term is returned separately so the run can log it.

L2-SP as a loss term reads whole parameters, which ZeRO stages 0–2 keep on every rank. Under ZeRO-3
each rank holds only a partition of every parameter, so `PartitionedL2SP` applies the same penalty
on the gradient side instead: θ₀ is each rank's partition at the start, and at every optimizer step
the rank adds α·(θ − θ₀) to its own gradient partition (the penalty is a sum over elements, so the
partitions' terms add up to the whole). FGM needs whole embeddings and stays on stages 0–2.

Device: θ₀ lives on the worker's device (given by `launcher.nn.device`), and every term is returned as
a detached device tensor, so a training step never waits for the GPU to report a number; the loop
reads them when it logs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def token_ce(logits: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                           ignore_index=-100, label_smoothing=smoothing)


def symmetric_kl(a: torch.Tensor, b: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """½(KL(p_a‖p_b) + KL(p_b‖p_a)), averaged over labelled positions."""
    a = a.reshape(-1, a.shape[-1]).float()
    b = b.reshape(-1, b.shape[-1]).float()
    keep = labels.reshape(-1) != -100
    la, lb = F.log_softmax(a[keep], -1), F.log_softmax(b[keep], -1)
    kl_ab = F.kl_div(lb, la, log_target=True, reduction="batchmean")  # KL(p_a ‖ p_b)
    kl_ba = F.kl_div(la, lb, log_target=True, reduction="batchmean")
    return 0.5 * (kl_ab + kl_ba)


class PartitionedL2SP:
    """L2-SP for ZeRO-3: α·(θ − θ₀) added to each rank's local gradient partition before the step."""

    def __init__(self, module: nn.Module, alpha: float, device: torch.device | str = "cpu"):
        from deepspeed.utils import safe_get_local_fp32_param

        self.alpha, self.device = alpha, torch.device(device)
        self.params = [p for _, p in module.encoder.named_parameters() if p.requires_grad]
        self.anchor = [safe_get_local_fp32_param(p).detach().clone() for p in self.params]

    def apply(self) -> torch.Tensor:
        """Call after backward at an accumulation boundary; returns the whole penalty α/2·‖θ−θ₀‖²
        (a device tensor: NCCL reduces on the GPU, and the loop reads it only when it logs)."""
        import torch.distributed as dist
        from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_grad, safe_set_local_grad

        # float64 accumulator on the worker's device (the fp32 partitions may sit on the CPU when
        # the optimizer is offloaded; NCCL reduces only GPU tensors)
        sq = torch.zeros((), dtype=torch.float64, device=self.device)
        for p, p0 in zip(self.params, self.anchor):
            diff = safe_get_local_fp32_param(p).detach() - p0
            grad = safe_get_local_grad(p)
            if grad is not None:
                safe_set_local_grad(p, grad + self.alpha * diff.to(grad.device, grad.dtype))
            sq += (diff.double() ** 2).sum().to(self.device)
        if dist.is_initialized():
            dist.all_reduce(sq)
        return (0.5 * self.alpha * sq).float()


class TaskLoss:
    """Everything that goes into one training step's loss."""

    def __init__(self, model: nn.Module, reg: dict[str, Any], partitioned: bool = False,
                 device: torch.device | str | None = None):
        self.smoothing = reg.get("label_smoothing", 0.0)
        self.r_drop = reg.get("r_drop", 0.0)
        self.fgm = reg.get("fgm_epsilon", 0.0)
        # under ZeRO-3 (partitioned) L2-SP acts on the gradients: see PartitionedL2SP
        self.l2_sp = 0.0 if partitioned else reg.get("l2_sp", 0.0)
        self.l2_head = reg.get("l2_head", 0.0)
        # θ₀: the pretrained encoder weights, taken once per worker before DeepSpeed wraps (and moves)
        # the model, kept in fp32 on the device the training step runs on
        self.anchor = ({n: p.detach().to(device or p.device, torch.float32, copy=True)
                        for n, p in model.encoder.named_parameters() if p.requires_grad}
                       if self.l2_sp else {})

    def __call__(self, model: nn.Module, forward: Callable, batch: dict[str, torch.Tensor],
                 labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`model` is the plain module (for parameters and embeddings); `forward` runs it (the engine).
        `batch` and `labels` are on the model's device. Returns the loss and each term (detached, fp32,
        still on the device)."""
        parts: dict[str, torch.Tensor] = {}
        if self.fgm:
            embeds = model.encoder.get_input_embeddings()(batch["input_ids"])
            if not embeds.requires_grad:  # frozen embeddings: FGM still needs the gradient w.r.t. them
                embeds = embeds.detach().requires_grad_(True)
            inputs = {k: v for k, v in batch.items() if k != "input_ids"}
            logits = forward(inputs_embeds=embeds, **inputs)
        else:
            logits = forward(**batch)
        parts["ce"] = token_ce(logits, labels, self.smoothing)
        if self.r_drop:
            second = forward(inputs_embeds=embeds, **inputs) if self.fgm else forward(**batch)
            parts["ce"] = 0.5 * (parts["ce"] + token_ce(second, labels, self.smoothing))
            parts["r_drop"] = self.r_drop * symmetric_kl(logits, second, labels)
        if self.fgm:
            (grad,) = torch.autograd.grad(parts["ce"], embeds, retain_graph=True)
            delta = self.fgm * grad / (grad.norm() + 1e-12)
            adv_logits = forward(inputs_embeds=embeds + delta.detach(), **inputs)
            parts["fgm"] = token_ce(adv_logits, labels, self.smoothing)
        if self.l2_sp:
            params = dict(model.encoder.named_parameters())
            sq = sum(((params[n].float() - p0) ** 2).sum() for n, p0 in self.anchor.items())
            parts["l2_sp"] = 0.5 * self.l2_sp * sq
        if self.l2_head:
            head = [p for n, p in model.named_parameters() if not n.startswith("encoder.") and p.requires_grad]
            parts["l2_head"] = 0.5 * self.l2_head * sum((p.float() ** 2).sum() for p in head)
        total = sum(parts.values())
        return total, {k: v.detach().float() for k, v in parts.items()}

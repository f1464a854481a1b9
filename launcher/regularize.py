"""The training loss and the regularizers that act inside it.

`TaskLoss` computes, for one batch: cross-entropy (with label smoothing) + R-Drop (symmetric KL
between two dropout passes) + FGM (the loss again on word embeddings pushed ε along their normalized
gradient) + L2-SP (α/2·‖θ−θ₀‖² toward the pretrained encoder) + a plain L2 on the head. Each term is
off unless its strength is set, and every term is returned separately so the run can log it.

L2-SP and FGM read whole parameters / embedding gradients outside DeepSpeed's forward; that is sound
for ZeRO stages 0–2 (parameters replicated on every rank), and the recipe refuses them with stage 3.
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


class TaskLoss:
    """Everything that goes into one training step's loss."""

    def __init__(self, model: nn.Module, reg: dict[str, Any]):
        self.smoothing = reg.get("label_smoothing", 0.0)
        self.r_drop = reg.get("r_drop", 0.0)
        self.fgm = reg.get("fgm_epsilon", 0.0)
        self.l2_sp = reg.get("l2_sp", 0.0)
        self.l2_head = reg.get("l2_head", 0.0)
        # θ₀: the pretrained encoder weights, kept once per worker (before DeepSpeed wraps the model)
        self.anchor = ({n: p.detach().clone() for n, p in model.encoder.named_parameters() if p.requires_grad}
                       if self.l2_sp else {})

    def __call__(self, model: nn.Module, forward: Callable, batch: dict[str, torch.Tensor],
                 labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """`model` is the plain module (for parameters and embeddings); `forward` runs it (the engine)."""
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
            sq = sum(((params[n] - p0) ** 2).sum() for n, p0 in self.anchor.items())
            parts["l2_sp"] = 0.5 * self.l2_sp * sq
        if self.l2_head:
            head = [p for n, p in model.named_parameters() if not n.startswith("encoder.") and p.requires_grad]
            parts["l2_head"] = 0.5 * self.l2_head * sum((p ** 2).sum() for p in head)
        total = sum(parts.values())
        return total, {k: float(v.detach()) for k, v in parts.items()}

"""The trainer's optimizer: AdamW with global-norm clipping and a non-finite guard, and its LR schedule."""
from __future__ import annotations

import math

import torch

from pipeline.config import Config


def lr_lambda(config: Config):
    t = config.train

    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that clips by the global gradient norm, and skips (and counts) a non-finite update.

    DeepSpeed calls `step()` on every rank at each accumulation boundary, at every ZeRO stage, with the
    (unscaled) fp32 gradients this rank owns: all of them at ZeRO 0, its partition at ZeRO 1-3. Doing the
    clipping here (DeepSpeed's own is set to 0) gives one definition of the norm at every stage, and the
    pre-clipping norm for the logs. A non-finite loss shows up here too: its backward makes the gradients
    non-finite, so the norm is.
    """

    def __init__(self, params, *, grad_clip: float, partitioned: bool, **kwargs):
        super().__init__(params, **kwargs)
        self.grad_clip, self.partitioned = grad_clip, partitioned
        self.last_skipped, self.last_grad_norm = False, 0.0

    @torch.no_grad()
    def step(self, closure=None):
        import torch.distributed as dist

        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        device = grads[0].device if grads else "cpu"
        sumsq = torch.zeros(1, dtype=torch.float64, device=device)
        if grads:  # one fused multi-tensor kernel, not one launch per parameter
            sumsq += torch.stack(torch._foreach_norm(grads)).double().pow(2).sum()
        if self.partitioned and dist.is_initialized():
            dist.all_reduce(sumsq)  # partitions are disjoint: their squared norms add up
        norm = sumsq.sqrt().item()
        self.last_grad_norm, self.last_skipped = norm, not math.isfinite(norm)
        if self.last_skipped:
            return None
        if self.grad_clip > 0 and norm > self.grad_clip:
            torch._foreach_mul_(grads, self.grad_clip / (norm + 1e-6))
        return super().step(closure)

"""Exponential moving average of the weights, correct under every ZeRO stage.

Each rank keeps an fp32 shadow of exactly the parameter data it owns: the full tensor at ZeRO 0-2 (parameters
are replicated there), only its own partition (`param.ds_tensor`) at ZeRO-3. The update is therefore local and
needs no communication; only `export` gathers, and only when weights are written out.
"""
from __future__ import annotations

import torch


def local_data(param: torch.nn.Parameter) -> torch.Tensor:
    """The part of `param` this rank holds: its ZeRO-3 partition if partitioned, else the whole tensor."""
    return param.ds_tensor if hasattr(param, "ds_tensor") else param.data


def partition(param: torch.nn.Parameter, full: torch.Tensor) -> torch.Tensor:
    """This rank's part of `full` (a whole tensor shaped like `param`), laid out as `local_data(param)`: at
    ZeRO-3 the rank's slice of the flattened tensor, zero-padded to the partition size."""
    if not hasattr(param, "ds_tensor"):
        return full.detach().float().clone()
    import torch.distributed as dist

    size = param.ds_tensor.ds_numel
    flat = full.detach().float().flatten()[size * dist.get_rank():size * (dist.get_rank() + 1)]
    return torch.cat([flat, flat.new_zeros(size - flat.numel())])


class EMA:
    def __init__(self, module: torch.nn.Module, decay: float, warmup_steps: int):
        self.decay, self.warmup_steps = decay, warmup_steps
        self.params = [p for p in module.parameters()]
        self.shadow = [local_data(p).detach().float().clone() for p in self.params]
        self.updates = 0

    def current_decay(self) -> float:
        # Early on the average would be dominated by the random initialisation: ramp the decay up.
        n = self.updates
        return min(self.decay, (1 + n) / (10 + n)) if n < self.warmup_steps else self.decay

    @torch.no_grad()
    def update(self) -> None:
        d = self.current_decay()
        torch._foreach_lerp_(self.shadow, [local_data(p).float() for p in self.params], 1 - d)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"shadow": [s.cpu() for s in self.shadow], "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        if len(state["shadow"]) != len(self.shadow) or any(
            a.shape != b.shape for a, b in zip(state["shadow"], self.shadow)
        ):
            raise ValueError("EMA state does not match the model's parameters (different model or ZeRO layout)")
        for s, saved in zip(self.shadow, state["shadow"]):
            s.copy_(saved)
        self.updates = state["updates"]

    def state_dict_full(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The EMA weights as a full fp32 CPU state dict (collective under ZeRO-3)."""
        return full_state_dict(module, self.shadow)


def full_state_dict(module: torch.nn.Module, local: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """fp32 CPU state dict of the whole module, from `local` (per-parameter local data, default: the
    parameters' own). ZeRO-3 partitions are all-gathered explicitly rather than through
    `GatheredParameters`, which leaves small "persistent" parameters as they are and so cannot show
    anything but the live weights. Collective under ZeRO-3: every rank must call it."""
    names = [n for n, _ in module.named_parameters()]
    params = [p for _, p in module.named_parameters()]
    local = [local_data(p) for p in params] if local is None else local
    state = {n: gather_partitioned(p, x) if hasattr(p, "ds_tensor") else x.detach().float().cpu().clone()
             for n, p, x in zip(names, params, local)}
    state.update({n: b.detach().float().cpu().clone() for n, b in module.named_buffers()})
    return state


def gather_partitioned(param: torch.nn.Parameter, part: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    parts = [torch.empty_like(part) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, part.detach().contiguous())
    return torch.cat([q.flatten() for q in parts])[: param.ds_numel].view(param.ds_shape).float().cpu()

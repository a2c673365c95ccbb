"""Per-stream optimizer and EMA for fused models (``models.fused``): every fused tensor holds stream k at index k of
its leading axis, and Adam and the EMA are element-wise, so K independent runs become one update whose learning rate
and bias corrections broadcast along that axis (as HFTA's fused optimizers do).
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import torch

#: Keys of one run's Adam state for one parameter, as ``torch.optim.Adam`` writes them.
_STATE_KEYS = ("step", "exp_avg", "exp_avg_sq")


def _lr_list(lr: float | Sequence[float], k: int) -> list[float]:
    """``lr`` as K finite floats >= 0, as ``torch.optim.Adam`` accepts (one float is used for every stream)."""
    lrs = [float(lr)] * k if isinstance(lr, (int, float)) else [float(v) for v in lr]
    if len(lrs) != k or not all(v >= 0 and math.isfinite(v) for v in lrs):
        raise ValueError(f"lr: expected a float >= 0 or {k} floats >= 0 (one per stream), got {lr!r}")
    return lrs


class StreamAdam(torch.optim.Optimizer):
    """Adam on fused parameters ``[K, ...]`` whose step equals K independent ``torch.optim.Adam`` steps (no weight
    decay, no AMSGrad), each stream with its own learning rate and its own step count.

    Parameters
    ----------
    params : iterable of tensors or of param-group dicts
        The fused model's parameters; each has the stream axis first, of size ``k``.
    k : int
        Number of streams.
    lr : float or sequence of K floats
        Learning rate of every stream, or of each stream.
    betas, eps : as ``torch.optim.Adam``.

    Notes
    -----
    ``group["lr"]`` is a list of K floats, so torch's LR schedulers (which multiply one float) do not apply: set the
    rates of a schedule with ``set_lr`` before each step. ``stream_state(i)`` is run i's state in the format of
    ``torch.optim.Adam.state_dict()``; ``load_stream_states`` goes the other way.
    """

    def __init__(self, params: Iterable[Any], k: int, lr: float | Sequence[float] = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k: expected a positive int (number of streams), got {k!r}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1) or not eps >= 0:
            raise ValueError(f"betas/eps: expected 0 <= beta < 1 and eps >= 0, got betas={betas!r}, eps={eps!r}")
        self.k = k
        super().__init__(params, {"lr": _lr_list(lr, k), "betas": tuple(betas), "eps": float(eps)})
        for group in self.param_groups:
            group["lr"] = _lr_list(group["lr"], k)
            group.setdefault("initial_lr", list(group["lr"]))
            for p in group["params"]:
                if p.dim() == 0 or p.shape[0] != k:
                    raise ValueError(f"params: expected fused tensors with the stream axis first, of size {k}; "
                                     f"got shape {tuple(p.shape)}")

    def set_lr(self, lrs: float | Sequence[float]) -> None:
        """Set every group's learning rates to ``lrs`` (one float, or K floats: stream k's rate)."""
        lrs = _lr_list(lrs, self.k)
        for group in self.param_groups:
            group["lr"] = list(lrs)

    def get_lr(self) -> list[float]:
        """The first group's K learning rates."""
        return list(self.param_groups[0]["lr"])

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        """One Adam step for every stream (``torch.optim.Adam``'s single-tensor update, broadcast over streams)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            scales: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("StreamAdam does not support sparse gradients")
                state = self.state[p]
                if not state:
                    # step stays on the host, as torch's non-capturable Adam keeps it: the bias corrections are
                    # host floats
                    state["step"] = torch.zeros(self.k, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                exp_avg, exp_avg_sq, grad = state["exp_avg"], state["exp_avg_sq"], p.grad
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                key = (tuple(state["step"].tolist()), p.device, p.dtype)
                if key not in scales:
                    scales[key] = self._scales(key[0], group["lr"], beta1, beta2, p.device, p.dtype)
                neg_step_size, bc2_sqrt = scales[key]
                shape = (self.k,) + (1,) * (p.dim() - 1)
                denom = (exp_avg_sq.sqrt() / bc2_sqrt.view(shape)).add_(group["eps"])
                # the order of torch's addcdiv kernel, param + (value * exp_avg) / denom, for matching rounding
                p.add_((exp_avg * neg_step_size.view(shape)).div_(denom))
        return loss

    @staticmethod
    def _scales(steps: tuple[float, ...], lrs: list[float], beta1: float, beta2: float, device: torch.device,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-stream ``-lr / (1 - beta1^t)`` and ``sqrt(1 - beta2^t)`` (host float64 math, as torch's Adam)."""
        neg = [-lr / (1 - beta1 ** t) for lr, t in zip(lrs, steps)]
        bc2 = [math.sqrt(1 - beta2 ** t) for t in steps]
        return (torch.tensor(neg, dtype=dtype).to(device, non_blocking=True),
                torch.tensor(bc2, dtype=dtype).to(device, non_blocking=True))

    def stream_state(self, i: int) -> dict[str, Any]:
        """Run ``i``'s optimizer state as ``torch.optim.Adam(model.parameters(), ...).state_dict()`` of the ordinary
        model would hold it (parameters numbered in ``parameters()`` order; tensors are copies)."""
        if not 0 <= i < self.k:
            raise IndexError(f"i: expected a stream index in 0..{self.k - 1}, got {i}")
        groups, state, index = [], {}, 0
        for group in self.param_groups:
            out = torch.optim.Adam([torch.zeros(1)], lr=group["lr"][i], betas=group["betas"],
                                   eps=group["eps"]).state_dict()["param_groups"][0]
            if "initial_lr" in group:
                out["initial_lr"] = group["initial_lr"][i]
            out["params"] = list(range(index, index + len(group["params"])))
            for p in group["params"]:
                s = self.state.get(p)
                if s:
                    state[index] = {"step": s["step"][i].clone(), "exp_avg": s["exp_avg"][i].clone(),
                                    "exp_avg_sq": s["exp_avg_sq"][i].clone()}
                index += 1
            groups.append(out)
        return {"state": state, "param_groups": groups}

    def load_stream_states(self, states: Sequence[dict[str, Any]]) -> None:
        """Load K runs' ``torch.optim.Adam`` state dicts (as ``stream_state`` writes them): the inverse of
        ``[stream_state(i) for i in range(k)]``."""
        if len(states) != self.k:
            raise ValueError(f"states: expected {self.k} Adam state dicts (one per stream), got {len(states)}")
        for i, sd in enumerate(states):
            if len(sd["param_groups"]) != len(self.param_groups) or any(
                    len(g["params"]) != len(mine["params"]) for g, mine in zip(sd["param_groups"], self.param_groups)):
                raise ValueError(f"states[{i}]: its param groups do not match this optimizer's "
                                 f"({[len(g['params']) for g in self.param_groups]} parameters per group)")
        for gi, group in enumerate(self.param_groups):
            group["lr"] = _lr_list([sd["param_groups"][gi]["lr"] for sd in states], self.k)
            if all("initial_lr" in sd["param_groups"][gi] for sd in states):
                group["initial_lr"] = [float(sd["param_groups"][gi]["initial_lr"]) for sd in states]
            for j, p in enumerate(group["params"]):
                ids = [sd["param_groups"][gi]["params"][j] for sd in states]
                have = [pid in sd["state"] for pid, sd in zip(ids, states)]
                if not any(have):
                    self.state.pop(p, None)
                    continue
                if not all(have):
                    raise ValueError(f"states: parameter {j} of group {gi} has Adam state in some runs only")
                runs = [sd["state"][pid] for pid, sd in zip(ids, states)]
                for i, r in enumerate(runs):
                    if r["exp_avg"].shape != p.shape[1:] or r["exp_avg_sq"].shape != p.shape[1:]:
                        raise ValueError(f"states[{i}]: parameter {j} of group {gi} has Adam state of shape "
                                         f"{tuple(r['exp_avg'].shape)}, expected {tuple(p.shape[1:])}")
                self.state[p] = {
                    "step": torch.tensor([float(r["step"]) for r in runs], dtype=torch.float32),
                    **{key: torch.stack([r[key] for r in runs]).to(p.device, p.dtype) for key in _STATE_KEYS[1:]},
                }


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """``ema <- decay * ema + (1 - decay) * model`` for every parameter (element-wise, so it treats each stream of
    a fused model as that run's own EMA, exactly as the trainer's unfused ``torch._foreach_lerp_``)."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)

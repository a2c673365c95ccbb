"""Codebook updates of stage-1 prior training beside the quantizer's own gradient: exponential moving averages
(van den Oord et al. 2017, appendix; Razavi et al. 2019) and restarts of dead codes.

The statistics live here, not in the model, so that a prior's state dict keeps exactly taming-transformers' keys.
Latents are [M, embed_dim] float rows (detached), codes int64 [M].
"""
from __future__ import annotations

import torch


class EMACodebook:
    """Moves each code to the running mean of the latents assigned to it.

    ``N_i <- d N_i + (1 - d) n_i`` and ``m_i <- d m_i + (1 - d) sum_{j -> i} z_j``; the code is
    ``m_i / N'_i`` with Laplace smoothing ``N'_i = (N_i + eps) / (N + K eps) N`` (``N = sum_i N_i``), so a code
    that stops being used keeps its place instead of dividing by zero.

    Parameters
    ----------
    embedding : torch.Tensor
        float [K, D], the codebook (``quantize.embedding.weight``), updated in place.
    decay : float
        ``d`` in (0, 1).
    eps : float
        Laplace smoothing.
    """

    def __init__(self, embedding: torch.Tensor, decay: float = 0.99, eps: float = 1e-5) -> None:
        self.weight, self.decay, self.eps = embedding, decay, eps
        self.size = torch.ones(embedding.shape[0], dtype=torch.float64, device=embedding.device)
        self.sum = embedding.detach().double().clone()

    @torch.no_grad()
    def update(self, latents: torch.Tensor, codes: torch.Tensor) -> None:
        """One EMA step with the latents of a batch and their codes."""
        k = self.weight.shape[0]
        onehot = torch.nn.functional.one_hot(codes, k).double()  # [M, K]
        self.size.mul_(self.decay).add_(onehot.sum(0), alpha=1 - self.decay)
        self.sum.mul_(self.decay).add_(onehot.t() @ latents.double(), alpha=1 - self.decay)
        n = self.size.sum()
        smoothed = (self.size + self.eps) / (n + k * self.eps) * n
        self.weight.copy_((self.sum / smoothed[:, None]).to(self.weight.dtype))

    @torch.no_grad()
    def reset(self, index: torch.Tensor) -> None:
        """Restart the statistics of codes ``index`` at their current values (after ``restart_dead``)."""
        self.size[index] = 1.0
        self.sum[index] = self.weight[index].double()

    def state_dict(self) -> dict:
        return {"size": self.size, "sum": self.sum}

    def load_state_dict(self, state: dict) -> None:
        self.size.copy_(state["size"])
        self.sum.copy_(state["sum"])


@torch.no_grad()
def restart_dead(embedding: torch.Tensor, used: torch.Tensor, latents: torch.Tensor,
                 gen: torch.Generator) -> torch.Tensor:
    """Set every code with ``used == 0`` to a random row of ``latents``; returns the restarted indices (int64)."""
    dead = torch.nonzero(used == 0).flatten()
    if len(dead):
        pick = torch.randint(0, latents.shape[0], (len(dead),), generator=gen).to(latents.device)
        embedding[dead] = latents[pick].to(embedding.dtype)
    return dead

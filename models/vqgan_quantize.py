"""VQGAN's vector quantizer (taming-transformers' ``VectorQuantizer2``, van den Oord et al. 2017): nearest code by
Euclidean distance, codebook and commitment losses, straight-through gradient. The codebook is ``embedding``
(``nn.Embedding(n_embed, embed_dim)``), the name a taming checkpoint stores it under (``quantize.embedding.weight``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Quantized:
    """What one quantization gives back.

    Attributes
    ----------
    z_q : torch.Tensor
        NCHW float32, the codes in place of the inputs; its gradient flows straight through to the input.
    loss : torch.Tensor
        Scalar: the quantizer's training loss (codebook + commitment terms with taming's weights, see
        ``VectorQuantizer``).
    codebook : torch.Tensor
        Scalar: mean squared distance ``||sg(z) - e||^2`` (moves the codes).
    commitment : torch.Tensor
        Scalar: mean squared distance ``||z - sg(e)||^2`` (moves the encoder); numerically equal to ``codebook``.
    indices : torch.Tensor
        int64 [N, H, W], the chosen code of each position.
    """

    z_q: torch.Tensor
    loss: torch.Tensor
    codebook: torch.Tensor
    commitment: torch.Tensor
    indices: torch.Tensor


class VectorQuantizer(nn.Module):
    """Nearest-neighbour quantization of NCHW latents to ``n_embed`` codes of ``embed_dim`` channels.

    Args:
        n_embed: number of codes.
        embed_dim: channels of a code (the latent's channel count).
        beta: weight of one of the two loss terms. ``legacy=True`` reproduces taming's default (and its
            checkpoints' training): ``loss = commitment + beta * codebook``; ``legacy=False`` is the VQ-VAE paper's
            ``codebook + beta * commitment``.
        legacy: see ``beta``.
    """

    def __init__(self, n_embed: int, embed_dim: int, beta: float = 0.25, legacy: bool = True) -> None:
        super().__init__()
        self.n_embed, self.embed_dim, self.beta, self.legacy = n_embed, embed_dim, beta, legacy
        self.embedding = nn.Embedding(n_embed, embed_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_embed, 1.0 / n_embed)

    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """int64 [M]: index of the code nearest to each row of ``flat`` ([M, embed_dim]); ties go to the lowest."""
        e = self.embedding.weight
        d = (flat ** 2).sum(1, keepdim=True) + (e ** 2).sum(1) - 2.0 * flat @ e.t()
        return torch.argmin(d, dim=1)

    def forward(self, z: torch.Tensor) -> Quantized:
        """z: NCHW float latents (C = embed_dim) -> ``Quantized``."""
        if z.ndim != 4 or z.shape[1] != self.embed_dim:
            raise ValueError(f"z: expected NCHW latents with {self.embed_dim} channels, got shape {tuple(z.shape)}")
        zh = z.permute(0, 2, 3, 1).contiguous()
        idx = self.nearest(zh.reshape(-1, self.embed_dim).detach())
        e = self.embedding(idx).view(zh.shape)
        codebook = torch.mean((e - zh.detach()) ** 2)
        commitment = torch.mean((e.detach() - zh) ** 2)
        loss = commitment + self.beta * codebook if self.legacy else codebook + self.beta * commitment
        z_q = zh + (e - zh).detach()  # straight-through: forward gives e, backward passes d/dz_q to z unchanged
        return Quantized(z_q.permute(0, 3, 1, 2).contiguous(), loss, codebook, commitment,
                         idx.view(zh.shape[:3]))


def usage(indices: torch.Tensor, n_embed: int) -> tuple[float, int]:
    """Codebook usage of a batch of code indices: (perplexity ``exp(H(p))`` of the code frequencies, between 1 and
    ``n_embed``; number of codes not used at all)."""
    counts = torch.bincount(indices.reshape(-1), minlength=n_embed).double()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return float(entropy.exp()), int((counts == 0).sum())

"""SwinIR (Liang et al. 2021) for image restoration, the "light" configuration without upsampling: residual Swin
transformer blocks (RSTB) of shifted-window self-attention with a relative position bias, a conv after each RSTB,
and a global residual (the network predicts ``output - input``, as SwinIR does for denoising and JPEG artifacts).

Input and output: NCHW float32 on the 0..1 scale, any height and width: inputs are reflect-padded to a multiple of
the window size and the output is cropped back (as SwinIR's ``check_image_size``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * H/ws * W/ws, ws * ws, C)."""
    b, h, w, c = x.shape
    x = x.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws * ws, c)


def window_reverse(windows: torch.Tensor, ws: int, h: int, w: int) -> torch.Tensor:
    """(B * H/ws * W/ws, ws * ws, C) -> (B, H, W, C)."""
    c = windows.shape[-1]
    x = windows.view(-1, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside ws x ws windows with a learned relative position bias."""

    def __init__(self, dim: int, heads: int, ws: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"SwinIR: embed dim {dim} must be divisible by heads {heads}")
        self.heads, self.ws = heads, ws
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.bias_table = nn.Parameter(torch.zeros((2 * ws - 1) ** 2, heads))
        nn.init.trunc_normal_(self.bias_table, std=0.02)
        coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)
        self.register_buffer("rel_index", rel[..., 0] * (2 * ws - 1) + rel[..., 1], persistent=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x: (B * nW, N, C); mask: (nW, N, N) additive (0 or -100) or None."""
        bw, n, c = x.shape
        q, k, v = self.qkv(x).view(bw, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        bias = self.bias_table[self.rel_index.view(-1)].view(n, n, self.heads).permute(2, 0, 1)  # (heads, N, N)
        attn_mask = bias.unsqueeze(0).to(q.dtype)
        if mask is not None:
            nw = mask.shape[0]
            attn_mask = (attn_mask.view(1, 1, self.heads, n, n) + mask.view(1, nw, 1, n, n).to(q.dtype))
            attn_mask = attn_mask.expand(bw // nw, nw, self.heads, n, n).reshape(bw, self.heads, n, n)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(out.transpose(1, 2).reshape(bw, n, c))


class SwinBlock(nn.Module):
    """LayerNorm -> (shifted) window attention -> residual; LayerNorm -> MLP -> residual."""

    def __init__(self, dim: int, heads: int, ws: int, shift: int, mlp_ratio: float) -> None:
        super().__init__()
        self.ws, self.shift = ws, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, heads, ws)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def _mask(self, h: int, w: int, device: torch.device) -> torch.Tensor:
        # Label the 9 regions that a cyclic shift brings together; tokens from different regions must not attend.
        img = torch.zeros(1, h, w, 1, device=device)
        cnt = 0
        for hs in (slice(0, -self.ws), slice(-self.ws, -self.shift), slice(-self.shift, None)):
            for wsl in (slice(0, -self.ws), slice(-self.ws, -self.shift), slice(-self.shift, None)):
                img[:, hs, wsl, :] = cnt
                cnt += 1
        mw = window_partition(img, self.ws).squeeze(-1)
        diff = mw.unsqueeze(1) - mw.unsqueeze(2)
        return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """x: (B, H*W, C) tokens."""
        h, w = hw
        b, _, c = x.shape
        # Like SwinIR: no shift when the image is a single window (nothing to exchange between windows).
        shift = self.shift if min(h, w) > self.ws else 0
        y = self.norm1(x).view(b, h, w, c)
        if shift:
            y = torch.roll(y, (-shift, -shift), dims=(1, 2))
        mask = self._mask(h, w, x.device) if shift else None
        y = window_reverse(self.attn(window_partition(y, self.ws), mask), self.ws, h, w)
        if shift:
            y = torch.roll(y, (shift, shift), dims=(1, 2))
        x = x + y.reshape(b, h * w, c)
        return x + self.mlp(self.norm2(x))


class RSTB(nn.Module):
    """Residual Swin Transformer Block: ``depth`` Swin blocks (alternating shift), a 3x3 conv, and a skip."""

    def __init__(self, dim: int, depth: int, heads: int, ws: int, mlp_ratio: float) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(SwinBlock(dim, heads, ws, 0 if i % 2 == 0 else ws // 2, mlp_ratio)
                                    for i in range(depth))
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        y = x
        for blk in self.blocks:
            y = blk(y, hw)
        b, n, c = y.shape
        y = self.conv(y.transpose(1, 2).reshape(b, c, *hw)).flatten(2).transpose(1, 2)
        return x + y


class SwinIR(nn.Module):
    """SwinIR without upsampling.

    Args:
        depths: Swin blocks per RSTB (light: 6, 6, 6, 6).
        embed: embedding channels (light: 60).
        heads: attention heads per block (light: 6).
        window: window size in pixels (light: 8).
        mlp_ratio: MLP hidden width / embed (light: 2).
    """

    def __init__(self, depths: tuple[int, ...] = (6, 6, 6, 6), embed: int = 60, heads: int = 6, window: int = 8,
                 mlp_ratio: float = 2.0, in_channels: int = 3) -> None:
        super().__init__()
        self.window = window
        self.conv_first = nn.Conv2d(in_channels, embed, 3, padding=1)
        self.layers = nn.ModuleList(RSTB(embed, d, heads, window, mlp_ratio) for d in depths)
        self.norm = nn.LayerNorm(embed)
        self.conv_after_body = nn.Conv2d(embed, embed, 3, padding=1)
        self.conv_last = nn.Conv2d(embed, in_channels, 3, padding=1)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: NCHW float, 0..1 -> NCHW float, same shape."""
        h, w = x.shape[-2:]
        ph, pw = (-h) % self.window, (-w) % self.window
        mode = "reflect" if ph < h and pw < w else "replicate"
        xp = F.pad(x, (0, pw, 0, ph), mode=mode) if ph or pw else x
        hw = (h + ph, w + pw)
        feat = self.conv_first(xp)
        b, c = feat.shape[:2]
        t = feat.flatten(2).transpose(1, 2)
        for layer in self.layers:
            t = layer(t, hw)
        t = self.norm(t).transpose(1, 2).reshape(b, c, *hw)
        y = xp + self.conv_last(self.conv_after_body(t) + feat)
        return y[..., :h, :w]

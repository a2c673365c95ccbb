"""VQGAN as an image-restoration network: the autoencoder of taming-transformers (Esser et al., CVPR 2021) with
its checkpoint layout, used as a content prior (Hu et al., *Revisiting the Generalization Problem of Low-level
Vision Models Through the Lens of Image Deraining*, Sec. VI-B): pre-train the autoencoder on clean images, freeze
its codebook, quantizer and decoder, and fine-tune only the encoder on degraded -> clean pairs. The output is then
assembled from codes learned on clean content, which leaves the network little room to reproduce a degradation.

Module names follow taming's ``VQModel`` (``encoder``, ``quant_conv``, ``quantize``, ``post_quant_conv``,
``decoder``), so ``load_prior`` reads a taming checkpoint as its users download it (the Lightning ``.ckpt`` with
the weights under ``"state_dict"``; the ``loss.*`` keys of its discriminator and perceptual loss are ignored) as
well as the ``prior.pt`` that ``rainsweep prior`` writes.

Input and output: NCHW float32 on the 0..1 scale (taming works on -1..1; ``VQGAN.forward`` converts), any height and
width: inputs are reflect-padded to a multiple of the downsampling factor and the output is cropped back. Unlike the
other models of the registry, the output is not a residual on the input: it is decoded from the latent.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .vqgan_blocks import Decoder, Encoder
from .vqgan_quantize import Quantized, VectorQuantizer


@dataclass(frozen=True)
class VQGANConfig:
    """taming's ``ddconfig`` plus the quantizer's size.

    Attributes
    ----------
    ch, ch_mult, num_res_blocks, attn_resolutions, resolution, z_channels, dropout :
        As in taming's ``ddconfig`` (``resolution`` is the nominal training size that places the attention blocks;
        inputs may have any size).
    embed_dim, n_embed :
        Channels of a code and number of codes.
    groups :
        GroupNorm groups (taming: 32; fewer lets tiny CPU models have fewer than 32 channels per level).
    """

    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    attn_resolutions: tuple[int, ...]
    resolution: int
    z_channels: int
    embed_dim: int
    n_embed: int
    dropout: float = 0.0
    groups: int = 32

    @property
    def factor(self) -> int:
        """Downsampling factor of the latent: ``2 ** (len(ch_mult) - 1)``."""
        return 2 ** (len(self.ch_mult) - 1)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "VQGANConfig":
        return cls(**{**d, "ch_mult": tuple(d["ch_mult"]), "attn_resolutions": tuple(d["attn_resolutions"])})


#: Named configurations. ``f16-1024`` is taming's ImageNet model (``vqgan_imagenet_f16_1024``); ``small`` trains on a
#: CPU (f4, 256 codes, 32 x 32 patches in mind); ``tiny`` exists for tests.
CONFIGS: dict[str, VQGANConfig] = {
    "f16-1024": VQGANConfig(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,),
                            resolution=256, z_channels=256, embed_dim=256, n_embed=1024),
    "small": VQGANConfig(ch=16, ch_mult=(1, 2, 4), num_res_blocks=1, attn_resolutions=(8,), resolution=32,
                         z_channels=32, embed_dim=32, n_embed=256, groups=8),
    "tiny": VQGANConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), resolution=16,
                        z_channels=8, embed_dim=8, n_embed=16, groups=4),
}

#: Prefixes of the encoder side: everything taming's ``VQModel.encode`` runs before the quantizer. Fine-tuning
#: trains these and freezes the rest (codebook, ``post_quant_conv``, decoder).
ENCODER_PREFIXES = ("encoder.", "quant_conv.")
#: Checkpoint keys that belong to taming's training loss (discriminator, LPIPS), not to the autoencoder.
IGNORED_PREFIXES = ("loss.",)
#: The ``format`` field of the files ``rainsweep prior`` writes.
PRIOR_FORMAT = "rainsweep-vqgan-prior/1"


class PriorError(ValueError):
    """A prior checkpoint that does not fit the model (missing, unexpected or misshapen keys) or cannot be read."""


class VQGAN(nn.Module):
    """VQGAN autoencoder with 0..1 image input and output.

    Args:
        config: a ``VQGANConfig`` or a name in ``CONFIGS``.
        quantize: False builds the ablation of the paper's Fig. 18: the same encoder-decoder with the latent passed
            straight from ``quant_conv`` to ``post_quant_conv`` (no ``quantize`` module).
        beta: the quantizer's loss weight (taming: 0.25, legacy weighting; see ``VectorQuantizer``).

    After a training-mode forward pass with quantization, ``aux_loss`` holds the quantizer's loss of that pass
    (train.py adds it to the L1 loss); otherwise it is None.
    """

    def __init__(self, config: VQGANConfig | str = "small", quantize: bool = True, beta: float = 0.25) -> None:
        super().__init__()
        cfg = CONFIGS[config] if isinstance(config, str) else config
        self.config = cfg
        dd = dict(ch=cfg.ch, ch_mult=cfg.ch_mult, num_res_blocks=cfg.num_res_blocks,
                  attn_resolutions=cfg.attn_resolutions, resolution=cfg.resolution, z_channels=cfg.z_channels,
                  dropout=cfg.dropout, groups=cfg.groups)
        self.encoder = Encoder(**dd)
        self.decoder = Decoder(**dd)
        self.quantize = VectorQuantizer(cfg.n_embed, cfg.embed_dim, beta=beta) if quantize else None
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        self.aux_loss: torch.Tensor | None = None

    # ---- taming's interface, on the -1..1 scale ----

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, Quantized | None]:
        """x: NCHW on -1..1, sides multiples of ``config.factor`` -> (latent fed to the decoder, quantization or
        None without a quantizer)."""
        h = self.quant_conv(self.encoder(x))
        if self.quantize is None:
            return h, None
        q = self.quantize(h)
        return q.z_q, q

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent -> NCHW image on the -1..1 scale (not clamped)."""
        return self.decoder(self.post_quant_conv(z))

    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, Quantized | None]:
        """taming's ``VQModel.forward`` on -1..1 input: (reconstruction, quantization or None)."""
        z, q = self.encode(x)
        return self.decode(z), q

    # ---- the restoration network's interface, on the 0..1 scale ----

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: NCHW float, 0..1 -> NCHW float, same shape, 0..1 scale (not clamped)."""
        h, w = x.shape[-2:]
        m = self.config.factor
        ph, pw = (-h) % m, (-w) % m
        mode = "reflect" if ph < h and pw < w else "replicate"  # reflect needs pad < size
        xp = F.pad(x, (0, pw, 0, ph), mode=mode) if ph or pw else x
        y, q = self.reconstruct(xp * 2.0 - 1.0)
        self.aux_loss = q.loss if q is not None and self.training and torch.is_grad_enabled() else None
        return ((y + 1.0) * 0.5)[..., :h, :w]

    def freeze_except_encoder(self) -> list[str]:
        """Freeze every parameter outside ``ENCODER_PREFIXES`` (codebook, ``post_quant_conv``, decoder); returns the
        names of the parameters left trainable."""
        trainable = []
        for name, p in self.named_parameters():
            p.requires_grad_(name.startswith(ENCODER_PREFIXES))
            if p.requires_grad:
                trainable.append(name)
        return trainable


# ---- checkpoints ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoadReport:
    """How a checkpoint's keys matched a model's.

    Attributes
    ----------
    loaded : list of str
        Keys copied into the model.
    missing : list of str
        Model keys the checkpoint lacks.
    unexpected : list of str
        Checkpoint keys the model lacks (the ignored ``loss.*`` keys not included).
    mismatched : list of str
        ``key: checkpoint shape vs model shape`` for keys present in both with other shapes.
    ignored : int
        Number of ``loss.*`` keys skipped.
    """

    loaded: list[str]
    missing: list[str]
    unexpected: list[str]
    mismatched: list[str]
    ignored: int

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self, limit: int = 8) -> str:
        """One paragraph naming the problems (at most ``limit`` keys of each kind)."""
        def some(keys: list[str]) -> str:
            more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
            return ", ".join(keys[:limit]) + more

        parts = [f"{len(self.loaded)} keys loaded, {self.ignored} loss.* keys ignored"]
        if self.missing:
            parts.append(f"{len(self.missing)} missing from the checkpoint: {some(self.missing)}")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected in the checkpoint: {some(self.unexpected)}")
        if self.mismatched:
            parts.append(f"{len(self.mismatched)} with other shapes: {some(self.mismatched)}")
        return "; ".join(parts)


def read_state_dict(source: str | Path | dict) -> tuple[dict[str, torch.Tensor], dict]:
    """The weights and metadata of a checkpoint: a path to a taming Lightning ``.ckpt`` (weights under
    ``"state_dict"``), to a ``prior.pt`` of ``rainsweep prior`` (the same key, plus ``"config"``), or such a dict
    already loaded. Returns ``(state_dict, rest)`` where ``rest`` holds the other top-level entries."""
    if isinstance(source, dict):
        ck = source
    else:
        path = Path(source)
        if not path.is_file():
            raise PriorError(f"{path}: no such checkpoint file")
        try:
            ck = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - Lightning checkpoints pickle hyper-parameters weights_only refuses
            try:
                ck = torch.load(path, map_location="cpu", weights_only=False)
            except Exception as err:  # noqa: BLE001
                raise PriorError(f"{path}: cannot be read as a torch checkpoint ({err})") from None
    if not isinstance(ck, dict):
        raise PriorError(f"{source}: expected a checkpoint dict, got {type(ck).__name__}")
    sd = ck.get("state_dict", ck)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise PriorError(f"{source}: no tensor state dict under 'state_dict'")
    return sd, {k: v for k, v in ck.items() if k != "state_dict"}


def match_state_dict(model: nn.Module, sd: dict[str, torch.Tensor]) -> LoadReport:
    """Compare checkpoint keys and shapes with ``model``'s (``loss.*`` keys ignored); copies nothing."""
    own = model.state_dict()
    ignored = [k for k in sd if k.startswith(IGNORED_PREFIXES)]
    theirs = {k: v for k, v in sd.items() if not k.startswith(IGNORED_PREFIXES)}
    mismatched = [f"{k}: {tuple(theirs[k].shape)} vs {tuple(own[k].shape)}" for k in own
                  if k in theirs and theirs[k].shape != own[k].shape]
    bad = {m.split(":")[0] for m in mismatched}
    return LoadReport(loaded=[k for k in own if k in theirs and k not in bad],
                      missing=[k for k in own if k not in theirs],
                      unexpected=[k for k in theirs if k not in own], mismatched=mismatched, ignored=len(ignored))


def load_prior(model: VQGAN, source: str | Path | dict, strict: bool = True) -> LoadReport:
    """Load a taming checkpoint or a ``prior.pt`` into ``model`` by key name.

    Parameters
    ----------
    model : VQGAN
        The model to fill (its configuration must be the checkpoint's).
    source : str, Path or dict
        See ``read_state_dict``.
    strict : bool
        Raise ``PriorError`` (naming the keys) on any missing, unexpected or misshapen key; otherwise load the
        keys that match and return the report.

    Returns
    -------
    LoadReport
    """
    sd, _ = read_state_dict(source)
    report = match_state_dict(model, sd)
    if strict and not report.ok:
        raise PriorError(f"{source if not isinstance(source, dict) else 'the state dict'} does not fit a VQGAN "
                         f"with {model.config}: {report.describe()}")
    with torch.no_grad():
        own = model.state_dict()
        for k in report.loaded:
            own[k].copy_(sd[k].to(own[k].dtype))
    return report


def prior_payload(model: VQGAN, config_name: str, extra: dict[str, Any] | None = None) -> dict:
    """The dict ``rainsweep prior`` saves as ``prior.pt``: the weights under taming's names (``"state_dict"``, as
    in a Lightning checkpoint), the configuration's name and fields, and ``extra`` (step, losses)."""
    return {"format": PRIOR_FORMAT, "config_name": config_name, "config": model.config.to_dict(),
            "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, **(extra or {})}

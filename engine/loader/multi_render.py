"""Rendering a multi-stream batch: K streams' patches, each stream with its own rain spec, seed and keys, rendered
together into one ``MultiBatch`` with a leading stream axis (layout and the meaning of "one pass":
``engine.loader.multi``).

``render_streams_cpu`` is the host path (numba, the families' ``render_finish_cpu`` writing output planes),
``render_streams_device`` and ``finish_streams_device`` the device path (the families' GPU kernels, then conversion
by table look-up); both give stream k exactly the values of the single-stream loader (``engine.loader.batch``).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from engine import arrays
from engine.loader.args import LoaderError
from engine.loader.batch import Batch
from engine.loader.planes import unit_by_lut, unit_table

if TYPE_CHECKING:
    from engine.rain import RainSpec


@dataclass
class MultiBatch:
    """One step of K streams (layout: ``engine.loader.multi``); stream k's slice is ``stream(k)``.

    Attributes
    ----------
    index : torch.Tensor
        int64 [K, B] store indices, on the CPU.
    background, rainy : torch.Tensor
        [K, B, 3, P, P] (stream, batch, NCHW), of the loader's dtype on its device: float32 / bfloat16 / float16 on
        the 0..1 scale, uint8 on 0..255 (``engine.loader.to_unit`` converts).
    rain : torch.Tensor
        [K, B, 1, P, P], same dtype and scale: the rain layer before beta (zeros without rain).
    mask : torch.Tensor
        bool [K, B, 1, P, P]: rain layer > the spec's threshold (0..255 scale).
    epochs : tuple of int
        The loader epoch of each stream's batch (``multi_batches``; zeros for plans that span epochs, such as
        ``engine.loader.multi_steps``, whose ``MultiStep.positions`` say where each stream stands).
    step : int
        The batch's number within the plan (0, 1, ...).
    """

    index: Any
    background: Any
    rainy: Any
    rain: Any
    mask: Any
    epochs: tuple
    step: int

    def __len__(self) -> int:
        """K, the number of streams."""
        return int(self.index.shape[0])

    def stream(self, k: int) -> Batch:
        """Stream ``k``'s slice as an ``engine.loader.Batch`` (views, no copy)."""
        return Batch(index=self.index[k], background=self.background[k], rainy=self.rainy[k], rain=self.rain[k],
                     mask=self.mask[k], epoch=int(self.epochs[k]), step=self.step)


@lru_cache(maxsize=64)
def _vector(spec: RainSpec) -> np.ndarray:
    v = spec.to_vector()
    v.setflags(write=False)
    return v


def rain_runs(specs: Sequence[RainSpec | None]) -> list[tuple[int, int, RainSpec | None]]:
    """``(k0, k1, spec)`` for each maximal run ``k0 .. k1 - 1`` of consecutive streams with equal rain spec."""
    runs: list[tuple[int, int, RainSpec | None]] = []
    for k, spec in enumerate(specs):
        if runs and runs[-1][2] == spec:
            runs[-1] = (runs[-1][0], k + 1, spec)
        else:
            runs.append((k, k + 1, spec))
    return runs


def _draws(spec: RainSpec, seeds: Sequence[int], keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-patch (states uint64, active uint8, beta_q int64) of streams with their own seeds: ``keys`` [k, B]
    holds each stream's row of rain keys, ``seeds`` its seed."""
    from engine.synth import common_draws  # numba kernels load on first use, as in engine.loader.batch

    parts = [common_draws(spec, int(seed), row) for seed, row in zip(seeds, keys)]
    if len(parts) == 1:
        return parts[0]
    return tuple(np.concatenate(p) for p in zip(*parts))  # type: ignore[return-value]


def render_streams_cpu(backgrounds: np.ndarray, rows: np.ndarray | None, specs: Sequence[RainSpec | None],
                       seeds: Sequence[int], keys: np.ndarray, layer: np.ndarray, out_bg: np.ndarray,
                       out_rainy: np.ndarray, out_rain: np.ndarray, mask: np.ndarray) -> int:
    """K streams' rain and output planes on the host, one renderer call per run of equal specs (``rain_runs``).

    The values of stream k's rows equal ``engine.synth.synthesize_planes_cpu(backgrounds, specs[k], seeds[k],
    keys[k], ...)`` of that stream alone.

    Parameters
    ----------
    backgrounds : numpy.ndarray
        uint8 NHWC [M, P, P, 3] (0..255): the K * B backgrounds in stream order, or with ``rows`` an array they are
        picked from (the resident union).
    rows : numpy.ndarray or None
        int64 [K * B]: flat patch i's background is ``backgrounds[rows[i]]``; None: ``backgrounds[i]``.
    specs, seeds : sequences of length K
        Each stream's rain spec (None: no rain) and seed.
    keys : numpy.ndarray
        int64 [K, B] rain keys.
    layer : numpy.ndarray
        uint8 NHW [K * B, P, P], written: the rain layers (0..255, before beta).
    out_bg, out_rainy : numpy.ndarray
        [K * B, 3, P, P] NCHW planes of one dtype of ``kernels.finish.PLANE_DTYPES``, written.
    out_rain : numpy.ndarray
        [K * B, 1, P, P] of that dtype, written; an array with ``shape[0] == 0`` skips it (uint8 batches render
        the rain plane as ``layer`` itself).
    mask : numpy.ndarray
        bool NHW [K * B, P, P], written.

    Returns
    -------
    int
        The number of renderer calls made.
    """
    from kernels.families import family
    from kernels.finish import background_rows, finish_cpu

    k_count, b = keys.shape
    backgrounds = np.ascontiguousarray(backgrounds)
    rows = background_rows(backgrounds, rows)
    if rows.size != k_count * b:
        raise LoaderError(f"rows: expected {k_count * b} background rows (K * B), got {rows.size}")
    calls = 0
    for k0, k1, spec in rain_runs(specs):
        a, z = k0 * b, k1 * b
        rain_part = out_rain[a:z] if out_rain.shape[0] else out_rain
        if spec is None:
            layer[a:z].fill(0)
            finish_cpu(backgrounds, layer[a:z], np.zeros(z - a, dtype=np.int64), 0, out_bg[a:z], out_rainy[a:z],
                       rain_part, mask[a:z], rows[a:z])
        else:
            states, active, beta_q = _draws(spec, seeds[k0:k1], keys[k0:k1])
            family(spec.family).render_finish_cpu(_vector(spec), states, active, backgrounds, beta_q, spec.threshold,
                                                  layer[a:z], out_bg[a:z], out_rainy[a:z], rain_part, mask[a:z],
                                                  rows[a:z])
        calls += 1
    return calls


def render_streams_device(backgrounds: Any, specs: Sequence[RainSpec | None], seeds: Sequence[int],
                          keys: np.ndarray, rain: Any, rainy: Any, mask: Any) -> int:
    """K streams' rain on the device with the families' GPU kernels, one render and one composite launch per run
    of equal specs (``rain_runs``).

    Stream k's rows equal ``engine.synth.synthesize(backgrounds[k * B:(k + 1) * B], specs[k], seeds[k],
    keys[k], backend="cuda")``. Arrays are CuPy (a real GPU) or numpy (numba's CUDA simulator), C-contiguous.

    Parameters
    ----------
    backgrounds : array
        uint8 NHWC [K * B, P, P, 3] (0..255), in stream order.
    specs, seeds : sequences of length K
        Each stream's rain spec (None: no rain) and seed.
    keys : numpy.ndarray
        int64 [K, B] rain keys (host).
    rain, rainy, mask : arrays
        Written: uint8 NHW [K * B, P, P] rain layers (0..255, before beta), uint8 NHWC rainy images, bool NHW masks.

    Returns
    -------
    int
        The number of runs rendered (each one render and one composite launch, or copies for no rain).
    """
    from kernels.composite import composite_gpu
    from kernels.families import family

    k_count, b = keys.shape
    arrays.check_array(backgrounds, "backgrounds", ("uint8",), "NHWC")
    if int(backgrounds.shape[0]) != k_count * b:
        raise LoaderError(f"backgrounds: expected {k_count * b} patches (K * B), got {backgrounds.shape[0]}")
    on_host = isinstance(backgrounds, np.ndarray)
    xp = np if on_host else arrays.xp_of(arrays.kind_of(backgrounds))
    runs = rain_runs(specs)
    for k0, k1, spec in runs:
        a, z = k0 * b, k1 * b
        if spec is None:
            rainy[a:z] = backgrounds[a:z]
            rain[a:z] = 0
            mask[a:z] = False
            continue
        states, active, beta_q = _draws(spec, seeds[k0:k1], keys[k0:k1])
        if on_host:
            params, beta_d = _vector(spec).copy(), beta_q  # numba writes host arguments back after a launch
        else:
            params, states, active, beta_d = (xp.asarray(v) for v in (_vector(spec), states, active, beta_q))
        family(spec.family).render_gpu(params, states, active, rain[a:z])
        composite_gpu(backgrounds[a:z], rain[a:z], beta_d, spec.threshold, rainy[a:z], mask[a:z])
    return len(runs)


def finish_streams_device(x: Any, specs: Sequence[RainSpec | None], seeds: Sequence[int], idx: np.ndarray,
                          keys: np.ndarray, dtype: str = "float32", epochs: Sequence[int] | None = None,
                          step: int = 0) -> MultiBatch:
    """The device path of a multi-stream batch: ``render_streams_device`` on the gathered uint8 batch, then each
    output converted by one table look-up over all K * B patches (``engine.loader.planes.unit_by_lut``).

    Parameters
    ----------
    x : torch.Tensor
        uint8 NHWC [K * B, P, P, 3] (0..255) on a GPU (or on the CPU under numba's CUDA simulator), stream-major.
    specs, seeds : sequences of length K
        Each stream's rain spec (None: no rain) and seed.
    idx, keys : numpy.ndarray
        int64 [K, B] store indices and rain keys.
    dtype : str
        Output type, a name in ``DTYPES``.
    epochs, step
        Recorded in the batch.

    Returns
    -------
    MultiBatch
        On ``x``'s device (``index`` on the CPU); the values of the CPU path (``render_streams_cpu``).
    """
    import torch

    k, b = idx.shape
    p, dev = int(x.shape[1]), x.device
    x = x.contiguous()
    rain_u8 = torch.empty((k * b, p, p), dtype=torch.uint8, device=dev)
    rainy_u8 = torch.empty((k * b, p, p, 3), dtype=torch.uint8, device=dev)
    mask = torch.empty((k * b, p, p), dtype=torch.bool, device=dev)
    kind = arrays.kind_of(x)
    x_d, rain_d, rainy_d, mask_d = (arrays.to_backend(t, kind) for t in (x, rain_u8, rainy_u8, mask))
    render_streams_device(x_d, specs, seeds, keys, rain_d, rainy_d, mask_d)
    if dtype == "uint8":
        conv = lambda t: t.contiguous()  # noqa: E731 - raw values, only the layout changes
    else:
        lut = unit_table(dev, dtype)
        conv = lambda t: unit_by_lut(t, lut)  # noqa: E731
    shape = (k, b, 3, p, p)
    return MultiBatch(index=torch.from_numpy(np.ascontiguousarray(idx, dtype=np.int64).copy()),
                      background=conv(x.permute(0, 3, 1, 2)).view(shape),
                      rainy=conv(rainy_u8.permute(0, 3, 1, 2)).view(shape),
                      rain=conv(rain_u8.unsqueeze(1)).view(k, b, 1, p, p), mask=mask.view(k, b, 1, p, p),
                      epochs=tuple(epochs) if epochs is not None else (0,) * k, step=step)


__all__ = ["MultiBatch", "finish_streams_device", "rain_runs", "render_streams_cpu", "render_streams_device"]

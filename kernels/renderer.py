"""The interface every rain family implements: renderer signatures, argument checks, and the ``RainFamily`` record.

A family renders the rain layer (uint8 NHW, 0..255, before beta) of a batch of patches from the spec's float64
parameter vector (``kernels.params``), the patches' uint64 states (``kernels.rng``) and their uint8 on/off flags,
with three backends that give the same bytes: ``render_cpu`` (numba), ``render_gpu`` (numba.cuda; CuPy arrays, or
numpy arrays under the CUDA simulator) and ``render_reference`` (numpy). ``render_composite_cpu`` and
``render_finish_cpu`` add compositing (``kernels.composite``) or channel planes (``kernels.finish``) to the CPU
render: a family may fuse them per patch (the streak family does), or render the batch first and run the second step
over it (``unfused_family``); the values are the same.

Every family declares its compositing mode (``kernels.params.MODES``). The rain families ("add-layer") make a rain
layer that does not depend on the background and composite it with ``kernels.composite``; families of the other
modes (``kernels.noise``) degrade each channel of each pixel from the background itself, so they have no
background-free layer: their ``render_cpu`` / ``render_gpu`` / ``render_reference`` raise, and every backend goes
through the ``render_composite_*`` and ``render_finish_cpu`` renderers, which write ``rain = max over channels of
|I - B|`` as the layer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from kernels import params as P
from kernels.composite import composite_cpu, composite_gpu, composite_reference
from kernels.finish import finish_cpu


class Renderer(Protocol):
    """``render(params, states, active, out)``: float64 [P.SIZE], uint64 [N], uint8 [N] -> writes uint8 [N, H, W]."""

    def __call__(self, params, states, active, out) -> None: ...


class CompositeRenderer(Protocol):
    """Rain layer plus ``kernels.composite``: writes ``rain`` (uint8 NHW), ``rainy`` (uint8 NHWC), ``mask`` (bool
    NHW) from uint8 NHWC ``backgrounds`` and int64 ``beta_q`` (beta in 1/1024)."""

    def __call__(self, params, states, active, backgrounds, beta_q, threshold: int, rain, rainy, mask) -> None: ...


class FinishRenderer(Protocol):
    """Rain layer plus ``kernels.finish``: writes ``rain`` and the channel planes ``out_bg`` / ``out_rainy``
    ([N, 3, H, W]) and ``out_rain`` ([N, 1, H, W]) of one dtype of ``kernels.finish.PLANE_DTYPES``, and ``mask``;
    patch i's background is ``backgrounds[rows[i]]`` (``rows`` None: ``backgrounds[i]``)."""

    def __call__(self, params, states, active, backgrounds, beta_q, threshold: int, rain, out_bg, out_rainy,
                 out_rain, mask, rows=None) -> None: ...


@dataclass(frozen=True)
class RainFamily:
    """The renderers of one family (module docstring); ``name`` is its key in ``kernels.params.FAMILY_IDS``.

    ``render_composite_gpu`` (CUDA; CuPy arrays, or numpy under the simulator) and ``render_composite_reference``
    (numpy) have the ``CompositeRenderer`` signature; left None, they are ``render_gpu`` / ``render_reference``
    followed by ``kernels.composite.composite_gpu`` / ``composite_reference`` (the "add-layer" mode). ``mode``: the
    family's compositing mode, a key of ``kernels.params.MODES`` (``kernels.params.FAMILY_MODES[name]``).
    """

    name: str
    render_cpu: Renderer
    render_gpu: Renderer
    render_reference: Renderer
    render_composite_cpu: CompositeRenderer
    render_finish_cpu: FinishRenderer
    render_composite_gpu: CompositeRenderer | None = None
    render_composite_reference: CompositeRenderer | None = None

    @property
    def mode(self) -> str:
        """The compositing mode (``kernels.params.FAMILY_MODES``)."""
        return P.FAMILY_MODES[self.name]

    def __post_init__(self) -> None:
        if self.name not in P.FAMILY_MODES:
            raise ValueError(f"RainFamily.name: {self.name!r} is not a family of kernels.params.FAMILY_MODES")
        if self.render_composite_gpu is None:
            object.__setattr__(self, "render_composite_gpu", _layer_then(self.render_gpu, composite_gpu))
        if self.render_composite_reference is None:
            object.__setattr__(self, "render_composite_reference",
                               _layer_then(self.render_reference, _composite_reference_into))


def _composite_reference_into(backgrounds, rain, beta_q, threshold, rainy, mask) -> None:
    rainy[...], mask[...] = composite_reference(backgrounds, rain, beta_q, threshold)


def _layer_then(render: Renderer, composite) -> CompositeRenderer:
    """The "add-layer" composite renderer: ``render`` the rain layer, then ``composite`` it (in place)."""

    def render_composite(params, states, active, backgrounds, beta_q, threshold, rain, rainy, mask) -> None:
        render(params, states, active, rain)
        composite(backgrounds, rain, beta_q, threshold, rainy, mask)

    return render_composite


def unfused_family(name: str, render_cpu: Renderer, render_gpu: Renderer, render_reference: Renderer) -> RainFamily:
    """A ``RainFamily`` whose composite and finish renderers run ``render_cpu`` over the batch, then
    ``kernels.composite.composite_cpu`` or ``kernels.finish.finish_cpu`` over it."""

    def render_finish_cpu(params, states, active, backgrounds, beta_q, threshold, rain, out_bg, out_rainy, out_rain,
                          mask, rows=None) -> None:
        render_cpu(params, states, active, rain)
        finish_cpu(backgrounds, rain, beta_q, threshold, out_bg, out_rainy, out_rain, mask, rows)

    return RainFamily(name, render_cpu, render_gpu, render_reference, _layer_then(render_cpu, composite_cpu),
                      render_finish_cpu)


def check_render_args(params, states, active, out) -> None:
    """Raise a ValueError naming the argument unless the renderer's inputs fit together (numpy or CuPy arrays).

    ``params`` float64 [P.SIZE] (``RainSpec.to_vector()``), ``out`` uint8 NHW [N, H, W] (the rain layer, 0..255),
    ``states`` uint64 [N] (patch states, ``kernels.rng``), ``active`` uint8 [N] (0: the patch gets no rain).
    """
    if tuple(params.shape) != (P.SIZE,) or params.dtype != np.float64:
        raise ValueError(f"params: expected float64[{P.SIZE}] (RainSpec.to_vector()), "
                         f"got {params.dtype}{tuple(params.shape)}")
    if out.ndim != 3 or out.dtype != np.uint8:
        raise ValueError(f"out: expected uint8 [N, H, W] (rain layer, 0..255), got {out.dtype}{tuple(out.shape)}")
    n = out.shape[0]
    if tuple(states.shape) != (n,) or states.dtype != np.uint64:
        raise ValueError(f"states: expected uint64[{n}] (one per patch of out), "
                         f"got {states.dtype}{tuple(states.shape)}")
    if tuple(active.shape) != (n,) or active.dtype != np.uint8:
        raise ValueError(f"active: expected uint8[{n}] (one per patch of out), got {active.dtype}{tuple(active.shape)}")


def host_params(params) -> np.ndarray:
    """``params`` as a host numpy array (a CuPy array is copied: P.SIZE floats)."""
    return params.get() if hasattr(params, "get") and not isinstance(params, np.ndarray) else np.asarray(params)

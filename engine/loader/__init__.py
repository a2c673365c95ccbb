"""Training batches from a patch store: shuffled per epoch, sharded, with rain synthesized on the fly.

``batches(store, subset, ...)`` yields ``Batch`` objects; ``Loader`` is the same thing as an object that keeps its
state (resident data, DALI pipeline) between epochs. Both give exactly the same batches in every mode
(``resident``, ``dali``) and on every device for the same arguments.

Epoch order (a pure function of ``(seed, epoch)`` and the subset's store indices, never of mode, device or shard):
    ``state = patch_state(seed, ~epoch)`` (the key has its top bit set, so it never equals a rain key below);
    each store index ``i`` gets the 64-bit hash ``bits(state, counter(0, i))`` and the epoch visits the subset in
    increasing hash order (ties by index). The order therefore does not depend on how the subset lists its indices.

Batches and shards: the epoch's order is cut into consecutive batches of ``batch_size`` (the last one partial unless
``drop_last``). Batch ``b`` goes to shard ``b % num_shards`` (strided batches), so at every step the ``num_shards``
ranks together hold ``num_shards * batch_size`` consecutive patches of the epoch. With ``drop_last`` every shard
gets the same number of full batches, ``(n // batch_size) // num_shards`` (so DDP ranks stay in step; the few
left-over full batches are dropped too); without it shards may differ by one batch and the last may be partial.

Rain: the rain of the patch with store index ``i`` in epoch ``e`` uses ``engine.synth.synthesize`` with
``key = e << 40 | i`` (``e < 2**23``, ``i < 2**40``) and the loader's ``seed``, on the batch's device.

Units and layouts of a ``Batch`` (see the class), for the default ``dtype="float32"``: images float32 NCHW in 0..1
(uint8 value / 255), rain layer float32 N1HW in 0..1, mask bool N1HW (``rain > threshold`` on the 0..255 scale,
before beta); ``index`` int64 store indices on the CPU. ``dtype`` picks the image / rain-layer type (``DTYPES``):
"bfloat16" and "float16" hold the float32 values rounded to nearest (ties to even), i.e. exactly
``float32_batch.to(dtype)``, at half the bytes; "uint8" holds the raw 0..255 values in the same NCHW / N1HW layouts
(a quarter of the bytes: no float conversion on the host at all), which ``to_unit`` turns into exactly the float32
batch on any device (so a trainer can convert on its GPU). Why: the host conversion is bound by memory writes: a
float32 batch writes 458,752 bytes per 128 x 128 patch (background, rainy, rain), 6.9 GB/s at 15,000 patches/s,
about what one core of the 2-core machine fills (7.6 GB/s measured with numpy).

Modes: ``resident`` reads the subset once into device memory as uint8 NHWC (GPU memory for a CUDA device, host RAM
for the CPU; 30,000 patches of 128 x 128 take 1.47 GB) and gathers each batch by index on the device.
Data-parallel ranks each hold the whole subset, since every epoch reshuffles across shards. ``dali`` streams
batches from the store through an NVIDIA DALI pipeline (``engine.loader.dali``). ``auto`` is resident when the subset
fits ``memory_budget`` (default ``DEFAULT_MEMORY_BUDGET`` = 2 GiB), otherwise dali (resident, with a
RuntimeWarning, when DALI is missing). After the uint8 batch is on the device, every mode runs the same code. On
the CPU one numba pass over the batch renders each patch's rain and, while that is in cache, writes the patch's
planes of the output type (``engine.synth.synthesize_planes_cpu``, ``kernels.finish``): no uint8 rainy image in
between and no second pass over the batch (measured on the 2-core machine: resident float32 loader 9,178 -> 12,038
patches/s). On a GPU: ``engine.synth.synthesize`` there, then conversion by table look-up with torch ops.
"""
from __future__ import annotations

import atexit
import dataclasses
import logging
import math
import os
import sys
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from kernels.rng import bits_np, counter_np, patch_state_np


#: Resident mode is chosen by ``mode="auto"`` when the subset's uint8 patches take at most this many bytes on the
#: device (override with ``memory_budget=``). 2 GiB holds the paper's largest sweep point (30,000 patches of
#: 128 x 128 x 3 = 1.47 GB) on a GPU and is harmless in host RAM.
DEFAULT_MEMORY_BUDGET = 2 << 30

#: Epochs and store indices must fit the rain key ``epoch << 40 | index`` (a non-negative int64).
MAX_EPOCH = (1 << 23) - 1
MAX_INDEX = (1 << 40) - 1
#: The shuffle hashes ``counter(0, index)``, whose index field has 32 bits.
MAX_SHUFFLE_INDEX = (1 << 32) - 1

MODES = ("auto", "resident", "dali")

#: Output types of the images and rain layer of a ``Batch`` (see ``Loader``'s ``dtype``).
DTYPES = ("float32", "bfloat16", "float16", "uint8")

log = logging.getLogger("rainsweep.loader")


class LoaderError(ValueError):
    """Bad loader arguments: the message names the argument and what was expected."""


@dataclass
class Batch:
    """One batch of training pairs.

    Attributes:
        index: int64 [N] store indices of the patches (torch, on the CPU so logging never syncs the GPU).
        background: [N, 3, P, P] NCHW (contiguous), on the loader's device: float32 0..1 (store uint8 / 255) by
            default; bfloat16 / float16 0..1 (that float32 value rounded to nearest even) or uint8 0..255 (the
            store value itself) with the loader's ``dtype``.
        rainy: [N, 3, P, P] NCHW, same dtype and scale as ``background``: ``clip(B + beta * R, 0, 255)`` (/ 255
            for float types); equals ``background`` when the loader has no rain or a patch drew no rain.
        rain: [N, 1, P, P] N1HW, same dtype and scale: the rain layer ``R`` (/ 255 for float types) before beta
            (zeros without rain).
        mask: bool [N, 1, P, P]: ``R > threshold`` on the 0..255 scale (all False without rain).
        epoch: the epoch the batch belongs to.
        step: the batch's number within this shard's epoch (0, 1, ...).
    """

    index: Any
    background: Any
    rainy: Any
    rain: Any
    mask: Any
    epoch: int
    step: int

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---- argument resolution -------------------------------------------------------------------------------------------

def resolve_store(store: Any):
    """A ``PatchStore`` from a path or an open store."""
    from engine.data import store as store_mod

    if isinstance(store, (str, os.PathLike)):
        return store_mod.open_store(store)
    if all(hasattr(store, a) for a in ("count", "patch_size", "read")):
        return store
    raise LoaderError(f"store: expected a store path or an engine.data.store.PatchStore, got {type(store).__name__}")


def resolve_subset(store: Any, subset: Any) -> np.ndarray:
    """Store indices (int64, unique, in the order given) of ``subset``: None (all patches), a ``Subset``, a path to a
    subset JSON, or an integer array / sequence. Mismatched stores and out-of-range indices raise."""
    if subset is None:
        return np.arange(store.count, dtype=np.int64)
    if isinstance(subset, (str, os.PathLike)):
        from engine.data.select import load_subset

        subset = load_subset(subset)
    if hasattr(subset, "indices") and hasattr(subset, "store_fingerprint"):
        from engine.data.select import check_subset

        check_subset(store, subset)  # raises when the subset was selected from another store
        subset = subset.indices
    if type(subset).__module__.split(".")[0] == "torch":
        subset = subset.detach().cpu().numpy()
    arr = np.asarray(subset)
    if arr.ndim != 1:
        raise LoaderError(f"subset: expected a 1-d array of store indices, got shape {arr.shape}")
    if arr.size == 0:
        raise LoaderError("subset: is empty; expected at least one store index")
    if not np.issubdtype(arr.dtype, np.integer):
        raise LoaderError(f"subset: expected integer store indices, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= store.count:
        raise LoaderError(f"subset: store indices must lie in 0..{store.count - 1} (the store holds {store.count} "
                          f"patches), got {lo}..{hi}; was the subset selected from another store?")
    if np.unique(arr).size != arr.size:
        raise LoaderError("subset: holds duplicate store indices; an epoch visits each patch exactly once")
    if hi > MAX_SHUFFLE_INDEX:
        raise LoaderError(f"subset: store indices above {MAX_SHUFFLE_INDEX} are not supported")
    return arr


def resolve_rain(rain: Any):
    """A ``RainSpec`` (or None for no rain) from a spec, a preset name or a spec string."""
    from engine.rain import RainSpec

    if rain is None or isinstance(rain, RainSpec):
        return rain
    if isinstance(rain, str):
        try:
            return RainSpec.parse(rain)
        except ValueError as err:
            raise LoaderError(f"rain: {err}") from None
    raise LoaderError(f"rain: expected a RainSpec, a preset name or spec string, or None; got {type(rain).__name__}")


def resolve_device(device: Any):
    """A ``torch.device`` for ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a torch.device; CUDA must be usable."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise LoaderError(f"device: expected 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise LoaderError(f"device: expected 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise LoaderError(f"device: {device!r} asked for but torch sees no CUDA GPU; use device='cpu'")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        if dev.index >= torch.cuda.device_count():
            raise LoaderError(f"device: {device!r} does not exist; {torch.cuda.device_count()} CUDA device(s)")
    return dev


def _check_int(name: str, value: Any, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise LoaderError(f"{name}: expected an integer, got {value!r}")
    value = int(value)
    if value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        raise LoaderError(f"{name}: expected an integer {rng}, got {value}")
    return value


# ---- order, batches, shards ----------------------------------------------------------------------------------------

def epoch_order(indices: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """The subset's store indices in the visiting order of ``epoch`` (see the module docstring)."""
    indices = np.asarray(indices, dtype=np.int64)
    # ~epoch = -(epoch + 1) < 0: never a rain key (those are >= 0), so the shuffle is independent of any rain draw.
    state = patch_state_np(int(seed), np.asarray([~int(epoch)], dtype=np.int64))
    h = bits_np(state, counter_np(0, indices.astype(np.uint64)))
    return indices[np.lexsort((indices, h))]


def shard_batches(n: int, batch_size: int, shard_id: int, num_shards: int, drop_last: bool) -> list[tuple[int, int]]:
    """``(start, stop)`` positions in the epoch order of the batches that shard ``shard_id`` yields, in order."""
    if drop_last:
        per_shard = (n // batch_size) // num_shards
        ids = [shard_id + k * num_shards for k in range(per_shard)]
    else:
        ids = list(range(shard_id, math.ceil(n / batch_size), num_shards))
    return [(b * batch_size, min((b + 1) * batch_size, n)) for b in ids]


def rain_keys(epoch: int, index: np.ndarray) -> np.ndarray:
    """int64 rain keys ``epoch << 40 | index`` of the patches with store indices ``index``."""
    return (np.int64(epoch) << np.int64(40)) | np.asarray(index, dtype=np.int64)


# ---- finishing a batch: rain and conversion on the batch's device ----------------------------------------------------

#: uint8 value v -> float32(v) / 255, exactly what ``x.float() / 255`` gives (IEEE division rounds the same way).
_UNIT_LUT = np.arange(256, dtype=np.float32) / np.float32(255.0)


def unit_by_lut(x, lut):
    """float32 ``x / 255`` of a uint8 torch tensor as a contiguous tensor of ``x``'s shape, through the table ``lut``
    (on ``x``'s device). Why not ``x.float() / 255``: CUDA divides by a scalar as a multiplication by its
    reciprocal, which differs from the true quotient in the last bit for 126 of the 256 values; the table gives
    the CPU path's values bit for bit on every device."""
    return lut[x.to(lut.device, non_blocking=True).int()].contiguous()


_DEVICE_LUTS: dict[str, Any] = {}


def _device_lut(device, dtype: str = "float32") -> Any:
    """The conversion table uint8 -> ``dtype`` (a float type of ``DTYPES``) as a torch tensor on ``device``."""
    import torch

    key = f"{device}/{dtype}"
    if key not in _DEVICE_LUTS:
        _DEVICE_LUTS[key] = torch.from_numpy(_UNIT_LUT).to(device).to(torch_dtype(dtype))
    return _DEVICE_LUTS[key]


def resolve_dtype(dtype: Any) -> str:
    """The name in ``DTYPES`` of ``dtype`` (a name or a torch dtype)."""
    name = str(dtype).removeprefix("torch.") if dtype is not None else ""
    if name not in DTYPES:
        raise LoaderError(f"dtype: expected one of {', '.join(DTYPES)} (or the torch dtype), got {dtype!r}")
    return name


def torch_dtype(dtype: str):
    import torch

    return getattr(torch, resolve_dtype(dtype))


#: numpy type the CPU kernel writes for each output dtype (16-bit floats as their bit patterns, viewed by torch;
#: int16 for bfloat16 and uint16 for float16, which is how ``kernels.finish`` tells the two apart).
_STORAGE = {"float32": np.float32, "bfloat16": np.int16, "float16": np.uint16, "uint8": np.uint8}
_HOST_LUTS: dict[str, np.ndarray] = {}


def _host_lut(dtype: str) -> np.ndarray:
    """uint8 value -> output value of ``dtype`` (as ``_STORAGE[dtype]``) for the CPU kernel: the float32 quotient
    v / 255 rounded to nearest even by torch / numpy (bit for bit ``float32_batch.to(dtype)``), or v for uint8."""
    if dtype not in _HOST_LUTS:
        import torch

        if dtype == "float32":
            lut = _UNIT_LUT
        elif dtype == "uint8":
            lut = np.arange(256, dtype=np.uint8)
        else:
            lut = torch.from_numpy(_UNIT_LUT).to(torch_dtype(dtype)).view(torch.int16).numpy().view(_STORAGE[dtype])
        _HOST_LUTS[dtype] = np.ascontiguousarray(lut)
    return _HOST_LUTS[dtype]


def to_unit(x, dtype: Any = "float32"):
    """A loader ``dtype="uint8"`` tensor (0..255, any layout, any device) as the float batch the loader would have
    given with ``dtype`` (float32 by default: exactly ``v / 255``), contiguous, on ``x``'s device.

    For a trainer that takes uint8 batches (a quarter of the host-to-GPU bytes) and converts on its GPU:
    ``rainy = to_unit(batch.rainy.to("cuda", non_blocking=True))``. Prefer it over ``x.float() / 255``, which on
    CUDA multiplies by 1/255 and is off in the last bit for about half of the values.
    """
    name = resolve_dtype(dtype)
    if name == "uint8":
        return x.contiguous()
    return unit_by_lut(x, _device_lut(x.device, name))


class _HostPool:
    """Recycles the host buffers of batches the caller has let go of.

    Fresh batch buffers cost a page fault and the kernel's zeroing per 4 KiB (as much CPU as the conversion itself).
    Each buffer is a numpy array wrapped by ``torch.from_numpy``; torch keeps a reference to the array as long as
    any tensor or view of that storage lives (``.numpy()`` views hold the tensor, so they count too). An array whose
    reference count is back to the pool's own is therefore unused and can be handed out again.
    """

    SLOTS = 6  # buffers per shape: enough for a consumer that holds a few batches (prefetch, logging)
    SHAPES = 4  # shapes remembered (full batch, the last partial one, ...)

    def __init__(self) -> None:
        self._slots: dict[tuple, list[np.ndarray]] = {}
        self._free_refs: int | None = None

    @staticmethod
    def _refs(slots: list[np.ndarray], i: int) -> int:
        return sys.getrefcount(slots[i])

    def empty(self, shape: tuple, dtype) -> Any:
        import torch

        key = (tuple(shape), np.dtype(dtype).str)
        slots = self._slots.get(key)
        if slots is None:
            while len(self._slots) >= self.SHAPES:
                self._slots.pop(next(iter(self._slots)))
            slots = self._slots[key] = []
        if self._free_refs is not None:
            for i in range(len(slots)):
                if self._refs(slots, i) == self._free_refs:
                    return torch.from_numpy(slots[i])
        arr = np.empty(shape, dtype=dtype)
        if len(slots) < self.SLOTS:
            slots.append(arr)
            if self._free_refs is None:  # what _refs reports for a slot nobody else holds (the list and `arr`)
                self._free_refs = self._refs(slots, len(slots) - 1) - 1
        return torch.from_numpy(arr)


class _Scratch:
    """Per-loader reusable host memory: the uint8 rain layer of one batch size (an intermediate step before the
    output planes) and the pool of output buffers."""

    def __init__(self) -> None:
        self._rain: np.ndarray | None = None
        self.pool = _HostPool()

    def rain(self, n: int, h: int, w: int) -> np.ndarray:
        """uint8 [n, h, w] for a batch's rain layer."""
        if self._rain is None or self._rain.shape != (n, h, w):
            self._rain = np.empty((n, h, w), dtype=np.uint8)
        return self._rain



def finish_batch(background_u8, index: np.ndarray, rain, seed: int, epoch: int, step: int,
                 scratch: _Scratch | None = None, dtype: str = "float32", rows: np.ndarray | None = None) -> Batch:
    """Synthesize rain for a uint8 NHWC batch (torch, on its device) and convert everything to a ``Batch`` of
    ``dtype`` (see ``DTYPES``).

    Keys are ``epoch << 40 | index``; conversion happens on the batch's device. ``rows`` (CPU only): int64 rows of
    ``background_u8`` holding the batch's patches, in order (``background_u8`` is then e.g. the resident subset).
    """
    index = np.ascontiguousarray(index, dtype=np.int64)
    if background_u8.device.type == "cpu":
        return _finish_batch_cpu(background_u8, index, rain, seed, epoch, step, scratch or _Scratch(), dtype, rows)
    if rows is not None:
        raise LoaderError("rows: only for CPU batches; gather GPU batches first")
    return _finish_batch_gpu(background_u8, index, rain, seed, epoch, step, dtype)


def _finish_batch_cpu(background_u8, index: np.ndarray, rain, seed: int, epoch: int, step: int, scratch: _Scratch,
                      dtype: str, rows: np.ndarray | None) -> Batch:
    """The host path: one numba pass renders each patch's rain and writes its planes (``synthesize_planes_cpu``)
    into pooled buffers. No torch operation runs here (numpy and numba only), so torch's thread pool stays idle."""
    import torch

    from engine.synth import synthesize_planes_cpu

    _, h, w, c = (int(v) for v in background_u8.shape)
    n = int(index.size)
    storage = _STORAGE[dtype]
    tdt = torch_dtype(dtype)
    pool = scratch.pool

    def planes(shape: tuple):
        """(torch tensor of ``dtype``, numpy view of its storage) of a pooled buffer."""
        t = pool.empty(shape, storage)
        return (t if t.dtype == tdt else t.view(tdt)), t.numpy()

    bg, bg_np = planes((n, c, h, w))
    rainy, rainy_np = planes((n, c, h, w))
    mask = pool.empty((n, 1, h, w), np.bool_)
    if dtype == "uint8":
        # the uint8 rain layer is the rain plane itself (NHW viewed as N1HW): rendered in place, no copy
        rain_t, rain_np = planes((n, 1, h, w))
        layer, skip = rain_np.reshape(n, h, w), np.empty((0, 1, 1, 1), dtype=storage)
    else:
        rain_t, rain_np = planes((n, 1, h, w))
        layer, skip = scratch.rain(n, h, w), None
    synthesize_planes_cpu(background_u8.numpy(), rain, seed, rain_keys(epoch, index), layer,
                          bg_np, rainy_np, rain_np if skip is None else skip, mask.numpy().reshape(n, h, w), rows)
    return Batch(index=torch.from_numpy(index.copy()), background=bg, rainy=rainy, rain=rain_t, mask=mask,
                 epoch=epoch, step=step)


def _finish_batch_gpu(background_u8, index: np.ndarray, rain, seed: int, epoch: int, step: int,
                      dtype: str) -> Batch:
    """The device path: ``synthesize`` on the batch's GPU, then conversion by table look-up there."""
    import torch

    n, h, w, c = (int(v) for v in background_u8.shape)
    dev = background_u8.device
    tdt = torch_dtype(dtype)
    res = None
    if rain is not None:
        from engine.synth import synthesize

        res = synthesize(background_u8, rain, seed=seed, keys=rain_keys(epoch, index))
    if dtype == "uint8":
        conv = lambda t: t.contiguous()  # noqa: E731 - raw values, only the layout changes
    else:
        lut = _device_lut(dev, dtype)
        conv = lambda t: unit_by_lut(t, lut)  # noqa: E731
    bg = conv(background_u8.permute(0, 3, 1, 2))
    if res is None:
        rainy = bg.clone()
        rain_f = torch.zeros((n, 1, h, w), dtype=tdt, device=dev)
        mask = torch.zeros((n, 1, h, w), dtype=torch.bool, device=dev)
    else:
        rainy = conv(res.rainy.permute(0, 3, 1, 2))
        rain_f = conv(res.rain.unsqueeze(1))
        mask = res.mask.unsqueeze(1)
    return Batch(index=torch.from_numpy(index.copy()), background=bg, rainy=rainy, rain=rain_f, mask=mask,
                 epoch=epoch, step=step)


# ---- resident mode -------------------------------------------------------------------------------------------------

class ResidentData:
    """The subset's uint8 NHWC patches, loaded once into device memory (host RAM for the CPU), gathered by index."""

    #: Patches read from the store per step while loading (bounds the host memory used on the way to a GPU).
    LOAD_CHUNK = 4096

    def __init__(self, store, indices: np.ndarray, device) -> None:
        import torch

        self.sorted = np.sort(np.asarray(indices, dtype=np.int64))
        p = store.patch_size
        self.device = device
        n = self.sorted.size
        # CPU: a numpy array, because torch's CPU index_select on uint8 images is ~100x slower than np.take
        host = np.empty((n, p, p, 3), dtype=np.uint8) if device.type == "cpu" else None
        self.data = host if host is not None else torch.empty((n, p, p, 3), dtype=torch.uint8, device=device)
        for start in range(0, n, self.LOAD_CHUNK):
            stop = min(n, start + self.LOAD_CHUNK)
            part = host[start:stop] if host is not None else np.empty((stop - start, p, p, 3), dtype=np.uint8)
            if _accepts_out(store):
                store.read(self.sorted[start:stop], out=part)  # straight into place, no temporary
            else:
                np.copyto(part, _checked(store.read(self.sorted[start:stop]), (stop - start, p, p, 3)))
            if host is None:
                self.data[start:stop].copy_(torch.from_numpy(part))
        self.nbytes = n * p * p * 3

    def rows(self, index: np.ndarray) -> np.ndarray:
        """Rows of the resident array holding the given store indices."""
        return np.searchsorted(self.sorted, index)

    def gather(self, rows: Any) -> Any:
        """uint8 NHWC batch of ``rows`` (a device int64 tensor) on the GPU. The CPU loader does not gather: its
        kernels read the resident rows in place (``finish_batch``'s ``rows``)."""
        return self.data.index_select(0, rows)


def _accepts_out(store: Any) -> bool:
    import inspect

    try:
        return "out" in inspect.signature(store.read).parameters
    except (TypeError, ValueError):
        return False


def _checked(part: Any, shape: tuple) -> np.ndarray:
    part = np.asarray(part)
    if part.shape != shape or part.dtype != np.uint8:
        raise LoaderError(f"store: read() returned {part.dtype} {part.shape}; expected uint8 {list(shape)}")
    return part


# ---- the loader ----------------------------------------------------------------------------------------------------

class Loader:
    """Batches of one store subset for any number of epochs; see ``batches`` for the arguments."""

    def __init__(self, store: Any, subset: Any = None, batch_size: int = 16, rain: Any = "medium", seed: int = 0,
                 device: Any = "cpu", mode: str = "auto", drop_last: bool = False, shard_id: int = 0,
                 num_shards: int = 1, memory_budget: int = DEFAULT_MEMORY_BUDGET, workers: int | None = None,
                 threads: int = 2, dtype: Any = "float32") -> None:
        if mode not in MODES:
            raise LoaderError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.num_shards = _check_int("num_shards", num_shards, 1)
        self.shard_id = _check_int("shard_id", shard_id, 0, self.num_shards - 1)
        self.seed = _check_int("seed", seed, -(1 << 63), (1 << 63) - 1)  # an int64, like the rain seed
        self.memory_budget = _check_int("memory_budget", memory_budget, 0)
        self.threads = _check_int("threads", threads, 1)
        if workers is not None:
            workers = _check_int("workers", workers, 0)
        self.workers = workers
        self.drop_last = bool(drop_last)
        self.dtype = resolve_dtype(dtype)
        self.device = resolve_device(device)
        self.rain = resolve_rain(rain)
        self.store = resolve_store(store)
        self.indices = resolve_subset(self.store, subset)
        self.patch_size = int(self.store.patch_size)
        self.requested_mode = mode
        self.note = ""
        self.mode = self._choose_mode(mode)
        if self.note:
            log.info("loader: %s", self.note)
        self._resident: ResidentData | None = None
        self._dali = None
        self._scratch = _Scratch()
        self._lock = threading.Lock()

    # -- mode choice --
    @property
    def subset_nbytes(self) -> int:
        return int(self.indices.size) * self.patch_size * self.patch_size * 3

    def _choose_mode(self, mode: str) -> str:
        if mode == "resident":
            return mode
        if mode == "dali":
            from engine.loader.dali import dali_problem

            problem = dali_problem()
            if problem:
                raise LoaderError(f"mode: 'dali' cannot run: {problem}; use mode='resident' or 'auto'")
            return mode
        if self.subset_nbytes <= self.memory_budget:
            self.note = (f"auto: resident ({self.subset_nbytes / 2**20:.1f} MiB <= memory budget "
                         f"{self.memory_budget / 2**20:.1f} MiB)")
            return "resident"
        from engine.loader.dali import dali_problem

        problem = dali_problem()
        if problem:
            self.note = (f"auto: subset ({self.subset_nbytes / 2**20:.1f} MiB) exceeds the memory budget but DALI "
                         f"cannot run ({problem}); falling back to resident")
            warnings.warn(self.note, RuntimeWarning, stacklevel=3)
            return "resident"
        self.note = (f"auto: dali ({self.subset_nbytes / 2**20:.1f} MiB > memory budget "
                     f"{self.memory_budget / 2**20:.1f} MiB)")
        return "dali"

    # -- sizes --
    def __len__(self) -> int:
        """Batches this shard yields per epoch."""
        return len(shard_batches(self.indices.size, self.batch_size, self.shard_id, self.num_shards, self.drop_last))

    def plan(self, epoch: int) -> list[np.ndarray]:
        """Store indices of each batch this shard yields in ``epoch``, in order."""
        epoch = _check_int("epoch", epoch, 0, MAX_EPOCH)
        order = epoch_order(self.indices, self.seed, epoch)
        return [order[a:b] for a, b in shard_batches(order.size, self.batch_size, self.shard_id, self.num_shards,
                                                     self.drop_last)]

    # -- iteration --
    def epoch(self, epoch: int = 0) -> Iterator[Batch]:
        """Yield the batches of ``epoch`` for this shard."""
        plan = self.plan(epoch)
        if self.mode == "resident":
            return self._resident_epoch(plan, epoch)
        return self._dali_epoch(plan, epoch)

    def _resident_epoch(self, plan: list[np.ndarray], epoch: int) -> Iterator[Batch]:
        import torch

        with self._lock:
            if self._resident is None:
                self._resident = ResidentData(self.store, self.indices, self.device)
        data = self._resident
        if not plan:
            return
        # one host-to-device copy of the epoch's rows; per batch only a slice and a gather on the device
        rows_all = data.rows(np.concatenate(plan))
        if self.device.type == "cuda":
            rows_all = torch.from_numpy(rows_all).to(self.device)
        start = 0
        for step, idx in enumerate(plan):
            rows = rows_all[start:start + idx.size]
            start += idx.size
            if isinstance(data.data, np.ndarray):
                # CPU: the kernels read the resident rows in place (a gathered copy cost ~23 us per patch, serial)
                yield finish_batch(torch.from_numpy(data.data), idx, self.rain, self.seed, epoch, step, self._scratch,
                                   self.dtype, rows=rows)
            else:
                yield finish_batch(data.gather(rows), idx, self.rain, self.seed, epoch, step, self._scratch,
                                   self.dtype)

    def _dali_epoch(self, plan: list[np.ndarray], epoch: int) -> Iterator[Batch]:
        from engine.loader.dali import DaliReader, ReaderBusy

        with self._lock:
            if self._dali is None:
                self._dali = DaliReader(self.store, self.batch_size, self.device, threads=self.threads,
                                        workers=self.workers, capacity=int(self.indices.size))
        try:
            for step, (u8, idx) in enumerate(self._dali.epoch(plan)):
                yield finish_batch(u8, idx, self.rain, self.seed, epoch, step, self._scratch, self.dtype)
        except ReaderBusy:
            raise  # the caller's mistake; the epoch in progress goes on
        except Exception:
            # an epoch that failed (a damaged store, ...) leaves DALI mid-iteration, where its pipeline cannot be
            # reset: the next epoch builds a fresh one
            with self._lock:
                dali, self._dali = self._dali, None
            if dali is not None:
                dali.close()
            raise

    def __enter__(self) -> "Loader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Free the resident data and stop DALI workers."""
        self._resident = None
        if self._dali is not None:
            self._dali.close()
            self._dali = None


# one Loader per argument set, so calling ``batches`` every epoch reuses resident data and DALI pipelines
_CACHE: dict[tuple, Loader] = {}
_CACHE_SIZE = 2


def _cache_key(store: Any, subset: Any, kwargs: dict) -> tuple | None:
    try:
        if isinstance(store, (str, os.PathLike)):
            root = Path(store).resolve()
            # a store rebuilt at the same path rewrites zarr.json: a new key, so no stale resident data
            skey = ("path", str(root), (root / "zarr.json").stat().st_mtime_ns)
        else:
            # by content, not id(): a collected store's id can be reused by another one
            skey = ("store", str(Path(store.path).resolve()), getattr(store, "fingerprint", None))
        if subset is None:
            sub = None
        elif isinstance(subset, (str, os.PathLike)):
            p = Path(subset).resolve()
            sub = ("path", str(p), p.stat().st_mtime_ns)
        elif hasattr(subset, "indices"):
            sub = ("subset", np.asarray(subset.indices).tobytes(), getattr(subset, "store_fingerprint", None))
        else:
            a = subset.detach().cpu().numpy() if type(subset).__module__.startswith("torch") else np.asarray(subset)
            sub = ("array", str(a.dtype), a.tobytes())
        items = tuple(sorted((k, repr(v)) for k, v in kwargs.items()))
        return (skey, sub, items)
    except (OSError, TypeError, ValueError):
        return None


def batches(store: Any, subset: Any = None, batch_size: int = 16, rain: Any = "medium", seed: int = 0,
            epoch: int = 0, device: Any = "cpu", mode: str = "auto", drop_last: bool = False, shard_id: int = 0,
            num_shards: int = 1, memory_budget: int = DEFAULT_MEMORY_BUDGET, workers: int | None = None,
            threads: int = 2, dtype: Any = "float32") -> Iterator[Batch]:
    """Yield the training batches of one epoch (``Batch``: index, background, rainy, rain, mask).

    Args:
        store: a store path or an open ``engine.data.store.PatchStore`` (uint8 patches [N, P, P, 3]).
        subset: None (every patch), an ``engine.data.select.Subset``, a path to a subset JSON, or store indices (int).
        batch_size: patches per batch (>= 1).
        rain: a ``RainSpec``, a preset name or spec string (``RainSpec.parse``), or None for no rain
            (rainy == background, rain = 0, mask all False).
        seed: seeds both the shuffle and the rain.
        epoch: 0 .. 2**23 - 1; each epoch visits every subset index exactly once, in an order fixed by (seed, epoch).
        device: "cpu", "cuda", "cuda:N" or a torch.device: where the tensors (and the rain synthesis) live.
        mode: "resident" (subset loaded once into device memory, gathered by index), "dali" (NVIDIA DALI pipeline
            reading the store; CPU pipeline without a GPU, GPU output with one) or "auto" (resident when the
            subset's uint8 patches fit ``memory_budget`` bytes, default 2 GiB, else dali; resident when DALI
            is missing). Every mode yields the same batches.
        drop_last: drop the last partial batch (and, with shards, equalize batch counts across shards).
        shard_id, num_shards: this rank's share of the epoch: batch ``b`` goes to shard ``b % num_shards``.
        memory_budget: bytes for ``mode="auto"``.
        workers: DALI parallel reader processes (None: 0 for a CPU device, where reading is cheap next to rain
            synthesis, else min(8, cores / 2); 0: read in this process, on the loader's DALI feed thread).
        threads: DALI CPU threads (torch and numba threads are the caller's to set).
        dtype: type of ``background``, ``rainy`` and ``rain`` (a name in ``DTYPES`` or the torch dtype):
            "float32" (default, 0..1 = uint8 / 255), "bfloat16" / "float16" (0..1, that float32 value rounded to
            nearest even: half the bytes), "uint8" (raw 0..255, same NCHW / N1HW layouts, a quarter of the bytes;
            ``to_unit(t)`` gives the float32 values exactly, on any device). ``mask`` is always bool.

    Loaders are cached per argument set (the last two), so resident data is loaded and DALI pipelines are built
    once across epochs; use ``Loader`` directly to control their lifetime.
    """
    kwargs = dict(batch_size=batch_size, rain=rain, seed=seed, device=device, mode=mode, drop_last=drop_last,
                  shard_id=shard_id, num_shards=num_shards, memory_budget=memory_budget, workers=workers,
                  threads=threads, dtype=resolve_dtype(dtype))
    key = _cache_key(store, subset, kwargs)
    loader = _CACHE.get(key) if key is not None else None
    if loader is None:
        loader = Loader(store, subset, **kwargs)
        if key is not None:
            while len(_CACHE) >= _CACHE_SIZE:
                _CACHE.pop(next(iter(_CACHE))).close()
            _CACHE[key] = loader
    return loader.epoch(epoch)


def clear_cache() -> None:
    """Forget the cached loaders (frees resident patches and stops DALI workers)."""
    while _CACHE:
        _CACHE.popitem()[1].close()


atexit.register(clear_cache)  # stop DALI workers and free shared memory before the interpreter tears down


__all__: Sequence[str] = ("Batch", "Loader", "LoaderError", "batches", "clear_cache", "epoch_order", "shard_batches",
                          "rain_keys", "DEFAULT_MEMORY_BUDGET", "DTYPES", "to_unit")

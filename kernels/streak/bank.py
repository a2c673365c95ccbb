"""Built streak kernels as padded float64 tap rows, and a per-process bank of them for the CPU renderer.

Tap rows (``pad_rows``): the CPU splat (``kernels.streak.cpu``) reads a kernel as rows of float64 taps, each row
zero-padded by ``BLOCK`` floats on both sides, so that a row read at any alignment phase is whole vector blocks.

Why a bank: a patch's streak kernel depends only on its ``(length, angle, width)`` draw, and a spec has few such
combinations (``medium``: 11 lengths x 61 angles x 3 widths = 2,013) while a training run renders millions of
patches. Building the kernel per patch (a rotated line, two Gaussian passes and the seed filter) is a sizeable
part of a patch's CPU time; the bank builds each combination once per process and the renderer reads it.

How it is used (``prepare``, called by the CPU renderer before every batch): a numba pre-pass draws each active
patch's combination (the renderer's own ``draw_params``), the missing kernels are built serially on the calling
thread (warm-up cost only), and the renderer gets ``(combos, meta, rinfo, taps)`` to read inside its parallel
region. The arrays are only written here, outside any parallel region, under a lock (the render kernels release
the GIL, so another thread may be rendering meanwhile). Growing replaces ``rinfo`` / ``taps`` (the renderer keeps
the ones it was handed) and a built entry is never rewritten; ``meta`` is shared, but a renderer only reads the
entries of its own batch, which were complete (or left out for good, see ``_Bank.full``) when it got them. No races.

Layouts (one bank per distinct kernel-relevant part of the ``params`` vector: length and angle ranges, widths):

- ``combos`` int64 [N]: patch ``i``'s combination index ``((length - length_lo) * n_angles + angle - angle_lo)
  * n_widths + k`` (``k``: first width slot holding the patch's width), -1 for inactive patches.
- ``meta`` int64 [n_combos, 8]: per combination ``(built, n_rows, dy_min, dy_max, dx_min, dx_max, r0, 0)``;
  ``built`` 0 means "not in the bank": the renderer then builds that patch's kernel itself.
- ``rinfo`` int64 [R, 4]: tap rows ``r0 .. r0 + n_rows - 1`` of a kernel, each ``(dy, dx0, n, first)``.
- ``taps`` float64 [T]: each row's ``n`` taps from ``first`` (exact integers <= 2**TAP_BITS), zero padding of
  ``BLOCK`` floats around every row (``pad_rows``), ~7 KB per ``medium`` kernel.

Memory stays bounded: no bank for a spec with more than ``MAX_COMBOS`` combinations (``meta`` alone would be
large and most kernels would be used rarely), and all banks together stay within ``MAX_BYTES`` (a bank that
would outgrow its share stops adding kernels; the rest are built per patch, as without a bank). Least recently
used banks are dropped first, at most ``MAX_BANKS`` are kept.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np
from numba import njit

from kernels import params as P
from kernels.simd import BLOCK
from kernels.streak import kernel, patch
from kernels.streak.tables import GAUSS, TRIG

_build_kernel = kernel.cpu.build_kernel
_draw_params = patch.cpu.draw_params

#: Largest combination grid (lengths x angles x widths) that gets a bank; ``meta`` is 64 bytes per combination.
MAX_COMBOS = 16384
#: Bytes of all banks together (``meta``, ``rinfo`` and ``taps``); all 2,013 ``medium`` kernels take ~16 MB.
MAX_BYTES = 64 << 20
#: Banks kept per process (least recently used dropped first).
MAX_BANKS = 8
#: False: no bank, every patch builds its kernel (the tests compare both ways).
ENABLED = True

_META_COLS = 8


@njit(cache=True)
def pad_rows(rows, vals, n_rows, rinfo, r0, taps, t0):
    """Store a built kernel as zero-padded float64 tap rows; returns the index of ``taps`` past the last zero.

    Input: ``rows`` int64 [4, KS] and ``vals`` int64 from ``kernels.streak.kernel``'s ``build_kernel`` (``n_rows``
    rows). Output: ``rinfo[r0 + r] = (dy, dx0, n, first)`` (int64 [R, 4]) and ``taps[first : first + n]`` the row's
    taps (float64, exact integers <= 2**TAP_BITS), written from ``taps[t0]`` with ``BLOCK`` zeros before the first
    row and after every row (shared between neighbours). Needs ``n_vals + BLOCK (n_rows + 1)`` floats of ``taps``
    and ``n_rows`` rows of ``rinfo``.

    The splat reads a row at phase ``s`` (0 <= s < BLOCK) as the blocks ``taps[first - s + BLOCK jb : ... +
    BLOCK]``: the padding makes those the row shifted right by ``s`` and zero-filled, so one copy per row serves
    all phases (small enough to keep per kernel in the bank).
    """
    t = t0
    for k in range(BLOCK):
        taps[t + k] = 0.0
    t += BLOCK
    for r_ in range(n_rows):
        n = rows[2, r_]
        off = rows[3, r_]
        rinfo[r0 + r_, 0] = rows[0, r_]
        rinfo[r0 + r_, 1] = rows[1, r_]
        rinfo[r0 + r_, 2] = n
        rinfo[r0 + r_, 3] = t
        for j in range(n):
            taps[t + j] = np.float64(vals[off + j])
        t += n
        for k in range(BLOCK):
            taps[t + k] = 0.0
        t += BLOCK
    return t


class _Bank:
    """One spec's kernels (layouts in the module docstring); ``built`` counts kernels added so far, ``full``: the
    byte cap stopped the filling (the missing kernels stay per patch; not retried, so as not to rebuild them for
    every batch)."""

    __slots__ = ("meta", "rinfo", "taps", "r_used", "t_used", "built", "full")

    def __init__(self, n_combos: int) -> None:
        self.meta = np.zeros((n_combos, _META_COLS), dtype=np.int64)
        self.rinfo = np.empty((0, 4), dtype=np.int64)
        self.taps = np.empty(0, dtype=np.float64)
        self.r_used = 0
        self.t_used = 0
        self.built = 0
        self.full = False

    @property
    def nbytes(self) -> int:
        return self.meta.nbytes + self.rinfo.nbytes + self.taps.nbytes


_BANKS: OrderedDict[bytes, _Bank] = OrderedDict()
_LOCK = threading.Lock()


def _off() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The "no bank" tuple: no combination for any patch."""
    return (np.empty(0, dtype=np.int64), np.empty((0, _META_COLS), dtype=np.int64), np.empty((0, 4), dtype=np.int64),
            np.empty(0, dtype=np.float64))


def grid_size(params: np.ndarray) -> int:
    """Number of (length, angle, width slot) combinations of a streak ``params`` vector (0: degenerate ranges)."""
    n_len = int(params[P.LENGTH_HI]) - int(params[P.LENGTH_LO]) + 1
    n_ang = int(params[P.ANGLE_HI]) - int(params[P.ANGLE_LO]) + 1
    n_w = int(params[P.N_WIDTHS])
    if n_len < 1 or n_ang < 1 or not 1 <= n_w <= P.MAX_WIDTHS:
        return 0
    return n_len * n_ang * n_w


def _key(params: np.ndarray) -> bytes:
    """The part of ``params`` that decides the kernels and the combination index (amount, beta, padding do not)."""
    n_w = int(params[P.N_WIDTHS])
    fields = np.concatenate([params[[P.LENGTH_LO, P.LENGTH_HI, P.ANGLE_LO, P.ANGLE_HI, P.N_WIDTHS]],
                             params[P.WIDTHS:P.WIDTHS + n_w]])
    return np.ascontiguousarray(fields, dtype=np.float64).tobytes()


@njit(cache=True)
def _combos_cpu(params, states, active, combos):
    """Each active patch's combination index into ``combos`` (int64 [N]; -1: inactive, or outside the grid)."""
    llo = np.int64(params[P.LENGTH_LO])
    lhi = np.int64(params[P.LENGTH_HI])
    alo = np.int64(params[P.ANGLE_LO])
    ahi = np.int64(params[P.ANGLE_HI])
    n_ang = ahi - alo + 1
    n_w = np.int64(params[P.N_WIDTHS])
    for i in range(states.shape[0]):
        combos[i] = -1
        if active[i] == 0:
            continue
        aq, length, angle, width = _draw_params(params, states[i])
        k = 0
        while k < n_w - 1 and np.int64(params[P.WIDTHS + k]) != width:
            k += 1
        if llo <= length <= lhi and alo <= angle <= ahi:
            combos[i] = ((length - llo) * n_ang + (angle - alo)) * n_w + k


@njit(cache=True)
def _fill_cpu(params, combos, trig, gauss, meta, rinfo, taps, r_used, t_used, n_known, max_bytes):
    """Build every kernel that ``combos`` needs and ``meta`` lacks and append it to ``rinfo`` / ``taps``.

    Growing: sized for the whole grid at the mean kernel size so far (+1/8; ``n_known`` kernels are in the bank
    already), at least 1.25x, at most ``max_bytes`` for ``rinfo`` and ``taps`` together; a kernel that does not fit
    even then is left out and the bank is reported full. Returns ``(rinfo, taps, r_used, t_used, n_built, full)``.
    Serial: call it outside parallel regions only."""
    ks = np.int64(params[P.LENGTH_HI]) + 2
    kb = np.empty((4, ks, ks), dtype=np.int64)
    ext = np.empty((7, ks), dtype=np.int64)
    rows = np.empty((4, ks), dtype=np.int64)
    vals = np.empty(ks * ks, dtype=np.int64)
    llo = np.int64(params[P.LENGTH_LO])
    alo = np.int64(params[P.ANGLE_LO])
    n_ang = np.int64(params[P.ANGLE_HI]) - alo + 1
    n_w = np.int64(params[P.N_WIDTHS])
    n_combos = meta.shape[0]
    n_built = 0
    for i in range(combos.shape[0]):
        ci = combos[i]
        if ci < 0 or meta[ci, 0] != 0:
            continue
        # the inverse of _combos_cpu's index
        length = llo + ci // n_w // n_ang
        angle = alo + ci // n_w % n_ang
        width = np.int64(params[P.WIDTHS + ci % n_w])
        n_rows, dy_min, dy_max, dx_min, dx_max = _build_kernel(length, angle, width, trig, gauss, kb, ext,
                                                                   rows, vals)
        n_vals = 0
        for r_ in range(n_rows):
            n_vals += rows[2, r_]
        need_r = r_used + n_rows
        need_t = t_used + n_vals + BLOCK * (n_rows + 1)
        if need_r > rinfo.shape[0] or need_t > taps.shape[0]:
            k = n_known + n_built + 1
            cap_r = max(need_r, need_r * n_combos // k * 9 // 8, rinfo.shape[0] * 5 // 4)
            cap_t = max(need_t, need_t * n_combos // k * 9 // 8, taps.shape[0] * 5 // 4)
            if (cap_r * 4 + cap_t) * 8 > max_bytes:          # the estimate overshoots the cap: just this kernel
                cap_r = need_r
                cap_t = need_t
            if (cap_r * 4 + cap_t) * 8 > max_bytes:
                return rinfo, taps, r_used, t_used, n_built, True
            if cap_r > rinfo.shape[0]:
                grown_r = np.empty((cap_r, 4), dtype=np.int64)
                grown_r[:r_used] = rinfo[:r_used]
                rinfo = grown_r
            if cap_t > taps.shape[0]:
                grown_t = np.empty(cap_t, dtype=np.float64)
                grown_t[:t_used] = taps[:t_used]
                taps = grown_t
        t_end = pad_rows(rows, vals, n_rows, rinfo, r_used, taps, t_used)
        meta[ci, 1] = n_rows
        meta[ci, 2] = dy_min
        meta[ci, 3] = dy_max
        meta[ci, 4] = dx_min
        meta[ci, 5] = dx_max
        meta[ci, 6] = r_used
        meta[ci, 0] = 1                                  # last: the entry is complete
        r_used = need_r
        t_used = t_end
        n_built += 1
    return rinfo, taps, r_used, t_used, n_built, False


def prepare(params: np.ndarray, states: np.ndarray, active: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The bank arguments of the CPU renderer for one batch: ``(combos, meta, rinfo, taps)`` (module docstring),
    with every kernel the batch needs built first (within the memory caps). Empty arrays when the bank is off
    (``ENABLED`` false, a grid beyond ``MAX_COMBOS``): the renderer then builds every kernel per patch.

    ``params`` float64 [P.SIZE] (a streak spec, checked by the caller), ``states`` uint64 [N], ``active`` uint8 [N].
    """
    n_combos = grid_size(params)
    n = states.shape[0]
    if not ENABLED or n_combos == 0 or n_combos > MAX_COMBOS or n_combos * _META_COLS * 8 > MAX_BYTES // 2:
        return _off()
    key = _key(params)
    with _LOCK:
        bank = _BANKS.get(key)
        if bank is None:
            bank = _BANKS[key] = _Bank(n_combos)
        _BANKS.move_to_end(key)
        # keep at least half the cap for the bank in use: drop the least recently used others first
        while len(_BANKS) > MAX_BANKS or (len(_BANKS) > 1 and _others_bytes(key) > MAX_BYTES // 2):
            _BANKS.popitem(last=False)
        combos = np.empty(n, dtype=np.int64)
        _combos_cpu(params, states, active, combos)
        if not bank.full:
            budget = MAX_BYTES - _others_bytes(key) - bank.meta.nbytes
            bank.rinfo, bank.taps, bank.r_used, bank.t_used, n_built, bank.full = _fill_cpu(
                params, combos, TRIG, GAUSS, bank.meta, bank.rinfo, bank.taps, bank.r_used, bank.t_used, bank.built,
                budget)
            bank.built += n_built
        return combos, bank.meta, bank.rinfo, bank.taps


def _others_bytes(key: bytes) -> int:
    return sum(b.nbytes for k, b in _BANKS.items() if k != key)


def stats(params: np.ndarray | None = None) -> dict:
    """``{"banks", "bytes", "built"}`` over all banks, or of the bank of ``params`` (``built``: kernels in it,
    0 and ``banks`` 0 when it has none)."""
    with _LOCK:
        if params is None:
            chosen = list(_BANKS.values())
        else:
            b = _BANKS.get(_key(np.asarray(params, dtype=np.float64)))
            chosen = [] if b is None else [b]
        return {"banks": len(chosen), "bytes": sum(b.nbytes for b in chosen), "built": sum(b.built for b in chosen)}


def clear() -> None:
    """Drop every bank (tests; a renderer holding a snapshot keeps its arrays alive until it returns)."""
    with _LOCK:
        _BANKS.clear()

"""Multiscale structural complexity per patch (Bagrov, Iakovlev, Iliasov, Katsnelson, Mazurenko, "Multiscale
structural complexity of natural patterns", PNAS 117(48):30241-30251, 2020, doi:10.1073/pnas.2004976117).

Definition: values scaled to 0..1 (``f_0 = x / 255``); ``f_{k+1}`` averages 2 x 2 blocks of ``f_k``; with
``f_{k+1}`` expanded back to level k's grid, ``O_ab = mean(f_a . f_b)`` over that grid, the dot product over the
three channels (RGB as a 3-vector), and ``C = sum_k | O_{k,k+1} - (O_{k,k} + O_{k+1,k+1}) / 2 |``.

Sizes that are not powers of two: at each level an odd last row / column is dropped before averaging (and is not
part of that level's overlaps), and the recursion stops as soon as the grid has one row or one column. So a
16 x 24 patch has the levels 16x24, 8x12, 4x6, 2x3 (cropped to 2x2), 1x1.

How the kernels compute it: with block averaging ``O_{k,k+1} = O_{k+1,k+1}``, so each term equals
``mean |f_k - f_{k+1}|^2 / 2 >= 0``. Working with integer block sums ``S`` (level k: sums of 4**k pixel values),
a parent block with children ``S_1..S_4`` and sum ``T`` contributes ``sum_i (4 S_i - T)^2 = 16 sum_i S_i^2 - 4 T^2``
(an exact integer) times ``1 / (4**(k+1) * 255)**2``. Note: for a power-of-two square patch the terms telescope,
``C = (mean |f_0|^2 - |mean f_0|^2) / 2``: half the summed per-channel variance of the 0..1 values.

Profile: the per-level term ``T_k = mean |f_k - f_{k+1}|^2 / 2`` for ``k = 0 .. L-1``, float64 [N, L], where ``L``
(``num_levels``) is the number of coarsenings until one row or column: ``L = floor(log2(min(H, W)))`` (0 when H or
W is 1). The kernels accumulate each level's term in its own slot; ``C`` is the left-to-right sum of the slots
(``sum_levels``), which for the CPU kernel and the reference adds the same terms in the same order as the single
running total of the full-range kernel, so the two agree bit for bit.

Which setting reproduces which published code (a mapping of parameters; ``levels=(k0, k1)`` sums ``T_k`` for
``k0 <= k < k0 + k1``):

* the full range (no ``levels``): Bagrov et al.'s definition, and the authors' C++ program
  (github.com/IakovlevIA/structural-complexity) with ``compl_start = 0`` and ``compl_steps >= L``;
* the C++ program's options ``compl_start`` / ``compl_steps``: ``levels=(compl_start, compl_steps)``; its default
  ``compl_steps = 8`` from level 0 is ``levels=(0, 8)`` (needs ``L >= 8``, e.g. 256 x 256 patches);
* the other public (Python) port, which stops at ``log2(N) - 2`` for N x N patches: ``levels=(0, log2(N) - 2)``.

Exactness bound: the int64 sums are exact for ``H * W <= MAX_PIXELS`` (checked). Inputs: uint8 NHWC [N, H, W, 3],
0..255. Outputs: float64 [N] (complexity) or [N, L] (profile).
"""
from __future__ import annotations

import numpy as np
from numba import cuda, njit, prange

#: 16 * sum of squared block sums <= 16 * 255**2 * n**2 must fit int64.
MAX_PIXELS = 2_900_000
#: Most levels a patch within ``MAX_PIXELS`` can have (min(H, W) <= 1702, so L <= 10); sizes the GPU's per-thread
#: per-level accumulators.
MAX_LEVELS = 11


def num_levels(h: int, w: int) -> int:
    """Number of levels ``L`` of an H x W patch: coarsenings until one row or column, ``floor(log2(min(H, W)))``
    (0 when H or W is below 2)."""
    n = 0
    while (h >> n) >= 2 and (w >> n) >= 2:
        n += 1
    return n


def check_levels(levels: tuple[int, int], n_levels: int, name: str = "levels") -> tuple[int, int]:
    """Validate ``levels = (start, steps)`` against a patch's ``n_levels``; return it as a pair of ints.

    ``start >= 0``, ``steps >= 1`` and ``start + steps <= n_levels`` (the levels ``start .. start + steps - 1`` must
    exist for the patch size), else a ValueError naming ``name``.
    """
    try:
        k0, k1 = levels
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a pair (start, steps) of ints, got {levels!r}") from None
    for v in (k0, k1):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ValueError(f"{name}: expected a pair (start, steps) of ints, got {levels!r}")
    k0, k1 = int(k0), int(k1)
    if k0 < 0 or k1 < 1:
        raise ValueError(f"{name}: expected start >= 0 and steps >= 1, got ({k0}, {k1})")
    if k0 + k1 > n_levels:
        raise ValueError(f"{name}: levels {k0} .. {k0 + k1 - 1} requested, but this patch size has only {n_levels} "
                         f"levels (0 .. {n_levels - 1})")
    return k0, k1


def sum_levels(profile: np.ndarray, start: int = 0, steps: int | None = None) -> np.ndarray:
    """float64 [N]: the profile's terms ``start .. start + steps - 1`` (default: all) added left to right, the order
    in which the kernels add them."""
    profile = np.asarray(profile, dtype=np.float64)
    stop = profile.shape[1] if steps is None else start + steps
    out = np.zeros(profile.shape[0], dtype=np.float64)
    for k in range(start, stop):
        out += profile[:, k]
    return out


def check_size(h: int, w: int) -> None:
    """Raise a ValueError unless an H x W patch keeps the int64 sums exact."""
    if h * w > MAX_PIXELS:
        raise ValueError(f"x: complexity supports patches of at most {MAX_PIXELS} pixels (H * W), got {h} x {w}")


# ---- plain numpy reference (slow and obvious): the overlap formula itself -----------------------------------------

def complexity_profile_reference(x: np.ndarray) -> np.ndarray:
    """float64 [N, L] per-level terms of uint8 NHWC patches from the O_ab overlaps, one patch and one level at a
    time."""
    x = np.asarray(x)
    out = np.zeros((len(x), num_levels(x.shape[1], x.shape[2])), dtype=np.float64)
    for i, patch in enumerate(x):
        f = patch.astype(np.float64) / 255.0  # [H, W, 3] on 0..1
        k = 0
        while f.shape[0] > 1 and f.shape[1] > 1:
            h, w = f.shape[0] // 2 * 2, f.shape[1] // 2 * 2
            f = f[:h, :w]
            coarse = f.reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3))
            up = np.repeat(np.repeat(coarse, 2, axis=0), 2, axis=1)  # f_{k+1} on level k's grid
            o_kk = np.mean(np.sum(f * f, axis=-1))
            o_k1 = np.mean(np.sum(f * up, axis=-1))
            o_11 = np.mean(np.sum(up * up, axis=-1))
            out[i, k] = abs(o_k1 - (o_kk + o_11) / 2)
            k += 1
            f = coarse
    return out


def complexity_reference(x: np.ndarray) -> np.ndarray:
    """float64 [N] complexity of uint8 NHWC patches: the reference profile's terms added left to right."""
    return sum_levels(complexity_profile_reference(x))


# ---- CPU kernel (numba, parallel over patches) -------------------------------------------------------------------

def complexity_cpu(x: np.ndarray) -> np.ndarray:
    """float64 [N] complexity of a uint8 NHWC numpy batch (0..255), numba CPU kernel parallel over patches."""
    check_size(x.shape[1], x.shape[2])
    return _complexity_cpu(np.ascontiguousarray(x), 1)[:, 0]


def complexity_profile_cpu(x: np.ndarray) -> np.ndarray:
    """float64 [N, L] per-level terms of a uint8 NHWC numpy batch (0..255), numba CPU kernel parallel over
    patches."""
    h, w = x.shape[1], x.shape[2]
    check_size(h, w)
    return _complexity_cpu(np.ascontiguousarray(x), num_levels(h, w))


@njit(cache=True, parallel=True)
def _complexity_cpu(x: np.ndarray, slots: int) -> np.ndarray:
    """float64 [N, slots] of a C-contiguous uint8 NHWC numpy batch; parallel over patches. Level k's term goes to
    slot ``min(k, slots - 1)``: ``slots = 1`` gives the complexity, ``slots = L`` the profile.

    Per level, ``A = sum S_child^2`` and ``B = sum T_parent^2`` are exact int64, so the result does not depend on
    summation order. Block sums are kept in one int64 buffer, coarsened in place (a parent's slot never lies after
    an unread child's).
    """
    n, h, w, ch = x.shape
    out = np.zeros((n, slots), dtype=np.float64)
    ph0 = h // 2
    pw0 = w // 2
    last = slots - 1
    for p in prange(n):
        buf = np.empty(max(ph0 * pw0 * 3, 1), dtype=np.int64)
        v = np.empty(max(pw0 * 6, 1), dtype=np.int32)
        if ph0 > 0 and pw0 > 0:
            a = np.int64(0)
            b = np.int64(0)
            m = pw0 * 6  # bytes of the cropped row pair, flat: 2 * pw0 pixels x 3 channels
            for py in range(ph0):
                r0 = x[p, 2 * py].reshape(-1)
                r1 = x[p, 2 * py + 1].reshape(-1)
                # vertical pairs and squares: stride-1 loops, vectorized
                for j in range(m):
                    u = np.int32(r0[j])
                    d = np.int32(r1[j])
                    v[j] = u + d
                    a += u * u + d * d
                o = py * pw0 * 3
                for px in range(pw0):
                    # channels unrolled by hand: a fixed-stride body LLVM can vectorize
                    s0 = v[6 * px] + v[6 * px + 3]
                    s1 = v[6 * px + 1] + v[6 * px + 4]
                    s2 = v[6 * px + 2] + v[6 * px + 5]
                    buf[o + 3 * px] = s0
                    buf[o + 3 * px + 1] = s1
                    buf[o + 3 * px + 2] = s2
                    b += s0 * s0 + s1 * s1 + s2 * s2
            out[p, 0] += (16.0 * a - 4.0 * b) / (2.0 * (2 * ph0) * (2 * pw0) * (4.0 * 255.0) ** 2)
            lvl = 1
            hl = ph0
            wl = pw0
            while hl > 1 and wl > 1:
                ph = hl // 2
                pw = wl // 2
                a = np.int64(0)
                b = np.int64(0)
                for py in range(ph):
                    for px in range(pw):
                        i0 = ((2 * py) * wl + 2 * px) * 3
                        i1 = i0 + wl * 3
                        for c in range(3):
                            s1 = buf[i0 + c]
                            s2 = buf[i0 + 3 + c]
                            s3 = buf[i1 + c]
                            s4 = buf[i1 + 3 + c]
                            t = s1 + s2 + s3 + s4
                            a += s1 * s1 + s2 * s2 + s3 * s3 + s4 * s4
                            b += t * t
                            buf[(py * pw + px) * 3 + c] = t
                scale = 4.0 ** (lvl + 1) * 255.0
                out[p, min(lvl, last)] += (16.0 * a - 4.0 * b) / (2.0 * (2 * ph) * (2 * pw) * scale * scale)
                lvl += 1
                hl = ph
                wl = pw
    return out


# ---- GPU kernel (numba.cuda): one block per patch --------------------------------------------------------------

#: Shared-memory reduction arrays are sized for this many threads; launches use a power of two <= this.
MAX_THREADS = 256
#: Side of the pixel tile one thread coarsens on its own (levels 0, 1, 2 in registers / local memory).
TILE = 8
#: Largest number of patches per launch (bounds the global scratch for levels >= 3).
CHUNK = 8192


@cuda.jit(device=True, inline=True)
def _scale(lvl, h, w):
    """1 / (2 * cells of the cropped level-lvl grid * (4**(lvl+1) * 255)**2); 0 for a level the patch lacks (no
    term uses it, and the simulator raises on a division by zero)."""
    ph = (h >> lvl) // 2
    pw = (w >> lvl) // 2
    if ph == 0 or pw == 0:
        return 0.0
    s = 4.0 ** (lvl + 1) * 255.0
    return 1.0 / (2.0 * (2 * ph) * (2 * pw) * s * s)


@cuda.jit(device=True, inline=True)
def _slot(lvl, last):
    """Accumulator slot of level ``lvl``: ``min(lvl, last)`` (the builtin ``min`` does not compile for CUDA here)."""
    return lvl if lvl < last else last


@cuda.jit(device=True, inline=True)
def _block_term(q0, q1, q2, q3):
    """Block sum ``t`` of four int64 children and the block's exact contribution ``16 sum(q^2) - 4 t^2``
    (scaled by the level's factor at the call site)."""
    t = q0 + q1 + q2 + q3
    return t, 16 * (q0 * q0 + q1 * q1 + q2 * q2 + q3 * q3) - 4 * t * t


@cuda.jit(device=True, inline=True)
def _quad_term(q, c):
    """``_block_term`` of the 2 x 2 children ``q[0:2, 0:2, c]`` (a local int32 array [2, 2, 3]), as int64."""
    return _block_term(np.int64(q[0, 0, c]), np.int64(q[0, 1, c]), np.int64(q[1, 0, c]), np.int64(q[1, 1, c]))


@cuda.jit
def _complexity_kernel(x, scratch, out):  # out: float64 [N, slots]; level k's term goes to slot min(k, slots - 1)
    """Block b handles patch b. Phase 1: thread t coarsens 8 x 8 pixel tiles (levels 0 -> 3) on its own, reading the
    tile's uint8 rows (a warp covers consecutive tiles of a tile row), and writes the level-3 block sums to global
    scratch (L2-resident, a few KB per patch). Phase 2: the block coarsens levels >= 3 together, ping-ponging
    between two scratch regions with a barrier per level. Each parent's exact integer ``16 sum S_i^2 - 4 T^2`` is
    scaled and added to the thread's float64 total; a shared-memory tree reduction sums the threads."""
    p = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    h = x.shape[1]
    w = x.shape[2]
    h3 = h >> 3
    w3 = w >> 3
    # block sums of levels 1 and 2 stay in int32 registers (<= 1020 and <= 4080); only one 2 x 2 group of level-1
    # cells is live at a time, which keeps the register count (and so the occupancy) reasonable
    c1 = cuda.local.array((2, 2, 3), dtype=np.int32)
    l2 = cuda.local.array((2, 2, 3), dtype=np.int32)
    slots = out.shape[1]
    last = slots - 1
    total = cuda.local.array(MAX_LEVELS, dtype=np.float64)
    for k in range(slots):
        total[k] = 0.0
    ph0 = h // 2
    pw0 = w // 2
    ph1 = (h >> 1) // 2
    pw1 = (w >> 1) // 2
    ph2 = (h >> 2) // 2
    pw2 = (w >> 2) // 2
    sc0 = _scale(0, h, w)
    sc1 = _scale(1, h, w)
    sc2 = _scale(2, h, w)
    ty_n = (h + TILE - 1) // TILE
    tx_n = (w + TILE - 1) // TILE
    for tile in range(tid, ty_n * tx_n, nt):
        ty = tile // tx_n
        tx = tile - ty * tx_n
        for qy in range(2):
            for qx in range(2):
                # level 0 -> 1: the four level-0 parents (2 x 2 pixel blocks) under level-1 parent (qy, qx)
                for cy in range(2):
                    py = 4 * ty + 2 * qy + cy
                    for cx in range(2):
                        px = 4 * tx + 2 * qx + cx
                        if py < ph0 and px < pw0:
                            for c in range(3):
                                q0 = np.int64(x[p, 2 * py, 2 * px, c])
                                q1 = np.int64(x[p, 2 * py, 2 * px + 1, c])
                                q2 = np.int64(x[p, 2 * py + 1, 2 * px, c])
                                q3 = np.int64(x[p, 2 * py + 1, 2 * px + 1, c])
                                t, d = _block_term(q0, q1, q2, q3)
                                total[0] += d * sc0
                                c1[cy, cx, c] = t
                # level 1 -> 2 (its children exist whenever the parent does)
                py = 2 * ty + qy
                px = 2 * tx + qx
                if py < ph1 and px < pw1:
                    for c in range(3):
                        t, d = _quad_term(c1, c)
                        total[_slot(1, last)] += d * sc1
                        l2[qy, qx, c] = t
        # level 2 -> 3, into scratch region A laid out [h3, w3, 3]
        if ty < ph2 and tx < pw2:
            for c in range(3):
                t, d = _quad_term(l2, c)
                total[_slot(2, last)] += d * sc2
                scratch[p, (ty * w3 + tx) * 3 + c] = t
    cuda.syncthreads()
    # levels >= 3: region A at offset 0 (h3 * w3 * 3), region B after it
    off_b = h3 * w3 * 3
    src = 0
    dst = off_b
    lvl = 3
    hl = h3
    wl = w3
    while hl > 1 and wl > 1:
        ph = hl // 2
        pw = wl // 2
        sc = _scale(lvl, h, w)
        for k in range(tid, ph * pw * 3, nt):
            c = k % 3
            cell = k // 3
            py = cell // pw
            px = cell - py * pw
            i0 = src + ((2 * py) * wl + 2 * px) * 3 + c
            i1 = i0 + wl * 3
            q0 = scratch[p, i0]
            q1 = scratch[p, i0 + 3]
            q2 = scratch[p, i1]
            q3 = scratch[p, i1 + 3]
            t, d = _block_term(q0, q1, q2, q3)
            total[_slot(lvl, last)] += d * sc
            scratch[p, dst + k] = t
        cuda.syncthreads()
        src, dst = dst, src
        lvl += 1
        hl = ph
        wl = pw
    acc = cuda.shared.array(MAX_THREADS, dtype=np.float64)
    for k in range(slots):
        acc[tid] = total[k]
        cuda.syncthreads()
        s = nt // 2
        while s > 0:
            if tid < s:
                acc[tid] += acc[tid + s]
            cuda.syncthreads()
            s //= 2
        if tid == 0:
            out[p, k] = acc[0]
        cuda.syncthreads()


def complexity_cuda(x, threads: int = MAX_THREADS) -> np.ndarray:
    """float64 [N] complexity (host numpy) from the numba.cuda kernel. ``x``: uint8 NHWC device array (CuPy / numba)
    or numpy array (copied to the device; the CUDA simulator path in tests). Launches at most ``CHUNK`` patches at a
    time so the level >= 3 scratch stays small."""
    return _run_cuda(x, threads, per_level=False)[:, 0]


def complexity_profile_cuda(x, threads: int = MAX_THREADS) -> np.ndarray:
    """float64 [N, L] per-level terms (host numpy) from the numba.cuda kernel; ``x`` as for ``complexity_cuda``.
    Each level is reduced over the block's threads on its own, so its sum can differ from ``complexity_cuda`` in
    the last bits."""
    return _run_cuda(x, threads, per_level=True)


def _run_cuda(x, threads: int, per_level: bool) -> np.ndarray:
    """float64 [N, slots] from ``_complexity_kernel``: one slot (the complexity) or ``L`` (the profile)."""
    if threads > MAX_THREADS or threads & (threads - 1):
        raise ValueError(f"threads: expected a power of two <= {MAX_THREADS}, got {threads}")
    n, h, w = x.shape[0], x.shape[1], x.shape[2]
    check_size(h, w)
    slots = num_levels(h, w) if per_level else 1
    d_x = cuda.to_device(x) if isinstance(x, np.ndarray) else cuda.as_cuda_array(x)
    h3, w3 = h >> 3, w >> 3
    per_patch = max(h3 * w3 * 3 + (h3 // 2) * (w3 // 2) * 3, 1)
    result = np.empty((n, slots), dtype=np.float64)
    if slots == 0:
        return result
    for start in range(0, n, CHUNK):
        stop = min(n, start + CHUNK)
        scratch = cuda.device_array((stop - start, per_patch), dtype=np.int64)
        out = cuda.device_array((stop - start, slots), dtype=np.float64)
        _complexity_kernel[stop - start, threads](d_x[start:stop], scratch, out)
        result[start:stop] = out.copy_to_host()
    return result

"""Compile every CUDA kernel to PTX for an H100 (sm_90) without a GPU.

The CUDA simulator runs kernels as Python, so it cannot catch what only the real compiler rejects (e.g. numba
>= 0.66 refusing two-argument ``min``/``max`` in CUDA code, or a type that does not unify). This test compiles each
kernel with the signature its launcher uses, in a subprocess without the simulator, using the CUDA toolkit's
libnvvm when one is installed (skips otherwise).
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_SCRIPT = textwrap.dedent("""
    import sys
    from types import SimpleNamespace
    try:
        from numba.cuda.cudadrv import nvvm
        nvvm.NVVM()
    except Exception as err:
        print("SKIP libnvvm not found:", err); sys.exit(0)
    import numba.cuda.dispatcher as D
    if not hasattr(D, "get_current_device"):
        print("SKIP numba internals changed"); sys.exit(0)
    # No driver here: compiling needs a compute capability, not a device.
    D.get_current_device = lambda: SimpleNamespace(compute_capability=(9, 0))
    from numba import cuda, types as T
    from kernels import complexity, composite, decoupled, noise, rain_layered, rain_sparse, sharpness
    from kernels.streak import gpu as streak_gpu

    u8_4a = T.Array(T.uint8, 4, "A")
    cases = {
        "sharpness._sums_kernel": (sharpness._sums_kernel, (u8_4a, T.int64[:, ::1])),
        "sharpness._sums_columns_kernel": (sharpness._sums_columns_kernel, (u8_4a, T.int64[:, ::1])),
        "complexity._complexity_kernel": (complexity._complexity_kernel,
                                          (u8_4a, T.int64[:, ::1], T.float64[:, ::1])),
        "decoupled._sums_kernel[uint8]": (decoupled._sums_kernel,
                                          (u8_4a, u8_4a, u8_4a, T.Array(T.uint8, 3, "A"), T.float64[:, ::1])),
        "decoupled._sums_kernel[float32]": (decoupled._sums_kernel,
                                            (T.Array(T.float32, 4, "A"), u8_4a, u8_4a, T.Array(T.uint8, 3, "A"),
                                             T.float64[:, ::1])),
        "composite._composite_gpu_kernel": (composite._composite_gpu_kernel,
                                            (T.uint8[:, :, :, ::1], T.uint8[:, :, ::1], T.int64[::1], T.int32,
                                             T.uint8[:, :, :, ::1], T.boolean[:, :, ::1])),
        "noise.composite_gpu_kernel": (noise.composite_gpu_kernel,
                                       (T.int32, T.uint64[::1], T.uint64[::1], T.uint8[::1], u8_4a,
                                        T.uint8[:, :, :, ::1], T.uint8[:, :, ::1], T.boolean[:, :, ::1])),
        "streak.gpu.render_gpu_kernel": (streak_gpu.render_gpu_kernel,
                                         (T.float64[::1], T.uint64[::1], T.uint8[::1], T.uint8[:, :, ::1],
                                          T.int64[:, ::1], T.int64[:, ::1], T.int64[:, :, :, ::1],
                                          T.int64[:, :, ::1], T.int64[:, :, ::1], T.int64[:, ::1],
                                          T.int64[:, ::1], T.int64[:, ::1], T.int64)),
    }
    segment_sig = (T.float64[::1], T.uint64[::1], T.uint8[::1], T.uint8[:, :, ::1], T.int32[:, :, ::1],
                   T.int64[:, ::1], T.int64)
    # The held-out families promise that multiplication is their only float64 arithmetic (no add that the
    # compiler could contract into an FMA and round differently from the CPU): the ops are checked below. The
    # noise kernel promises integer arithmetic only (it prints no op).
    exact_f64 = {"rain_layered.render_gpu_kernel", "rain_sparse.render_gpu_kernel", "noise.composite_gpu_kernel"}
    cases["rain_layered.render_gpu_kernel"] = (rain_layered.render_gpu_kernel, segment_sig)
    cases["rain_sparse.render_gpu_kernel"] = (rain_sparse.render_gpu_kernel, segment_sig)
    failed = []
    for name, (kernel, sig) in cases.items():
        try:
            ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=(9, 0))
            print("OK", name)
            if name in exact_f64:
                ops = sorted({ln.split()[0] for ln in ptx.splitlines() if ".f64" in ln and ln.strip()[:1] != "."})
                print("OPS", name, " ".join(ops))
        except Exception as err:
            failed.append(name)
            print("FAIL", name, type(err).__name__, str(err)[:2000])
    print("DONE", len(failed))
""")


def _cuda_home() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    if "CUDA_HOME" not in env:
        for cand in sorted(Path("/usr/local").glob("cuda*"), reverse=True):
            if list(cand.glob("**/libnvvm.so*")):
                env["CUDA_HOME"] = str(cand)
                break
    return env


@pytest.mark.slow
def test_all_cuda_kernels_compile_for_sm90():
    res = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=ROOT, env=_cuda_home(), capture_output=True,
                         text=True, timeout=900)
    if res.stdout.startswith("SKIP"):
        pytest.skip(res.stdout.strip())
    assert "DONE 0" in res.stdout, res.stdout + res.stderr[-3000:]
    for line in res.stdout.splitlines():
        if line.startswith("OPS"):
            ops = set(line.split()[2:])
            arith = {op for op in ops if not op.startswith(("ld.", "st.", "cvt.", "setp.", "mov."))}
            assert arith <= {"mul.f64", "mul.rn.f64"}, f"{line}: float64 arithmetic beyond multiplication"

"""Explicit 8-lane float64 vector code for numba CPU kernels, written in LLVM IR as numba intrinsics.

Why by hand: numba turns LLVM's SLP vectorizer off, and its loop vectorizer either unrolls 8-element rows into
scalars first or vectorizes only 4 lanes wide (the host's preferred vector width is 256 bits), with a float -> int32
-> float round trip per value in the normalization. ``<8 x double>`` IR gets one AVX-512 register (two AVX2 ones)
per block. Only plain IEEE operations are emitted (no fast-math flags, no fused multiply-add), so on every target
the results are those of the equivalent scalar code.

Every intrinsic trusts its caller that the ranges it reads and writes lie inside the arrays (no bounds checks).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.extending import intrinsic

#: float64 lanes per vector block (one 64-byte cache line).
BLOCK = 8
#: Independent min/max accumulator pairs in ``minmax_blocks``: with one pair the loop is latency bound.
MINMAX_PAIRS = 4

_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_F64 = ir.DoubleType()
_VEC = ir.VectorType(_F64, BLOCK)


def vec_ptr(builder: ir.IRBuilder, arr, index: ir.Value, etype: ir.Type, lanes: int) -> ir.Value:
    """Pointer to ``lanes`` elements of ``etype`` from ``arr.data[index]`` (no alignment assumed)."""
    return builder.bitcast(builder.gep(arr.data, [index], inbounds=True, source_etype=etype),
                           ir.VectorType(etype, lanes).as_pointer())


def broadcast(builder: ir.IRBuilder, x: ir.Value) -> ir.Value:
    """``<BLOCK x double>`` with every lane equal to the scalar ``x``."""
    undef = ir.Constant(_VEC, ir.Undefined)
    one = builder.insert_element(undef, x, ir.Constant(_I32, 0))
    return builder.shuffle_vector(one, undef, ir.Constant(ir.VectorType(_I32, BLOCK), [0] * BLOCK))


def vmin(builder: ir.IRBuilder, a: ir.Value, b: ir.Value) -> ir.Value:
    """Lane-wise ``a if a < b else b`` (exact for values that are never NaN)."""
    return builder.select(builder.fcmp_ordered("<", a, b), a, b)


def vmax(builder: ir.IRBuilder, a: ir.Value, b: ir.Value) -> ir.Value:
    """Lane-wise ``a if a > b else b`` (exact for values that are never NaN)."""
    return builder.select(builder.fcmp_ordered(">", a, b), a, b)


def counted_loop(builder: ir.IRBuilder, count: ir.Value, name: str, carried: Sequence[ir.Value],
                 body: Callable[[ir.Value, list[ir.Value]], list[ir.Value]]) -> list[ir.Value]:
    """Emit ``for i in range(count)`` (``count`` an i64) carrying the values ``carried`` through the iterations.

    ``body(i, values)`` emits one iteration at the builder's position and returns the values for the next one.
    Returns the values after the loop: ``carried`` itself when ``count <= 0``. The builder is left after the loop.
    """
    entry = builder.block
    loop = builder.append_basic_block(f"{name}.loop")
    done = builder.append_basic_block(f"{name}.done")
    builder.cbranch(builder.icmp_signed(">", count, ir.Constant(_I64, 0)), loop, done)
    builder.position_at_end(loop)
    i = builder.phi(_I64)
    i.add_incoming(ir.Constant(_I64, 0), entry)
    values = []
    for v in carried:
        phi = builder.phi(v.type)
        phi.add_incoming(v, entry)
        values.append(phi)
    new = body(i, values)
    i1 = builder.add(i, ir.Constant(_I64, 1))
    end = builder.block
    i.add_incoming(i1, end)
    for phi, v in zip(values, new):
        phi.add_incoming(v, end)
    builder.cbranch(builder.icmp_signed("<", i1, count), loop, done)
    builder.position_at_end(done)
    out = []
    for v, n in zip(carried, new):
        phi = builder.phi(v.type)
        phi.add_incoming(v, entry)
        phi.add_incoming(n, end)
        out.append(phi)
    return out


def _is_f64_array(t) -> bool:
    return isinstance(t, types.Array) and t.dtype == types.float64


def _as_i64(context, builder, signature, args, k: int) -> ir.Value:
    return context.cast(builder, args[k], signature.args[k], types.int64)


@intrinsic
def axpy_block(typingctx, acc, b, v, taps, toff):
    """``acc[b : b + BLOCK] += v * taps[toff : toff + BLOCK]``: one vector load of each, a multiply, an add and a
    store (float64 arrays, float64 ``v``, integer offsets)."""
    if not (_is_f64_array(acc) and _is_f64_array(taps) and v == types.float64 and isinstance(b, types.Integer)
            and isinstance(toff, types.Integer)):
        return None
    sig = types.void(acc, b, v, taps, toff)

    def codegen(context, builder, signature, args):
        acc_arr = context.make_array(signature.args[0])(context, builder, args[0])
        taps_arr = context.make_array(signature.args[3])(context, builder, args[3])
        pa = vec_ptr(builder, acc_arr, args[1], _F64, BLOCK)
        a = builder.load(pa, align=8)
        t = builder.load(vec_ptr(builder, taps_arr, args[4], _F64, BLOCK), align=8)
        builder.store(builder.fadd(a, builder.fmul(t, broadcast(builder, args[2]))), pa, align=8)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def copy_block(typingctx, dst, d, src, soff):
    """``dst[d : d + BLOCK] = src[soff : soff + BLOCK]``: one unaligned vector load and one store (float64)."""
    if not (_is_f64_array(dst) and _is_f64_array(src) and isinstance(d, types.Integer)
            and isinstance(soff, types.Integer)):
        return None
    sig = types.void(dst, d, src, soff)

    def codegen(context, builder, signature, args):
        dst_arr = context.make_array(signature.args[0])(context, builder, args[0])
        src_arr = context.make_array(signature.args[2])(context, builder, args[2])
        x = builder.load(vec_ptr(builder, src_arr, args[3], _F64, BLOCK), align=8)
        builder.store(x, vec_ptr(builder, dst_arr, args[1], _F64, BLOCK), align=8)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def minmax_blocks(typingctx, acc, start, nb):
    """``(min, max)`` of ``acc[start : start + BLOCK * nb]`` (float64, ``nb >= 1``, values never NaN).

    Groups of ``MINMAX_PAIRS`` blocks, one accumulator pair per block of a group, then the blocks left over one at a
    time, then a horizontal reduction of the vector lanes.
    """
    if not (_is_f64_array(acc) and isinstance(start, types.Integer) and isinstance(nb, types.Integer)):
        return None
    sig = types.UniTuple(types.float64, 2)(acc, start, nb)

    def codegen(context, builder, signature, args):
        arr = context.make_array(signature.args[0])(context, builder, args[0])
        start_v = _as_i64(context, builder, signature, args, 1)
        nb_v = _as_i64(context, builder, signature, args, 2)

        def load_block(index):
            off = builder.add(start_v, builder.mul(index, ir.Constant(_I64, BLOCK)))
            return builder.load(vec_ptr(builder, arr, off, _F64, BLOCK), align=8)

        first = load_block(ir.Constant(_I64, 0))
        n_groups = builder.sdiv(nb_v, ir.Constant(_I64, MINMAX_PAIRS))

        def group(g, acc_pairs):
            out = []
            for k in range(MINMAX_PAIRS):
                x = load_block(builder.add(builder.mul(g, ir.Constant(_I64, MINMAX_PAIRS)), ir.Constant(_I64, k)))
                out += [vmin(builder, x, acc_pairs[2 * k]), vmax(builder, x, acc_pairs[2 * k + 1])]
            return out

        pairs = counted_loop(builder, n_groups, "mm.groups", [first] * (2 * MINMAX_PAIRS), group)
        mn, mx = pairs[0], pairs[1]
        for k in range(1, MINMAX_PAIRS):
            mn = vmin(builder, mn, pairs[2 * k])
            mx = vmax(builder, mx, pairs[2 * k + 1])
        b0 = builder.mul(n_groups, ir.Constant(_I64, MINMAX_PAIRS))

        def rest(i, values):
            x = load_block(builder.add(b0, i))
            return [vmin(builder, x, values[0]), vmax(builder, x, values[1])]

        mn, mx = counted_loop(builder, builder.sub(nb_v, b0), "mm.rest", [mn, mx], rest)
        half = BLOCK // 2
        while half >= 1:          # horizontal: halve the vector until one lane is left
            mask = ir.Constant(ir.VectorType(_I32, BLOCK), [(j + half) % BLOCK for j in range(BLOCK)])
            mn = vmin(builder, mn, builder.shuffle_vector(mn, mn, mask))
            mx = vmax(builder, mx, builder.shuffle_vector(mx, mx, mask))
            half //= 2
        zero = ir.Constant(_I32, 0)
        return context.make_tuple(builder, signature.return_type,
                                  [builder.extract_element(mn, zero), builder.extract_element(mx, zero)])

    return sig, codegen


@intrinsic
def normalize_blocks(typingctx, acc, start, out, ostart, nb, fmn, inv, fd):
    """``out[ostart + j] = floor((acc[start + j] - fmn) * 255 / fd)`` for ``j < BLOCK * nb``, BLOCK at a time.

    ``acc`` float64 holding exact integers, ``out`` uint8, ``inv`` ~ ``1 / fd``. The quotient is estimated as
    ``floor(num * inv)`` and corrected once each way by the exact remainder ``num - q * fd``; the caller guarantees
    what makes that exact: ``num = (a - fmn) * 255`` an integer below 2**52 and ``0 <= num / fd <= 255``.
    """
    if not (_is_f64_array(acc) and isinstance(out, types.Array) and out.dtype == types.uint8
            and all(isinstance(t, types.Integer) for t in (start, ostart, nb))
            and fmn == types.float64 and inv == types.float64 and fd == types.float64):
        return None
    sig = types.void(acc, start, out, ostart, nb, fmn, inv, fd)

    def codegen(context, builder, signature, args):
        acc_arr = context.make_array(signature.args[0])(context, builder, args[0])
        out_arr = context.make_array(signature.args[2])(context, builder, args[2])
        start_v = _as_i64(context, builder, signature, args, 1)
        ostart_v = _as_i64(context, builder, signature, args, 3)
        nb_v = _as_i64(context, builder, signature, args, 4)
        v_mn = broadcast(builder, args[5])
        v_inv = broadcast(builder, args[6])
        v_fd = broadcast(builder, args[7])
        v_255 = ir.Constant(_VEC, [255.0] * BLOCK)
        v_one = ir.Constant(_VEC, [1.0] * BLOCK)
        v_zero = ir.Constant(_VEC, [0.0] * BLOCK)
        floor = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VEC, [_VEC]),
                                               f"llvm.floor.v{BLOCK}f64")

        def block(b, _):
            off = builder.mul(b, ir.Constant(_I64, BLOCK))
            x = builder.load(vec_ptr(builder, acc_arr, builder.add(start_v, off), _F64, BLOCK), align=8)
            num = builder.fmul(builder.fsub(x, v_mn), v_255)
            q = builder.call(floor, [builder.fmul(num, v_inv)])
            r = builder.fsub(num, builder.fmul(q, v_fd))
            q = builder.select(builder.fcmp_ordered("<", r, v_zero), builder.fsub(q, v_one), q)
            q = builder.select(builder.fcmp_ordered(">=", r, v_fd), builder.fadd(q, v_one), q)
            qb = builder.fptoui(q, ir.VectorType(ir.IntType(8), BLOCK))
            builder.store(qb, vec_ptr(builder, out_arr, builder.add(ostart_v, off), ir.IntType(8), BLOCK), align=1)
            return []

        counted_loop(builder, nb_v, "nz", [], block)
        return context.get_dummy_value()

    return sig, codegen

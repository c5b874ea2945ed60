"""Bit-level conversions the kernels need and Numba does not offer on the CPU.

Numba has no float16 or bfloat16 type on the CPU, so the launchers hand half-precision
logits to the kernels as raw 16-bit integers: ``int16`` holds IEEE float16 bits and
``uint16`` holds bfloat16 bits (two distinct integer types, so the element type alone
selects the decoding at compile time). Each conversion below is a single LLVM
instruction or a few integer operations, so the loops that use them still vectorize
(``vcvtph2ps``/``vcvtps2ph`` with F16C, shifts and adds for bfloat16).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.core.extending import intrinsic, overload


@intrinsic
def f32_from_bits(typingctx, bits):
    """Reinterpret the 32 bits of an int32/uint32 as a float32."""
    if bits not in (types.int32, types.uint32):
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(bits), codegen


@intrinsic
def bits_from_f32(typingctx, value):
    """Reinterpret a float32 as the uint32 holding its bits."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(value), codegen


@intrinsic
def f32_from_half_bits(typingctx, bits):
    """Decode IEEE float16 bits (held in an int16) to float32, exactly."""
    if bits != types.int16:
        return None

    def codegen(context, builder, signature, args):
        half = builder.bitcast(args[0], ir.HalfType())
        return builder.fpext(half, ir.FloatType())

    return types.float32(bits), codegen


@intrinsic
def half_bits_from_f32(typingctx, value):
    """Round a float32 to the nearest float16 (ties to even) and return its bits as int16."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        half = builder.fptrunc(args[0], ir.HalfType())
        return builder.bitcast(half, ir.IntType(16))

    return types.int16(value), codegen


def to_compute(element):
    """Widen one stored logit to the type the kernels compute in (Python stub for Numba)."""
    raise NotImplementedError("only callable from compiled code")


@overload(to_compute, inline="always")
def _to_compute_overload(element):
    if element == types.float32 or element == types.float64:
        return lambda element: element
    if element == types.int16:  # float16 bits
        return lambda element: f32_from_half_bits(element)
    if element == types.uint16:  # bfloat16 bits: the high half of a float32
        return lambda element: f32_from_bits(np.uint32(np.uint32(element) << np.uint32(16)))
    return None


def from_compute(value, like):
    """Round a computed value to the storage type of ``like`` (Python stub for Numba)."""
    raise NotImplementedError("only callable from compiled code")


@overload(from_compute, inline="always")
def _from_compute_overload(value, like):
    if like == types.float32:
        return lambda value, like: np.float32(value)
    if like == types.float64:
        return lambda value, like: np.float64(value)
    if like == types.int16:
        return lambda value, like: half_bits_from_f32(np.float32(value))
    if like == types.uint16:

        def to_bfloat16_bits(value, like):
            single = np.float32(value)
            # int32 throughout: Numba would widen uint32 arithmetic to 64 bits, which halves
            # the vector width of the loops that round their output.
            bits = np.int32(bits_from_f32(single))
            odd = np.int32((bits >> np.int32(16)) & np.int32(1))
            # Round to nearest, ties to even, on the 16 bits that are dropped.
            rounded = np.int32(bits + np.int32(0x7FFF) + odd)
            # A NaN must stay a NaN: rounding could carry its payload into the exponent.
            quiet_nan = np.int32(bits | np.int32(0x00400000))
            kept = quiet_nan if single != single else rounded
            return np.uint16(np.int32(kept >> np.int32(16)) & np.int32(0xFFFF))

        return to_bfloat16_bits
    return None


def from_compute_finite(value, like):
    """``from_compute`` for a value known not to be NaN (Python stub for Numba).

    For bfloat16 this drops the NaN guard of the rounding (a compare, an or and a blend per
    vector, a fifth of the gradient sweep's instructions); other types round as usual.
    """
    raise NotImplementedError("only callable from compiled code")


@overload(from_compute_finite, inline="always")
def _from_compute_finite_overload(value, like):
    if like == types.uint16:

        def to_bfloat16_bits_not_nan(value, like):
            bits = np.int32(bits_from_f32(np.float32(value)))
            odd = np.int32((bits >> np.int32(16)) & np.int32(1))
            rounded = np.int32(bits + np.int32(0x7FFF) + odd)
            return np.uint16(np.int32(rounded >> np.int32(16)) & np.int32(0xFFFF))

        return to_bfloat16_bits_not_nan
    return lambda value, like: from_compute(value, like)


def as_compute(value, like):
    """Cast a scalar to the compute type that goes with storage element ``like`` (stub)."""
    raise NotImplementedError("only callable from compiled code")


@overload(as_compute, inline="always")
def _as_compute_overload(value, like):
    if like == types.float64:
        return lambda value, like: np.float64(value)
    if like in (types.float32, types.int16, types.uint16):
        return lambda value, like: np.float32(value)
    return None


@intrinsic
def f64_from_bits(typingctx, bits):
    """Reinterpret the 64 bits of an int64 as a float64."""
    if bits != types.int64:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return types.float64(bits), codegen


@intrinsic
def bits_from_f64(typingctx, value):
    """Reinterpret a float64 as the int64 holding its bits."""
    if value != types.float64:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(64))

    return types.int64(value), codegen


def order_key(value):
    """Signed integer whose order is the float order of ``value`` (Python stub for Numba).

    Flipping the magnitude bits of negative floats makes their bit patterns sort like the
    numbers, so a max over floats becomes a max over integers, which LLVM vectorizes (a float
    max written as a compare-and-select does not vectorize: measured 9x slower). Positive NaN
    sorts above +inf, negative NaN below -inf; callers get NaN from the exp-sum either way.
    """
    raise NotImplementedError("only callable from compiled code")


@overload(order_key, inline="always")
def _order_key_overload(value):
    if value == types.float32:

        def key32(value):
            bits = np.int32(bits_from_f32(value))
            return np.int32(bits ^ np.int32((bits >> np.int32(31)) & np.int32(0x7FFFFFFF)))

        return key32
    if value == types.float64:

        def key64(value):
            bits = bits_from_f64(value)
            return np.int64(bits ^ np.int64((bits >> np.int64(63)) & np.int64(0x7FFFFFFFFFFFFFFF)))

        return key64
    return None


def from_order_key(key):
    """The float whose ``order_key`` is ``key`` (Python stub for Numba)."""
    raise NotImplementedError("only callable from compiled code")


@overload(from_order_key, inline="always")
def _from_order_key_overload(key):
    if key == types.int32:

        def float32_of(key):
            return f32_from_bits(np.int32(key ^ np.int32((key >> np.int32(31)) & np.int32(0x7FFFFFFF))))

        return float32_of
    if key == types.int64:

        def float64_of(key):
            return f64_from_bits(np.int64(key ^ np.int64((key >> np.int64(63)) & np.int64(0x7FFFFFFFFFFFFFFF))))

        return float64_of
    return None


@intrinsic
def half_order_key(typingctx, bits):
    """``order_key`` of a float16/bfloat16 from its stored bits, as an int16.

    Both formats keep the sign in bit 15, so the same flip orders either. Computed in i16 so
    that LLVM keeps 16-bit lanes (Numba would widen int16 arithmetic to int64): a max over
    these keys takes 16 lanes per AVX2 vector (vpmaxsw) and needs no widening to float32.
    """
    if bits not in (types.int16, types.uint16):
        return None

    def codegen(context, builder, signature, args):
        value = args[0]
        sign = builder.ashr(value, ir.Constant(ir.IntType(16), 15))
        flip = builder.and_(sign, ir.Constant(ir.IntType(16), 0x7FFF))
        return builder.xor(value, flip)

    return types.int16(bits), codegen


@intrinsic
def half_from_order_key(typingctx, key, like):
    """The stored bits (typed as ``like``: int16 or uint16) whose ``half_order_key`` is ``key``."""
    if key != types.int16 or like not in (types.int16, types.uint16):
        return None

    def codegen(context, builder, signature, args):
        value = args[0]
        sign = builder.ashr(value, ir.Constant(ir.IntType(16), 15))
        flip = builder.and_(sign, ir.Constant(ir.IntType(16), 0x7FFF))
        return builder.xor(value, flip)

    return like(key, like), codegen


@intrinsic
def max_int16(typingctx, first, second):
    """The larger of two int16, as a select on i16 (vectorizes to vpmaxsw)."""
    if first != types.int16 or second != types.int16:
        return None

    def codegen(context, builder, signature, args):
        larger = builder.icmp_signed(">", args[0], args[1])
        return builder.select(larger, args[0], args[1])

    return types.int16(first, second), codegen


@intrinsic
def min_int16(typingctx, first, second):
    """The smaller of two int16, as a select on i16 (vectorizes to vpminsw)."""
    if first != types.int16 or second != types.int16:
        return None

    def codegen(context, builder, signature, args):
        smaller = builder.icmp_signed("<", args[0], args[1])
        return builder.select(smaller, args[0], args[1])

    return types.int16(first, second), codegen

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
from numba.core.extending import intrinsic, overload, register_jitable


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


@intrinsic
def raw_int16(typingctx, bits):
    """The 16 stored bits of a float16 (int16) or bfloat16 (uint16) as an int16, unchanged."""
    if bits not in (types.int16, types.uint16):
        return None

    def codegen(context, builder, signature, args):
        return args[0]

    return types.int16(bits), codegen


@intrinsic
def max_uint16(typingctx, first, second):
    """The larger of two int16 compared as unsigned 16-bit integers (vectorizes to vpmaxuw)."""
    if first != types.int16 or second != types.int16:
        return None

    def codegen(context, builder, signature, args):
        larger = builder.icmp_unsigned(">", args[0], args[1])
        return builder.select(larger, args[0], args[1])

    return types.int16(first, second), codegen


@register_jitable
def half_max_bits(signed_max, signed_min):
    """Stored bits of the largest value of a set of half-precision values, from the signed max
    and min of their raw bits (as int16).

    The sign sits in bit 15 and the rest is the magnitude, so the non-negative values order like
    their bits as signed integers (a positive NaN above +inf) and all lie above the negative
    ones: the signed max is the largest value when it is non-negative. Otherwise every value is
    negative and the largest is the one of least magnitude, whose bits are the signed min.
    """
    return signed_max if signed_max >= 0 else signed_min


@register_jitable
def half_min_bits(unsigned_max, signed_min):
    """Stored bits of the smallest value, from the unsigned max (as int16) and the signed min of
    the raw bits: with any negative value (sign bit set) the unsigned max is the negative of
    greatest magnitude, the smallest value (a negative NaN below -inf); without one the values
    order like their bits and the smallest is the signed min."""
    return unsigned_max if unsigned_max < 0 else signed_min


@intrinsic
def times_two_to_the(typingctx, value, shifted):
    """``value`` times 2**n, where n sits in the low bits of the float32 ``shifted`` (a number
    1.5 * 2**23 + n, as the exp's rounding leaves it): the bits of ``shifted`` moved up by 23 are
    n in the exponent field, added to ``value``'s bits (an integer add where a multiply by 2**n
    would need 2**n formed as a float first). ``value`` times 2**n must stay a normal float32."""
    if value != types.float32 or shifted != types.float32:
        return None

    def codegen(context, builder, signature, args):
        word = ir.IntType(32)
        exponent = builder.shl(builder.bitcast(args[1], word), ir.Constant(word, 23))
        return builder.bitcast(builder.add(builder.bitcast(args[0], word), exponent), ir.FloatType())

    return types.float32(value, shifted), codegen


@intrinsic
def as_stored(typingctx, bits, like):
    """int16 ``bits`` typed as ``like``'s storage type (int16 float16 bits or uint16 bfloat16
    bits), unchanged."""
    if bits != types.int16 or like not in (types.int16, types.uint16):
        return None

    def codegen(context, builder, signature, args):
        return args[0]

    return like(bits, like), codegen

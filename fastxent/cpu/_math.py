"""Vectorizable elementwise math for the CPU kernels.

``math.exp`` and ``math.tanh`` compile to scalar libm calls that LLVM cannot vectorize, which
made a plain Numba kernel slower than NumPy. The float32 versions here use only operations
that have SIMD forms on AVX2 as well as AVX-512: float32 floor, float32->int32 conversion,
integer shifts and fused multiply-adds. int64<->float conversions are avoided on purpose: they
vectorize only with AVX-512DQ, and ``math.floor`` returns int64 in Numba.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, types
from numba.core.extending import overload

from fastxent.cpu._bits import bits_from_f32, f32_from_bits
from fastxent.cpu._constants import EXACT_FASTMATH, FASTMATH

_LOG2E = np.float32(1.4426950408889634)
# ln 2 split in two (Cody-Waite): the high part has 11 significant bits, so n * high is exact
# for every |n| <= 127 and the reduced argument keeps full float32 accuracy.
_LN2_HIGH = np.float32(0.693115234375)
_LN2_LOW = np.float32(3.194618329871446e-05)
_ONE = np.float32(1.0)
_TWO = np.float32(2.0)
# Adding 1.5 * 2**23 rounds a float32 of magnitude < 2**22 to an integer held in the low
# mantissa bits. Unlike floor + fptosi this is defined for NaN (fptosi of NaN is poison in
# LLVM) and costs one add instead of a round and a convert.
_ROUND_MAGIC = np.float32(12582912.0)
_EXPONENT_BIAS = np.int32(127 << 23)
# exp(-87) = 1.6e-38 is still a normal float32; below it the result is flushed to exactly 0.
_EXP_MIN_ARG = np.float32(-87.0)
# Degree-5 polynomial for exp(r) on |r| <= ln2 / 2 with the constant term fixed at 1, so that
# exp(0) is exactly 1 (the max of a row contributes exactly 1 to its sum), fitted for least
# maximum relative error: 1.7e-7 with float32 evaluation.
_P0 = np.float32(1.0)
_P1 = np.float32(0.9999997019767761)
_P2 = np.float32(0.4999915063381195)
_P3 = np.float32(0.1666763573884964)
_P4 = np.float32(0.04189793020486832)
_P5 = np.float32(0.008290315046906471)
# tanh(u) = u * P(u^2) for |u| < 0.55, P of degree 5 fitted for least maximum relative error
# (1e-9). Above 0.55, (1 - e^-2|u|) / (1 + e^-2|u|) loses at most a factor 1.5 to cancellation.
_TANH_SMALL = np.float32(0.55)
_Q0 = np.float32(1.0)
_Q1 = np.float32(-0.3333331048488617)
_Q2 = np.float32(0.13332460820674896)
_Q3 = np.float32(-0.05384272709488869)
_Q4 = np.float32(0.021039742976427078)
_Q5 = np.float32(-0.006235641427338123)
# exp for logits stored in half precision (float16, bfloat16). Their gradient is stored with 11
# or 8 significant bits, so float32's last bits buy it nothing, and the sum of exps (the loss)
# needs only a small, unbiased relative error: degree 4 instead of 5, and fewer constants, so
# that an AVX2 loop holds them all in its 16 vector registers (the float32 loop spills some).
# Degree-4 polynomial exp(r) = 1 + r * (H1 + r * (H2 + r * (H3 + r * H4))) on |r| <= ln2 / 2,
# fitted for least maximum relative error: 3.1e-6 for the whole function in float32
# (measured over [-86.5, 0]; mean 5e-7), below the tests' 1e-5 allowance for compute error.
_LN2 = np.float32(0.6931471805599453)
_H1 = np.float32(0.9999668002128601)
_H2 = np.float32(0.500029981136322)
_H3 = np.float32(0.1678759604692459)
_H4 = np.float32(0.041515644639730453)
# The rounding constant with the exponent bias already added: its low mantissa bits hold
# round(x / ln 2) + 127, which shifted left by 23 is directly the bit pattern of 2**n.
_HALF_MAGIC = np.float32(12582912.0 + 127.0)
# Below this 2**n would leave the normal range (n >= -125 here); the result is flushed to 0.
_HALF_MIN_ARG = np.float32(-86.5)
HALF_MIN_ARG = float(_HALF_MIN_ARG)


@njit(fastmath=EXACT_FASTMATH, cache=True, error_model="numpy")
def exp_f32(x):
    """exp(x) for float32 x <= 0 (the only arguments the kernels form); NaN gives NaN.

    About 2 ulp; exactly 0 below -87 (so -inf gives 0). About 14 vector instructions.
    """
    # The compare is false for NaN, so NaN stays NaN; -inf becomes -87 (result masked below).
    bounded = _EXP_MIN_ARG if x < _EXP_MIN_ARG else x
    shifted = bounded * _LOG2E + _ROUND_MAGIC
    whole = shifted - _ROUND_MAGIC
    r = (bounded - whole * _LN2_HIGH) - whole * _LN2_LOW
    poly = _P0 + r * (_P1 + r * (_P2 + r * (_P3 + r * (_P4 + r * _P5))))
    # The low bits of ``shifted`` hold round(x / ln 2) in two's complement; shifted left by 23
    # (the high bits fall off) and biased, they are the exponent field of 2**n.
    power = f32_from_bits(np.int32(np.int32(bits_from_f32(shifted) << np.uint32(23)) + _EXPONENT_BIAS))
    result = poly * power
    return np.float32(0.0) if x < _EXP_MIN_ARG else result


@njit(fastmath=EXACT_FASTMATH, cache=True, error_model="numpy")
def exp_half(x):
    """exp(x) for float32 x <= 0 formed from half-precision logits; relative error 3.1e-6.

    Exactly 1 at 0 (the max's term), exactly 0 below -86.5 (so -inf gives 0), NaN for NaN.
    About 11 vector instructions, against 14 for ``exp_f32``.
    """
    result = exp_half_in_range(x)
    # -inf, and anything below the range, gives garbage there (-inf + inf = NaN in r): masked.
    return np.float32(0.0) if x < _HALF_MIN_ARG else result


@njit(fastmath=EXACT_FASTMATH, cache=True, error_model="numpy")
def exp_half_in_range(x):
    """``exp_half`` for x in [-86.5, 0] or NaN, without the mask for arguments below: for
    blocks whose smallest logit is known to lie within 86.5 of the max (two instructions of
    about thirteen per vector)."""
    shifted = x * _LOG2E + _HALF_MAGIC
    whole = shifted - _HALF_MAGIC
    # One-constant reduction: ln 2's float32 rounding error (2e-9) times |n| <= 125 moves r by
    # at most 3e-7, a tenth of the polynomial's error.
    r = x - whole * _LN2
    power = f32_from_bits(np.int32(bits_from_f32(shifted) << np.uint32(23)))
    # power * (1 + r q) as power + (power r) q: no constant 1 to keep in a register.
    return power + (power * r) * (_H1 + r * (_H2 + r * (_H3 + r * _H4)))


@njit(fastmath=FASTMATH, cache=True, error_model="numpy")
def tanh_f32(u):
    """tanh(u) for float32 u, vectorizable; relative error below 4e-7."""
    magnitude = abs(u)
    decay = exp_f32(-_TWO * magnitude)
    large = (_ONE - decay) / (_ONE + decay)
    square = u * u
    small = u * (_Q0 + square * (_Q1 + square * (_Q2 + square * (_Q3 + square * (_Q4 + square * _Q5)))))
    large = large if u >= 0 else -large
    return small if magnitude < _TANH_SMALL else large


def exp_c(x):
    """exp in the compute type: vectorized float32 or libm float64 (Python stub for Numba)."""
    return math.exp(x)


@overload(exp_c, inline="always")
def _exp_c_overload(x):
    if x == types.float32:
        return lambda x: exp_f32(x)
    if x == types.float64:
        return lambda x: math.exp(x)
    return None


def exp_for(x, like):
    """exp of a compute-type value formed from storage element ``like``: ``exp_half`` for
    half-precision storage, ``exp_c`` otherwise (Python stub for Numba)."""
    return math.exp(x)


@overload(exp_for, inline="always")
def _exp_for_overload(x, like):
    if x == types.float32 and like in (types.int16, types.uint16):
        return lambda x, like: exp_half(x)
    return lambda x, like: exp_c(x)


def exp_term(x, like, in_range):
    """``exp_for``, or for half precision ``exp_half_in_range`` when ``in_range`` is True
    rather than None (the choice is made by type, at compile time; Python stub for Numba)."""
    return math.exp(x)


@overload(exp_term, inline="always")
def _exp_term_overload(x, like, in_range):
    if isinstance(in_range, types.Boolean) and x == types.float32 and like in (types.int16, types.uint16):
        return lambda x, like, in_range: exp_half_in_range(x)
    return lambda x, like, in_range: exp_for(x, like)


def tanh_c(x):
    """tanh in the compute type (Python stub for Numba)."""
    return math.tanh(x)


@overload(tanh_c, inline="always")
def _tanh_c_overload(x):
    if x == types.float32:
        return lambda x: tanh_f32(x)
    if x == types.float64:
        return lambda x: math.tanh(x)
    return None

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

from fastxent.cpu._bits import f32_from_bits

# No "nnan"/"ninf": with them LLVM may delete the -inf and NaN handling the semantics need.
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}

_LOG2E = np.float32(1.4426950408889634)
# ln 2 split in two (Cody-Waite): the high part has 11 significant bits, so n * high is exact
# for every |n| <= 127 and the reduced argument keeps full float32 accuracy.
_LN2_HIGH = np.float32(0.693115234375)
_LN2_LOW = np.float32(3.194618329871446e-05)
_HALF = np.float32(0.5)
_ONE = np.float32(1.0)
_TWO = np.float32(2.0)
_EXP_MIN_ARG = np.float32(-87.33)  # below this exp() is under float32's smallest normal: return 0
_EXP_MAX_POW = np.float32(127.0)
# Taylor coefficients 1/k!; on |r| <= ln2/2 the degree-7 truncation error is 5e-9 relative,
# well under float32's rounding.
_C2 = np.float32(1.0 / 2.0)
_C3 = np.float32(1.0 / 6.0)
_C4 = np.float32(1.0 / 24.0)
_C5 = np.float32(1.0 / 120.0)
_C6 = np.float32(1.0 / 720.0)
_C7 = np.float32(1.0 / 5040.0)
# tanh(u) = u - u^3/3 + 2u^5/15 - 17u^7/315 + 62u^9/2835 for |u| < 1/8 (error < 1e-12)
_TANH_SMALL = np.float32(0.125)
_T3 = np.float32(-1.0 / 3.0)
_T5 = np.float32(2.0 / 15.0)
_T7 = np.float32(-17.0 / 315.0)
_T9 = np.float32(62.0 / 2835.0)


@njit(fastmath=FASTMATH, cache=True, inline="always")
def exp_f32(x):
    """exp(x) for float32 x; exact to ~2 ulp for x in [-87.33, 88], 0 below, NaN for NaN."""
    scaled = np.floor(x * _LOG2E + _HALF)
    # The ordered compares send NaN to the clamp value, so the int32 conversion below is
    # always defined (fptosi of NaN is poison in LLVM); r stays NaN and carries it through.
    scaled = scaled if scaled > -_EXP_MAX_POW else -_EXP_MAX_POW
    scaled = scaled if scaled < _EXP_MAX_POW else _EXP_MAX_POW
    r = (x - scaled * _LN2_HIGH) - scaled * _LN2_LOW
    poly = _ONE + r * (_ONE + r * (_C2 + r * (_C3 + r * (_C4 + r * (_C5 + r * (_C6 + r * _C7))))))
    # Numba widens int32 arithmetic to int64; the outer casts let LLVM keep it in 32 bits.
    biased = np.int32(np.int32(scaled) + np.int32(127))
    power = f32_from_bits(np.int32(biased << np.int32(23)))
    result = poly * power
    return np.float32(0.0) if x < _EXP_MIN_ARG else result


@njit(fastmath=FASTMATH, cache=True, inline="always")
def tanh_f32(u):
    """tanh(u) for float32 u, vectorizable; relative error about 1e-7."""
    magnitude = abs(u)
    decay = exp_f32(-_TWO * magnitude)
    large = (_ONE - decay) / (_ONE + decay)
    square = u * u
    small = u * (_ONE + square * (_T3 + square * (_T5 + square * (_T7 + square * _T9))))
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

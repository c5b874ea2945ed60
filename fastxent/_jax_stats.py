"""JAX adapter of the per-token statistics: ``token_stats`` and ``linear_token_stats``,
re-exported by ``fastxent.jax``.

Each is a ``jax.custom_vjp`` over fastxent's kernels: the forward returns (logprob, entropy,
lse, argmax) and keeps the float64 row statistics the backward needs (as uint32 pairs, so they
survive JAX's default 32-bit mode); the backward of any a logprob + b entropy + c lse is one
more sweep (the linear one computes the logits again, block by block). On the CPU the kernels
run as XLA FFI custom calls on XLA's own buffers (``fastxent._xla_ffi``), elsewhere through a
host callback. Works under ``jit``, ``grad`` and ``vmap`` (one call per mapped element);
second derivatives are not implemented.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any, Callable, List, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from fastxent._linear_api import linear_token_stats_backward, linear_token_stats_forward
from fastxent._token_range import TokenRowStats
from fastxent._token_stats_api import TokenForward, check_temperature, token_stats_backward, token_stats_forward
from fastxent._xla_ffi import register_host_target

__all__ = ["TokenStats", "linear_token_stats", "token_stats"]

_NUMBERS = itertools.count()


class TokenStats(NamedTuple):
    """Per-token statistics as JAX arrays (see ``fastxent.token_stats``)."""

    logprob: Any
    entropy: Any
    lse: Any
    argmax: Any


def _index_dtype():
    return jax.dtypes.canonicalize_dtype(np.int64)


def _value_dtype(dtype) -> np.dtype:
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


@functools.lru_cache(maxsize=None)
def _cpu_target(key: Tuple[Any, ...], host: Callable[..., List[np.ndarray]]) -> str:
    def compute(arguments, results):
        for array in arguments:
            array.flags.writeable = False
        for result, output in zip(results, host(*arguments), strict=True):
            result[...] = output

    return register_host_target(f"fastxent_token_stats_{next(_NUMBERS)}", compute)


def _host_call(key: Tuple[Any, ...], host: Callable[..., List[np.ndarray]], shapes, *arguments):
    """``host`` (NumPy arrays in, a list of arrays out) as an XLA custom call on the CPU and a
    host callback elsewhere; ``key`` names the configuration (one target per key)."""

    def on_cpu(*args):
        return jax.ffi.ffi_call(_cpu_target(key, host), shapes, vmap_method="sequential")(*args)

    def elsewhere(*args):
        return jax.pure_callback(host, shapes, *args, vmap_method="sequential")

    return list(jax.lax.platform_dependent(*arguments, cpu=on_cpu, default=elsewhere))


def _saved(stats: TokenRowStats) -> np.ndarray:
    """The backward's float64 (3, N) statistics as uint32 (3, N, 2)."""
    values = np.ascontiguousarray(np.stack([stats.row_max, stats.sum_exp, stats.centred_sum]), dtype=np.float64)
    return values.view(np.uint32).reshape(values.shape + (2,))


def _forward_of(saved: np.ndarray, labels: np.ndarray, ignore_index, temperature, softcap) -> TokenForward:
    row_max, sum_exp, centred_sum = np.ascontiguousarray(saved).view(np.float64)[..., 0]
    encoded = labels.astype(np.int64)
    if ignore_index is not None:
        encoded = np.where(labels == ignore_index, -1, encoded)
    stats = TokenRowStats(row_max, sum_exp, centred_sum, None, None, None)
    return TokenForward(None, stats, encoded, 1, temperature, softcap)


def _outputs(forward: TokenForward) -> List[np.ndarray]:
    values = forward.values
    return [values.logprob, values.entropy, values.lse, values.argmax.astype(_index_dtype()), _saved(forward.stats)]


def _shapes(num_rows: int, dtype) -> list:
    value = _value_dtype(dtype)
    return [
        jax.ShapeDtypeStruct((num_rows,), value),
        jax.ShapeDtypeStruct((num_rows,), value),
        jax.ShapeDtypeStruct((num_rows,), value),
        jax.ShapeDtypeStruct((num_rows,), _index_dtype()),
        jax.ShapeDtypeStruct((3, num_rows, 2), np.uint32),
    ]


def _cotangent(value) -> Optional[np.ndarray]:
    return np.asarray(value, dtype=np.float64)


@functools.lru_cache(maxsize=None)
def _token_stats_fn(temperature: float, softcap: Optional[float], ignore_index: Optional[int]):
    options = dict(temperature=temperature, softcap=softcap, ignore_index=ignore_index)

    def forward_host(logits, labels):
        return _outputs(token_stats_forward(np.asarray(logits), np.asarray(labels), **options))

    def backward_host(logits, labels, saved, a, b, c):
        forward = _forward_of(saved, np.asarray(labels), ignore_index, temperature, softcap)
        grad = token_stats_backward(np.asarray(logits), forward, _cotangent(a), _cotangent(b), _cotangent(c))
        return [np.asarray(grad)]

    key = ("rows", temperature, softcap, ignore_index)

    def call(logits, labels):
        return _host_call(key + ("forward",), forward_host, _shapes(labels.shape[0], logits.dtype), logits, labels)

    @jax.custom_vjp
    def stats(logits, labels):
        return tuple(call(logits, labels)[:4])

    def fwd(logits, labels):
        *values, saved = call(logits, labels)
        return tuple(values), (logits, labels, saved)

    def bwd(residuals, cotangents):
        logits, labels, saved = residuals
        a, b, c, _ = cotangents
        (grad,) = _host_call(
            key + ("backward",),
            backward_host,
            [jax.ShapeDtypeStruct(logits.shape, logits.dtype)],
            logits,
            labels,
            saved,
            a,
            b,
            c,
        )
        return grad, None

    stats.defvjp(fwd, bwd)
    return stats


def token_stats(
    logits: Any,
    labels: Any,
    *,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    ignore_index: Optional[int] = None,
    axis: int = -1,
) -> TokenStats:
    """``fastxent.token_stats`` on JAX arrays, differentiable in logprob, entropy and lse
    jointly (a ``jax.custom_vjp``; argmax is an integer output).

    Args:
        logits: (..., C, ...) float16/bfloat16/float32/float64 with the classes on ``axis``.
        labels: integer class indices, the logits' shape without ``axis``.
        temperature, softcap, ignore_index: as ``fastxent.token_stats``.

    Returns:
        ``TokenStats(logprob, entropy, lse, argmax)``, labels-shaped (argmax int64 with x64
        enabled, else int32).
    """
    logits = jnp.asarray(logits)
    labels = jnp.asarray(labels)
    moved = jnp.moveaxis(logits, axis, -1)
    lead_shape = moved.shape[:-1]
    if tuple(labels.shape) != tuple(lead_shape):
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal the logits' shape without axis, {lead_shape}")
    fn = _token_stats_fn(check_temperature(temperature), None if softcap is None else float(softcap), ignore_index)
    values = fn(moved.reshape(-1, moved.shape[-1]), labels.reshape(-1))
    return TokenStats(*(v.reshape(lead_shape) for v in values))


@functools.lru_cache(maxsize=None)
def _linear_fn(temperature: float, softcap: Optional[float], ignore_index: Optional[int], has_bias: bool):
    options = dict(temperature=temperature, softcap=softcap, ignore_index=ignore_index)

    def forward_host(hidden, weight, labels, *bias):
        forward = linear_token_stats_forward(
            np.asarray(hidden),
            np.asarray(weight),
            np.asarray(labels),
            bias=np.asarray(bias[0]) if bias else None,
            **options,
        )
        return _outputs(forward)

    def backward_host(hidden, weight, labels, saved, a, b, c, *bias):
        forward = _forward_of(saved, np.asarray(labels), ignore_index, temperature, softcap)
        grads = linear_token_stats_backward(
            np.asarray(hidden),
            np.asarray(weight),
            forward,
            _cotangent(a),
            _cotangent(b),
            _cotangent(c),
            bias=np.asarray(bias[0]) if bias else None,
        )
        return [g for g in grads if g is not None]

    key = ("linear", temperature, softcap, ignore_index, has_bias)

    def call(hidden, weight, bias, labels):
        args = (hidden, weight, labels) + ((bias,) if has_bias else ())
        return _host_call(key + ("forward",), forward_host, _shapes(labels.shape[0], hidden.dtype), *args)

    @jax.custom_vjp
    def stats(hidden, weight, bias, labels):
        return tuple(call(hidden, weight, bias, labels)[:4])

    def fwd(hidden, weight, bias, labels):
        *values, saved = call(hidden, weight, bias, labels)
        return tuple(values), (hidden, weight, bias, labels, saved)

    def bwd(residuals, cotangents):
        hidden, weight, bias, labels, saved = residuals
        a, b, c, _ = cotangents
        shapes = [jax.ShapeDtypeStruct(t.shape, t.dtype) for t in (hidden, weight) + ((bias,) if has_bias else ())]
        args = (hidden, weight, labels, saved, a, b, c) + ((bias,) if has_bias else ())
        grads = _host_call(key + ("backward",), backward_host, shapes, *args)
        return grads[0], grads[1], grads[2] if has_bias else None, None

    stats.defvjp(fwd, bwd)
    return stats


def linear_token_stats(
    hidden: Any,
    weight: Any,
    labels: Any,
    *,
    bias: Any = None,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    ignore_index: Optional[int] = None,
) -> TokenStats:
    """``fastxent.linear_token_stats`` on JAX arrays: hidden (..., H), weight (V, H), bias (V,)
    or None; differentiable w.r.t. hidden, weight and bias (see ``token_stats``)."""
    hidden, weight, labels = jnp.asarray(hidden), jnp.asarray(weight), jnp.asarray(labels)
    lead_shape = hidden.shape[:-1]
    if tuple(labels.shape) != tuple(lead_shape):
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal the hidden's shape without H, {lead_shape}")
    fn = _linear_fn(
        check_temperature(temperature), None if softcap is None else float(softcap), ignore_index, bias is not None
    )
    values = fn(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        None if bias is None else jnp.asarray(bias),
        labels.reshape(-1),
    )
    return TokenStats(*(v.reshape(lead_shape) for v in values))

"""The loss's tangent as a JAX primitive whose transpose scales the kept gradient in place.

``fastxent.jax``'s forward-mode rule returns the loss's tangent as the kept gradient contracted
with the logits' tangent: ``sum(grad * tangent, axes)``. Reverse mode transposes it into
``grad * cotangent`` (the cotangent broadcast over the summed axes). Written with ``jnp``, XLA
computes that product in a separate single-threaded loop into a new N x C buffer: under
``jit(grad)`` it cost about as much as the fused kernel's own pass.

``contract`` is the same contraction as a primitive with its own transpose: on the CPU, for
float32/float64 with the summed axes trailing (the usual class axis -1), the product is an XLA
FFI call that aliases its output to the kept gradient (``input_output_aliases``) and scales it
with fastxent's parallel row scaling. XLA writes in place when the kept gradient is not used
afterwards (inside one ``jit``), and copies it first otherwise, so the result is the same either
way. Anything else (other dtypes or axes, other platforms) uses ``jnp``.
"""

from __future__ import annotations

import functools
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from fastxent._xla_ffi import register_host_target
from fastxent.cpu.rowscale import SCALABLE_DTYPES, scale_rows_

__all__ = ["contract"]


def contract(grad, tangent, axes: Tuple[int, ...]):
    """``sum(grad * tangent, axis=axes)``, linear in each argument.

    Args:
        grad: the kept gradient, any shape, float dtype.
        tangent: same shape and dtype as ``grad``.
        axes: the summed axes, non-negative and ascending.

    Returns:
        an array of ``grad``'s shape without ``axes``, in ``grad``'s dtype.
    """
    return _contract_p.bind(grad, tangent, axes=tuple(axes))


def _contract_reference(grad, tangent, *, axes):
    _contract_shape(grad, tangent, axes=axes)
    return (grad * tangent).sum(axis=axes)


def _contract_shape(grad, tangent, *, axes):
    if grad.shape != tangent.shape or grad.dtype != tangent.dtype:
        raise TypeError(f"contract: {grad.shape} {grad.dtype} against {tangent.shape} {tangent.dtype}")
    kept = tuple(size for axis, size in enumerate(grad.shape) if axis not in axes)
    return jax.core.ShapedArray(kept, grad.dtype)


def _broadcast_product(array, cotangent, axes):
    """``array * cotangent`` with the cotangent broadcast over ``axes``, by XLA."""
    return array * jnp.expand_dims(cotangent, axes)


def _scale_by_cotangent(array, cotangent, axes):
    """``_broadcast_product``, on the CPU in place by fastxent's row scaling where it can be."""
    trailing = axes == tuple(range(array.ndim - len(axes), array.ndim))
    if not trailing or np.dtype(array.dtype) not in SCALABLE_DTYPES or array.size == 0:
        return _broadcast_product(array, cotangent, axes)

    def on_cpu(array, cotangent):
        call = jax.ffi.ffi_call(
            _scale_target(),
            jax.ShapeDtypeStruct(array.shape, array.dtype),
            input_output_aliases={0: 0},
            vmap_method="broadcast_all",
        )
        return call(array, cotangent)

    return jax.lax.platform_dependent(
        array, cotangent, cpu=on_cpu, default=functools.partial(_broadcast_product, axes=axes)
    )


def _transpose_tangent(cotangent, grad, tangent, *, axes):
    return _scale_by_cotangent(grad, cotangent, axes)


def _transpose_grad(cotangent, grad, tangent, *, axes):
    return _broadcast_product(tangent, cotangent, axes)


def _batch(arguments, dimensions, *, axes):
    size = next(a.shape[d] for a, d in zip(arguments, dimensions, strict=True) if d is not None)
    moved = [
        jnp.broadcast_to(a, (size, *a.shape)) if d is None else jnp.moveaxis(a, d, 0)
        for a, d in zip(arguments, dimensions, strict=True)
    ]
    return contract(*moved, tuple(axis + 1 for axis in axes)), 0


_contract_p = Primitive("fastxent_kept_gradient_contraction")
_contract_p.def_impl(_contract_reference)
_contract_p.def_abstract_eval(_contract_shape)
mlir.register_lowering(_contract_p, mlir.lower_fun(_contract_reference, multiple_results=False))
ad.defbilinear(_contract_p, _transpose_grad, _transpose_tangent)
batching.primitive_batchers[_contract_p] = _batch


@functools.lru_cache(maxsize=None)
def _scale_target() -> str:
    """The CPU custom-call target ``result = array * cotangent`` (rows of the trailing axes)."""

    def compute(arguments, results):
        array, cotangent = arguments
        result = results[0]
        factors = cotangent.reshape(-1)
        ones = bool(np.all(factors == 1))
        if result.ctypes.data != array.ctypes.data:
            # XLA did not alias (the kept gradient is still needed): one pass into the result.
            if ones:
                np.copyto(result, array)
            else:
                rows = factors.size
                np.multiply(array.reshape(rows, -1), factors.reshape(rows, 1), out=result.reshape(rows, -1))
            return
        if ones:
            # A reduced loss differentiated on its own (jax.grad's cotangent 1.0): the kept
            # gradient already is the answer, and x * 1 == x exactly.
            return
        if factors.size == 1 and result.ndim > 1:
            # One factor (a reduced loss): rows of the leading axis, so that threads share it.
            factors = np.repeat(factors, result.shape[0])
        scale_rows_(result.reshape(factors.size, -1), factors)

    return register_host_target("fastxent_scale_kept_gradient", compute)

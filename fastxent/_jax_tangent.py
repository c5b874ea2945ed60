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
import jax.custom_batching
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fastxent._xla_ffi import register_host_target
from fastxent.cpu.rowscale import SCALABLE_DTYPES, scale_rows_

__all__ = ["batched_as", "common_varying", "contract", "mark_varying", "summed_to_type_of", "traced_or_spread"]


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
    sharding = getattr(grad, "sharding", None)
    if not isinstance(sharding, NamedSharding):
        return jax.core.ShapedArray(kept, grad.dtype)
    # The gradient's type less the summed axes: inside shard_map it varies over the same axes.
    spec = tuple(sharding.spec) + (None,) * (grad.ndim - len(sharding.spec))
    kept_spec = P(*(entry for axis, entry in enumerate(spec) if axis not in axes))
    return grad.update(shape=kept, sharding=sharding.update(spec=kept_spec))


def _broadcast_product(array, cotangent, axes):
    """``array * cotangent`` with the cotangent broadcast over ``axes``, by XLA."""
    return array * jnp.expand_dims(cotangent, axes)


def _scale_by_cotangent(array, cotangent, axes):
    """``_broadcast_product``, on the CPU in place by fastxent's row scaling where it can be."""
    trailing = axes == tuple(range(array.ndim - len(axes), array.ndim))
    if not trailing or np.dtype(array.dtype) not in SCALABLE_DTYPES or array.size == 0:
        return _broadcast_product(array, cotangent, axes)
    if not (traced_or_spread(array) or traced_or_spread(cotangent)) or common_varying([array])[1]:
        # Eager on one device there is nothing to partition; inside shard_map the arrays are
        # this device's blocks already.
        return _local_scale(array, cotangent, axes)
    return _partitioned_scale(array.ndim, axes)(array, cotangent)


def _local_scale(array, cotangent, axes):
    """One device's ``_scale_by_cotangent``: the CPU's in-place custom call, XLA elsewhere."""
    (array, cotangent), varying = common_varying([array, cotangent])
    return jax.lax.platform_dependent(
        array,
        cotangent,
        cpu=lambda a, c: mark_varying(_scale_in_place(a, c), varying),
        default=functools.partial(_broadcast_product, axes=axes),
    )


@functools.lru_cache(maxsize=None)
def _partitioned_scale(ndim: int, axes: Tuple[int, ...]):
    """``_local_scale`` for one rank and axes, partitioned like the array (cached: the same
    operation each time, so that JAX's caches hit)."""
    local = functools.partial(_local_scale, axes=axes)
    return batched_as(_elementwise(local, ndim, len(axes)), local)


def traced_or_spread(array) -> bool:
    """Whether ``array`` is traced by jit (its placement is decided later) or spread over
    several devices: whether an operation on it may need partitioning."""
    if isinstance(array, jax.core.Tracer):
        # Eager differentiation traces around a concrete array; jit's tracers hold none.
        concrete = getattr(array, "to_concrete_value", lambda: None)()
        if concrete is None:
            return True
        array = concrete
    sharding = getattr(array, "sharding", None)
    return sharding is not None and len(sharding.device_set) > 1


def _scale_in_place(array, cotangent):
    """The CPU custom call ``array * cotangent``, its result aliased to ``array``."""
    call = jax.ffi.ffi_call(
        _scale_target(),
        jax.ShapeDtypeStruct(array.shape, array.dtype),
        input_output_aliases={0: 0},
        vmap_method="broadcast_all",
    )
    return call(array, cotangent)


def batched_as(function, local):
    """``function`` (a ``custom_partitioning`` operation, which JAX cannot batch) mapped by
    ``jax.vmap`` as ``local`` is: one device's operation is the same under vmap."""

    @jax.custom_batching.custom_vmap
    def mapped(*arguments):
        return function(*arguments)

    @mapped.def_vmap
    def rule(axis_size, in_batched, *arguments):
        result = jax.vmap(local, in_axes=tuple(0 if batched else None for batched in in_batched))(*arguments)
        return result, jax.tree.map(lambda _: True, result)

    return mapped


def _elementwise(local, ndim: int, trailing: int):
    """``local(array, cotangent)`` as an operation that XLA partitions like ``array``: each
    device scales its own block by its rows' factors (a custom call XLA cannot see into would
    otherwise be given the whole array)."""
    kept = ndim - trailing
    dims = [f"d{d}" for d in range(ndim)]
    rule = f"{' '.join(dims)}, {' '.join(dims[:kept])} -> {' '.join(dims)}"

    @custom_partitioning
    def scaled(array, cotangent):
        return local(array, cotangent)

    def shardings(mesh, arg_shapes):
        sharding = arg_shapes[0].sharding
        spec = tuple(sharding.spec) if isinstance(sharding, NamedSharding) else ()
        spec = spec + (None,) * (ndim - len(spec))
        array = NamedSharding(mesh, P(*spec))
        return array, (array, NamedSharding(mesh, P(*spec[:kept])))

    def partition(mesh, arg_shapes, result_shape):
        result, args = shardings(mesh, arg_shapes)
        return mesh, local, result, args

    scaled.def_partition(
        partition=partition,
        infer_sharding_from_operands=lambda mesh, arg_shapes, result_shape: shardings(mesh, arg_shapes)[0],
        sharding_rule=rule,
    )
    return scaled


def _varying_axes(array) -> frozenset:
    """The manual mesh axes (inside ``shard_map``) over which ``array`` varies."""
    typeof = getattr(jax, "typeof", None)
    if typeof is None:  # older JAX: no varying-axes types
        return frozenset()
    aval = typeof(array)
    manual = getattr(aval, "manual_axis_type", None)
    return frozenset(manual.varying) if manual is not None else frozenset(getattr(aval, "vma", ()))


def common_varying(arrays):
    """``arrays`` made to vary over every manual mesh axis (inside ``shard_map``) any of them
    varies over, and those axes (() outside ``shard_map``): a custom call's arguments must
    agree, and its results are marked with ``mark_varying`` (JAX cannot tell how they vary)."""
    varying = frozenset()
    for array in arrays:
        varying |= _varying_axes(array)
    out = []
    for array in arrays:
        missing = tuple(sorted(varying - _varying_axes(array)))
        out.append(jax.lax.pcast(array, missing, to="varying") if missing else array)
    return out, tuple(sorted(varying))


def summed_to_type_of(grad, primal):
    """``grad`` summed over the manual mesh axes it varies over and ``primal`` does not: the
    cotangent of an argument replicated over them (the transpose of making it vary)."""
    extra = tuple(sorted(_varying_axes(grad) - _varying_axes(primal)))
    return jax.lax.psum(grad, extra) if extra else grad


def mark_varying(results, axes: Tuple[str, ...]):
    """A custom call's results (an array or a sequence) typed as varying over ``axes``."""
    if not axes:
        return results

    def mark(array):
        missing = tuple(a for a in axes if a not in _varying_axes(array))
        return jax.lax.pcast(array, missing, to="varying") if missing else array

    return mark(results) if not isinstance(results, (list, tuple)) else type(results)(map(mark, results))


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

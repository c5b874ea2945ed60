"""fastxent.jax against optax.softmax_cross_entropy_with_integer_labels: loss and gradient under
jit, grad and vmap, optax's ``axis`` and ``where``, and fastxent's own options against the
float64 reference. Skipped where JAX (the ``jax`` extra) is not installed."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
import jax.numpy as jnp  # noqa: E402
from conftest import (  # noqa: E402
    assert_at_least_naive_accuracy,
    assert_grad_close,
    assert_loss_close,
)

import fastxent.jax as fxj  # noqa: E402
from fastxent import reference  # noqa: E402

pytestmark = pytest.mark.peers

# float64 needs JAX's x64 mode, switched on only inside the float64 test.
try:
    enable_x64 = jax.enable_x64
except AttributeError:  # older JAX
    from jax.experimental import enable_x64
NUM_CLASSES = 13
EXACT = {"float32": dict(rtol=2e-5, atol=2e-6), "float64": dict(rtol=1e-12, atol=1e-13)}


def value_and_grad(function, logits, labels, upstream, jit, **options):
    def weighted(x):
        return jnp.sum(function(x, labels, **options) * upstream)

    run = jax.jit(jax.value_and_grad(weighted)) if jit else jax.value_and_grad(weighted)
    return function(logits, labels, **options), run(logits)[1]


def as64(array):
    return np.asarray(array).astype(np.float64)


# Every dtype once, both ranks in float32: each new shape and dtype costs JAX a compile.
CASES = (("float32", (9,)), ("float32", (2, 5)), ("float64", (9,)), ("bfloat16", (9,)), ("float16", (2, 5)))


@pytest.mark.parametrize("dtype_name, lead_shape", CASES, ids=[f"{d}-{len(s)}d" for d, s in CASES])
@pytest.mark.parametrize("jit", (False, True), ids=("eager", "jit"))
def test_matches_optax(rng, dtype_name, lead_shape, jit):
    with enable_x64(dtype_name == "float64"):
        dtype = jnp.dtype(dtype_name)
        logits = jnp.asarray(rng.standard_normal(lead_shape + (NUM_CLASSES,)) * 3, dtype)
        labels = jnp.asarray(rng.integers(0, NUM_CLASSES, lead_shape))
        upstream = jnp.asarray(rng.choice([0.5, 1.0, 2.0], lead_shape), dtype)  # exact scalings
        ours = value_and_grad(fxj.sparse_cross_entropy, logits, labels, upstream, jit)
        theirs = value_and_grad(optax.softmax_cross_entropy_with_integer_labels, logits, labels, upstream, jit)
        assert ours[0].dtype == theirs[0].dtype == dtype and ours[0].shape == theirs[0].shape
        assert ours[1].dtype == theirs[1].dtype and ours[1].shape == logits.shape
        ref_loss, ref_grad = reference.sparse_cross_entropy_with_grad(
            as64(logits), np.asarray(labels), reduction="none"
        )
        ref_grad = ref_grad * as64(upstream)[..., None]
        if dtype_name in EXACT:
            np.testing.assert_allclose(as64(ours[0]), as64(theirs[0]), **EXACT[dtype_name])
            np.testing.assert_allclose(
                as64(ours[1]), as64(theirs[1]), rtol=EXACT[dtype_name]["rtol"], atol=EXACT[dtype_name]["atol"] * 2
            )
            assert_loss_close(as64(ours[0]), ref_loss, np.dtype(dtype))
            assert_grad_close(as64(ours[1]), ref_grad, np.dtype(dtype), scale=2.0)
        else:
            assert_at_least_naive_accuracy(as64(ours[0]), ref_loss, as64(theirs[0]), np.dtype(dtype), "loss")
            assert_at_least_naive_accuracy(as64(ours[1]), ref_grad, as64(theirs[1]), np.dtype(dtype), "grad", scale=2.0)


def test_optax_axis_and_where(rng):
    logits = jnp.asarray(rng.standard_normal((4, NUM_CLASSES, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, NUM_CLASSES, (4, 3)))
    row_mask = jnp.asarray(rng.random((4, 3)) < 0.6).at[0, 0].set(False)
    class_mask = jnp.asarray(rng.random(logits.shape) < 0.7)
    # Keep each label's class in the softmax (optax keeps the label's logit even when masked).
    class_mask = class_mask | (jnp.arange(NUM_CLASSES)[None, :, None] == labels[:, None, :])
    class_mask = class_mask.at[1, :, 2].set(False)  # a row with nothing left: loss 0, as optax
    cases = [dict(axis=1), dict(axis=1, where=row_mask), dict(axis=1, where=class_mask)]
    for options in cases:
        ours = value_and_grad(fxj.sparse_cross_entropy, logits, labels, 1.0, True, **options)
        theirs = value_and_grad(optax.softmax_cross_entropy_with_integer_labels, logits, labels, 1.0, True, **options)
        np.testing.assert_allclose(ours[0], theirs[0], rtol=2e-5, atol=2e-6)
        np.testing.assert_allclose(ours[1], theirs[1], rtol=2e-5, atol=2e-6)
    assert float(fxj.sparse_cross_entropy(logits, labels, axis=1, where=row_mask)[0, 0]) == 0.0
    # A tuple of axes: the classes are a flattened (3, 4) slice, as in optax's example.
    grid = jnp.asarray(rng.standard_normal((2, 3, 4)), jnp.float32)
    flat_labels = jnp.asarray([5, 11])
    np.testing.assert_allclose(
        fxj.sparse_cross_entropy(grid, flat_labels, axis=(1, 2)),
        optax.softmax_cross_entropy_with_integer_labels(grid, flat_labels, axis=(1, 2)),
        rtol=2e-5,
    )


@pytest.mark.parametrize("num_classes", (5, 256), ids=("5-classes", "256-classes"))
def test_where_rows_with_every_integer_label_dtype(rng, num_classes):
    """Rows left out by ``where`` are ignored whatever the labels' dtype: class 0 is a class for
    unsigned labels too (and a dtype's whole range can be classes: uint8 with 256)."""
    logits = jnp.asarray(rng.standard_normal((6, num_classes)) * 2, jnp.float32)
    values = np.array([0, 3, 1, 0, num_classes - 1, 2])
    keep = jnp.asarray([True, True, False, True, True, False])
    optax_loss = optax.softmax_cross_entropy_with_integer_labels

    @jax.jit
    def both(labels):
        # optax has no ignore_index: its rows with label 3 are left out through where.
        kept = keep & (labels != 3)
        return (
            (fxj.sparse_cross_entropy(logits, labels, where=keep), optax_loss(logits, labels, where=keep)),
            (
                fxj.sparse_cross_entropy(logits, labels, where=keep, ignore_index=-100),
                optax_loss(logits, labels, where=keep),
            ),
            (
                fxj.sparse_cross_entropy(logits, labels, where=keep, ignore_index=3),
                optax_loss(logits, labels, where=kept),
            ),
        )

    kinds = ("uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64")
    for name in kinds if num_classes < 128 else ("uint8", "int16"):
        with enable_x64(name.endswith("64")):
            labels = jnp.asarray(values.astype(name))
            assert labels.dtype == np.dtype(name)
            for ours, theirs in both(labels):
                np.testing.assert_allclose(ours, theirs, rtol=2e-5, atol=2e-6, err_msg=name)
                assert float(ours[0]) > 0.0 and float(ours[2]) == 0.0
            # A kept label equal to the value that marks left-out rows is still out of range.
            info = np.iinfo(name)
            if num_classes < info.max:
                marker = info.min if info.min < 0 else info.max
                bad = jnp.asarray(values.astype(name)).at[1].set(marker)
                with pytest.raises(Exception, match=r"label -?\d+ at position \(1,\) is outside"):
                    jax.block_until_ready(fxj.sparse_cross_entropy(logits, bad, where=keep))
    # The gradient of unsigned labels' kept rows, class 0 included.
    labels = jnp.asarray(values.astype(np.uint8))
    ours = value_and_grad(fxj.sparse_cross_entropy, logits, labels, 1.0, True, where=keep)
    theirs = value_and_grad(optax_loss, logits, labels, 1.0, True, where=keep)
    np.testing.assert_allclose(ours[1], theirs[1], rtol=2e-5, atol=2e-6)


def test_vmap(rng):
    logits = jnp.asarray(rng.standard_normal((3, 5, NUM_CLASSES)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, NUM_CLASSES, (3, 5)))
    mapped = jax.vmap(lambda x, y: jnp.mean(fxj.sparse_cross_entropy(x, y)))
    expected = jax.vmap(lambda x, y: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(x, y)))
    np.testing.assert_allclose(mapped(logits, labels), expected(logits, labels), rtol=2e-5)
    np.testing.assert_allclose(
        jax.grad(lambda x: mapped(x, labels).sum())(logits),
        jax.grad(lambda x: expected(x, labels).sum())(logits),
        rtol=2e-5,
        atol=2e-6,
    )


def test_fastxent_options_match_reference(rng):
    logits = jnp.asarray(rng.standard_normal((8, NUM_CLASSES)) * 2, jnp.float32)
    labels = rng.integers(0, NUM_CLASSES, 8)
    labels[[1, 5]] = -100
    options = dict(
        ignore_index=-100,
        label_smoothing=0.1,
        class_weight=rng.uniform(0.5, 2.0, NUM_CLASSES),
        sample_weight=rng.uniform(0.0, 2.0, 8),
        z_loss=1e-3,
        softcap=5.0,
    )
    for reduction in ("none", "sum", "mean", "sum_over_batch_size"):

        def total(x, reduction=reduction):
            return jnp.sum(fxj.sparse_cross_entropy(x, jnp.asarray(labels), reduction=reduction, **options))

        loss, grad = jax.jit(jax.value_and_grad(total))(logits)
        ref_loss, ref_grad = reference.sparse_cross_entropy_with_grad(
            as64(logits), labels, reduction=reduction, **options
        )
        assert_loss_close(loss, np.sum(ref_loss), np.float32, scale=8.0)
        assert_grad_close(grad, ref_grad, np.float32, scale=2.0)


def test_errors(rng):
    logits = jnp.zeros((3, 4))
    with pytest.raises(Exception, match=r"label 4 at position \(1,\) is outside the valid range"):
        jax.block_until_ready(fxj.sparse_cross_entropy(logits, jnp.asarray([0, 4, 1])))
    with pytest.raises(TypeError, match="labels must be integers"):
        fxj.sparse_cross_entropy(logits, jnp.zeros(3))
    with pytest.raises(ValueError, match="unknown reduction"):
        fxj.sparse_cross_entropy(logits, jnp.zeros(3, int), reduction="avg")


def test_tuple_axes_flatten_in_the_order_given(rng):
    """optax flattens a tuple of class axes in the order given: (2, 1) is not (1, 2)."""
    grid = jnp.asarray(rng.standard_normal((2, 3, 4)), jnp.float32)
    flat_labels = jnp.asarray(rng.integers(0, 12, 2))
    for axes in ((2, 1), (-1, 1), (1, 2)):
        ours = fxj.sparse_cross_entropy(grid, flat_labels, axis=axes)
        theirs = optax.softmax_cross_entropy_with_integer_labels(grid, flat_labels, axis=axes)
        np.testing.assert_allclose(ours, theirs, rtol=2e-5, atol=2e-6)
    assert not np.allclose(
        fxj.sparse_cross_entropy(grid, flat_labels, axis=(2, 1)),
        fxj.sparse_cross_entropy(grid, flat_labels, axis=(1, 2)),
    )
    with pytest.raises(ValueError, match="twice"):
        fxj.sparse_cross_entropy(grid, flat_labels, axis=(1, -2))


def test_forward_and_reverse_mode_under_every_transform(rng):
    """jvp, jacfwd, jacrev, grad, and their jit and vmap compositions, against optax."""
    logits = jnp.asarray(rng.standard_normal((5, NUM_CLASSES)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, NUM_CLASSES, 5))
    tangent = jnp.asarray(rng.standard_normal(logits.shape), jnp.float32)

    def ours(x, y=labels):
        return fxj.sparse_cross_entropy(x, y)

    def theirs(x, y=labels):
        return optax.softmax_cross_entropy_with_integer_labels(x, y)

    close = dict(rtol=2e-5, atol=2e-6)
    for transform in (
        lambda f: jax.jvp(f, (logits,), (tangent,)),
        lambda f: jax.jacfwd(f)(logits),
        lambda f: jax.jacrev(f)(logits),
        lambda f: jax.jit(jax.jacfwd(f))(logits),
        lambda f: jax.linearize(f, logits)[1](tangent),
    ):
        for mine, other in zip(
            jax.tree_util.tree_leaves(transform(ours)), jax.tree_util.tree_leaves(transform(theirs)), strict=True
        ):
            np.testing.assert_allclose(mine, other, **close)
    batch = jnp.asarray(rng.standard_normal((3,) + logits.shape), jnp.float32)
    batch_labels = jnp.asarray(rng.integers(0, NUM_CLASSES, (3, 5)))

    def per_sample_jvp(f):
        return jax.jit(jax.vmap(lambda x, t, y: jax.jvp(lambda z: f(z, y).mean(), (x,), (t,))[1]))

    np.testing.assert_allclose(
        per_sample_jvp(ours)(batch, batch, batch_labels), per_sample_jvp(theirs)(batch, batch, batch_labels), **close
    )
    per_sample_grad = jax.vmap(jax.grad(lambda x, y: ours(x, y).sum()))(batch, batch_labels)
    np.testing.assert_allclose(
        per_sample_grad, jax.vmap(jax.grad(lambda x, y: theirs(x, y).sum()))(batch, batch_labels), **close
    )


def test_what_cannot_be_exact_raises(rng):
    """Second derivatives and derivatives in the weights raise: never a silently wrong number."""
    logits = jnp.asarray(rng.standard_normal((4, NUM_CLASSES)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, NUM_CLASSES, 4))
    with pytest.raises(NotImplementedError, match="second derivatives"):
        jax.hessian(lambda x: fxj.sparse_cross_entropy(x, labels).sum())(logits)
    with pytest.raises(NotImplementedError, match="second derivatives"):
        jax.jacfwd(jax.grad(lambda x: fxj.sparse_cross_entropy(x, labels).sum()))(logits)
    with pytest.raises(NotImplementedError, match="class_weight or sample_weight"):
        jax.grad(lambda w: fxj.sparse_cross_entropy(logits, labels, class_weight=w).sum())(jnp.ones(NUM_CLASSES))
    with pytest.raises(NotImplementedError, match="class_weight or sample_weight"):
        jax.jvp(
            lambda w: fxj.sparse_cross_entropy(logits, labels, sample_weight=w).sum(), (jnp.ones(4),), (jnp.ones(4),)
        )
    # Weights held constant (stop_gradient) differentiate in the logits as usual.
    grad = jax.grad(lambda x, w: fxj.sparse_cross_entropy(x, labels, class_weight=jax.lax.stop_gradient(w)).sum())(
        logits, jnp.full(NUM_CLASSES, 2.0)
    )
    np.testing.assert_allclose(grad, 2.0 * jax.grad(lambda x: theirs_sum(x, labels))(logits), rtol=2e-5, atol=2e-6)


def theirs_sum(x, labels):
    return optax.softmax_cross_entropy_with_integer_labels(x, labels).sum()


def test_cpu_programs_call_the_kernel_directly(rng):
    """On CPU the kernel is an XLA custom call on XLA's own buffers, not a host callback."""
    logits = jnp.asarray(rng.standard_normal((4, 9)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 9, 4))
    program = jax.jit(jax.grad(lambda x: fxj.sparse_cross_entropy(x, labels).mean())).lower(logits).as_text()
    assert "fastxent_sparse_xent" in program and "callback" not in program


def test_backward_scales_the_kept_gradient_in_place(rng):
    """Reverse mode's grad * cotangent is fastxent's row scaling, aliased to the kept gradient on
    the CPU; exact for any cotangent (1, 0, random, NaN), and a vjp called twice finds its
    residual unchanged (XLA copies it when it is still live)."""
    logits = jnp.asarray(rng.standard_normal((6, NUM_CLASSES)) * 3, jnp.float32)
    labels = jnp.asarray(rng.integers(0, NUM_CLASSES, 6))
    program = (
        jax.jit(jax.grad(lambda x: fxj.sparse_cross_entropy(x, labels, reduction="mean")))
        .lower(logits)
        .compile()
        .as_text()
    )
    assert "fastxent_scale_kept_gradient" in program and "output_to_operand_aliasing" in program

    _, ours = jax.vjp(lambda x: fxj.sparse_cross_entropy(x, labels), logits)
    _, theirs = jax.vjp(lambda x: optax.softmax_cross_entropy_with_integer_labels(x, labels), logits)
    in_one_program = jax.jit(lambda x, c: jax.vjp(lambda z: fxj.sparse_cross_entropy(z, labels), x)[1](c)[0])
    cotangents = {
        "ones": jnp.ones(6, jnp.float32),
        "zeros": jnp.zeros(6, jnp.float32),
        "random": jnp.asarray(rng.uniform(-2, 2, 6), jnp.float32),
        "nan": jnp.asarray([1, np.nan, 1, 1, 1, 1], jnp.float32),
    }
    for name, cotangent in cotangents.items():
        first, second = ours(cotangent)[0], ours(cotangent)[0]
        np.testing.assert_array_equal(first, second, err_msg=name)
        np.testing.assert_array_equal(in_one_program(logits, cotangent), first, err_msg=name)
        np.testing.assert_allclose(first, theirs(cotangent)[0], rtol=2e-5, atol=2e-6, err_msg=name)
    assert np.isnan(np.asarray(first)[1]).all() and np.isfinite(np.asarray(first)[[0, 2]]).all()

    # One program that uses the kept gradient three times (a jvp's contraction and two pullbacks,
    # one of them by ones): XLA must copy before scaling in place, never scale what another reads.
    tangent = jnp.asarray(rng.standard_normal(logits.shape), jnp.float32)

    def three_uses(loss):
        def run(x):
            _, pullback = jax.vjp(lambda z: loss(z, labels), x)
            _, along = jax.jvp(lambda z: loss(z, labels), (x,), (tangent,))
            return along, pullback(jnp.full(6, 0.5, jnp.float32))[0], pullback(jnp.ones(6, jnp.float32))[0]

        return jax.jit(run)(logits)

    for mine, other in zip(
        three_uses(fxj.sparse_cross_entropy), three_uses(optax.softmax_cross_entropy_with_integer_labels), strict=True
    ):
        np.testing.assert_allclose(mine, other, rtol=2e-5, atol=2e-6)

    # A reduced loss: one factor for every row, 1.0 under jax.grad, 2.5 through a product.
    def mean_theirs(x):
        return optax.softmax_cross_entropy_with_integer_labels(x, labels).mean()

    for factor in (1.0, 2.5):
        grad = jax.jit(jax.grad(lambda x, f=factor: f * fxj.sparse_cross_entropy(x, labels, reduction="mean")))
        np.testing.assert_allclose(grad(logits), factor * jax.grad(mean_theirs)(logits), rtol=2e-5, atol=2e-7)


def test_kept_gradient_contraction_primitive(rng):
    """The tangent contraction's own derivatives (both arguments, both modes) and its batching,
    including the float64, non-trailing-axis and vmapped-cotangent paths."""
    from jax.test_util import check_grads

    from fastxent._jax_tangent import contract

    grad = jnp.asarray(rng.standard_normal((4, 7)), jnp.float32)
    tangent = jnp.asarray(rng.standard_normal((4, 7)), jnp.float32)
    for axes in ((1,), (0,), (0, 1)):
        np.testing.assert_allclose(contract(grad, tangent, axes), (grad * tangent).sum(axis=axes), rtol=1e-6)
    with enable_x64(True):
        grad64, tangent64 = (jnp.asarray(rng.standard_normal((4, 7))) for _ in range(2))
        for axes in ((1,), (0,), (0, 1)):
            check_grads(lambda g, t, a=axes: contract(g, t, a), (grad64, tangent64), order=1, modes=("fwd", "rev"))
    # vmap over cotangents (jacrev's way): the transpose runs on a batch of them.
    _, pullback = jax.vjp(lambda t: contract(grad, t, (1,)), tangent)
    cotangents = jnp.asarray(rng.standard_normal((3, 4)), jnp.float32)
    np.testing.assert_allclose(
        jax.vmap(pullback)(cotangents)[0], grad[None] * cotangents[:, :, None], rtol=1e-6, atol=1e-7
    )
    # vmap over the primitive itself, one argument mapped and one not.
    batch = jnp.asarray(rng.standard_normal((3, 4, 7)), jnp.float32)
    np.testing.assert_allclose(
        jax.vmap(lambda t: contract(grad, t, (1,)))(batch), (grad[None] * batch).sum(axis=2), rtol=1e-5, atol=1e-6
    )
    with pytest.raises(TypeError, match="contract"):
        contract(grad, tangent[:, :3], (1,))


EXPORT_PROBE = r"""
import re
import sys
import jax, jax.numpy as jnp, numpy as np, optax
import fastxent.jax as fxj

mode, path = sys.argv[1], sys.argv[2]
rng = np.random.default_rng(5)
logits = jnp.asarray(rng.standard_normal((6, 9)), jnp.float32)
labels = jnp.asarray(rng.integers(0, 9, 6))
hidden = jnp.asarray(rng.standard_normal((6, 4)), jnp.float32)
weight = jnp.asarray(rng.standard_normal((9, 4)), jnp.float32)

def sparse(x, reduction):
    return fxj.sparse_cross_entropy(x, labels, reduction=reduction)

programs = {
    "mean_grad": jax.value_and_grad(lambda x: sparse(x, "mean")),
    "none": lambda x: sparse(x, "none"),
    "linear_sum_grad": jax.value_and_grad(lambda w: fxj.linear_cross_entropy(hidden, w, labels, reduction="sum")),
}
inputs = {"mean_grad": logits, "none": logits, "linear_sum_grad": weight}
if mode == "export":
    from jax import export
    names = set()
    for name, program in programs.items():
        text = jax.jit(program).lower(inputs[name]).as_text()
        names |= set(re.findall(r"custom_call @(fastxent_\w+)", text))
    checks = [export.DisabledSafetyCheck.custom_call(n) for n in sorted(names)]
    blobs = {n: export.export(jax.jit(p), disabled_checks=checks)(inputs[n]).serialize() for n, p in programs.items()}
    np.savez(path, **{n: np.frombuffer(b, np.uint8) for n, b in blobs.items()})
    print(len(names))
else:
    from jax import export
    saved = np.load(path)
    # A configuration this process has not created is an error, never another computation.
    try:
        export.deserialize(bytearray(saved["none"].tobytes())).call(logits)
        raise AssertionError("an unregistered target ran")
    except Exception as error:
        assert "fastxent_sparse_xent_" in str(error), error
    # Other configurations first, then the programs' own in reverse: targets come into being in
    # another order than in the exporting process.
    for reduction in ("sum", "sum_over_batch_size", "none", "mean"):
        jax.block_until_ready(jax.value_and_grad(lambda x: sparse(x, reduction).sum())(logits))
    jax.block_until_ready(fxj.linear_cross_entropy(hidden, weight, labels, reduction="mean"))
    for name in reversed(programs):
        jax.block_until_ready(programs[name](inputs[name]))
    results = {n: export.deserialize(bytearray(saved[n].tobytes())).call(inputs[n]) for n in programs}
    optax_loss = optax.softmax_cross_entropy_with_integer_labels
    expected = {
        "mean_grad": jax.value_and_grad(lambda x: optax_loss(x, labels).mean())(logits),
        "none": optax_loss(logits, labels),
        "linear_sum_grad": jax.value_and_grad(lambda w: optax_loss(hidden @ w.T, labels).sum())(weight),
    }
    for name in programs:
        for ours, theirs in zip(jax.tree.leaves(results[name]), jax.tree.leaves(expected[name]), strict=True):
            np.testing.assert_allclose(ours, theirs, rtol=2e-5, atol=2e-6, err_msg=name)
    print("equal")
"""


def test_exported_program_calls_the_configuration_it_was_built_with(tmp_path):
    """Custom-call targets are named after their configuration: a program exported in one process
    and run in another, which created its targets in another order, computes the same numbers."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(fxj.__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    path = str(tmp_path / "programs.npz")
    for mode in ("export", "run"):
        done = subprocess.run(
            [sys.executable, "-c", EXPORT_PROBE, mode, path], capture_output=True, text=True, timeout=300, env=env
        )
        assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "equal"

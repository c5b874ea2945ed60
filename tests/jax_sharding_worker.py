"""Checks of fastxent.jax on 4 host devices, run in one process by test_jax_sharding.py (JAX
fixes its device count at start-up: XLA_FLAGS=--xla_force_host_platform_device_count=4).

Prints one JSON line: {check name: "ok" or the failure}. Each check compares a sharded program
(jit with NamedSharding inputs, or shard_map with axis_name=) against the same computation on
one device and, where optax has the option, against optax; checks the gradients' shardings;
and reads the compiled HLO for collectives larger than O(N).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import traceback

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import fastxent.jax as fxj  # noqa: E402

ROWS, CLASSES = 16, 64
TOL = dict(rtol=3e-5, atol=3e-6)
RESULTS = {}


def check(name):
    def run(function):
        try:
            function()
            RESULTS[name] = "ok"
        except Exception:  # reported to the test, which fails with it
            RESULTS[name] = traceback.format_exc(limit=6)[-3000:]
        return function

    return run


def collectives(hlo: str):
    """(kind, largest number of elements) of every collective in a compiled HLO module."""
    found = []
    pattern = (
        r"= (.*?) (all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter|collective-broadcast)(-start)?\("
    )
    for line in hlo.split("\n"):
        match = re.search(pattern, line)
        if match:
            sizes = [math.prod(int(d) for d in dims.split(",") if d) for dims in re.findall(r"\[([\d,]*)\]", match[1])]
            found.append((match[2], max(sizes, default=1)))
    return found


def assert_small_collectives(compiled, limit: int):
    found = collectives(compiled.as_text())
    big = [c for c in found if c[1] > limit]
    assert not big, f"collectives larger than {limit} numbers: {big}"
    return found


def assert_close(ours, theirs, what):
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), err_msg=what, **TOL)


rng = np.random.default_rng(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 2), ("b", "v"))
logits = jnp.asarray(rng.standard_normal((ROWS, CLASSES)) * 3, jnp.float32)
logits = logits.at[1, 5].set(-jnp.inf).at[2, 7].set(40.0)  # a -inf class and a large logit
labels_np = rng.integers(0, CLASSES, ROWS)
labels_np[[3, 9]] = -100
labels = jnp.asarray(labels_np)
clean_labels = jnp.asarray(np.where(labels_np < 0, 0, labels_np))
upstream = jnp.asarray(rng.uniform(0.5, 2.0, ROWS), jnp.float32)
class_weight = jnp.asarray(rng.uniform(0.5, 2.0, CLASSES), jnp.float32)
sample_weight = jnp.asarray(rng.uniform(0.0, 2.0, ROWS), jnp.float32)
row_mask = jnp.asarray(rng.random(ROWS) < 0.7)

# Option cases: fastxent's options (against one device) and optax's (against optax too).
EVERYTHING = dict(
    ignore_index=-100,
    label_smoothing=0.1,
    class_weight=class_weight,
    sample_weight=sample_weight,
    z_loss=1e-3,
    softcap=30.0,
)
CASES = {
    "plain": (clean_labels, {}),
    "where": (clean_labels, dict(where=row_mask)),
    "ignore_index": (labels, dict(ignore_index=-100)),
    "smoothing+class_weight": (clean_labels, dict(label_smoothing=0.2, class_weight=class_weight)),
    "everything": (labels, EVERYTHING),
}
REDUCTIONS = ("none", "sum", "mean", "sum_over_batch_size")


def losses(x, weights_spec=None):
    """Every case under every reduction, each with its gradient: one program per sharding."""
    out = {}
    for name, (y, options) in CASES.items():
        for reduction in REDUCTIONS if name in ("plain", "everything") else ("none", "mean"):

            def total(x, y=y, options=options, reduction=reduction):
                loss = fxj.sparse_cross_entropy(x, y, reduction=reduction, **options)
                return jnp.sum(loss * upstream) if reduction == "none" else loss

            out[f"{name}/{reduction}"] = jax.value_and_grad(total)(x)
    return out


def optax_losses(x):
    def total(x, options):
        return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(x, clean_labels, **options) * upstream)

    return {"plain": jax.value_and_grad(total)(x, {}), "where": jax.value_and_grad(total)(x, dict(where=row_mask))}


expected = jax.jit(losses)(logits)
expected_optax = jax.jit(optax_losses)(logits)
for case in ("plain", "where"):
    assert_close(expected[f"{case}/none"], expected_optax[case], f"one device against optax: {case}")

SHARDINGS = {
    "rows": P("b", None),
    "classes": P(None, "v"),
    "rows+classes": P("b", "v"),
    "classes-4": P(None, ("b", "v")),
}
for label, spec in SHARDINGS.items():

    @check(f"jit/{label}")
    def _(spec=spec, label=label):
        sharded = jax.device_put(logits, NamedSharding(mesh, spec))
        program = jax.jit(losses)
        results = program(sharded)
        for key, (value, grad) in results.items():
            assert_close((value, grad), expected[key], f"{label} {key}")
            assert grad.sharding.is_equivalent_to(sharded.sharding, 2), f"{key}: gradient {grad.sharding.spec}"
        for case in ("plain", "where"):
            assert_close(results[f"{case}/none"], expected_optax[case], f"{label} against optax: {case}")
        # Statistics are 4 numbers per row; nothing logits-sized moves.
        assert_small_collectives(program.lower(sharded).compile(), 4 * ROWS)


@check("jit/optax-gathers-nothing-either")
def _():
    # The HLO check itself can fail: optax's program under the same sharding, and a gather.
    sharded = jax.device_put(logits, NamedSharding(mesh, P(None, "v")))
    gathered = jax.jit(lambda x: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P())).sum())
    try:
        assert_small_collectives(gathered.lower(sharded).compile(), 4 * ROWS)
    except AssertionError:
        return
    raise AssertionError("a logits-sized all-gather was not seen")


@check("jit/bad-label-raises")
def _():
    sharded = jax.device_put(logits, NamedSharding(mesh, P("b", "v")))
    bad = clean_labels.at[11].set(CLASSES)
    try:
        jax.block_until_ready(jax.jit(lambda x: fxj.sparse_cross_entropy(x, bad, reduction="mean"))(sharded))
    except Exception as error:
        assert f"label {CLASSES} at position (11,)" in str(error), error
        return
    raise AssertionError("no error for a label out of range")


def shard_map_program(reduction, options, class_axes, spec):
    """The loss of this device's rows over the whole vocabulary, summed over the rows' axis."""
    weights = {k: v for k, v in options.items() if k in ("class_weight", "sample_weight")}
    rest = {k: v for k, v in options.items() if k not in weights}
    row_axis = "b" if spec[0] == "b" else None
    in_specs = (spec, P(row_axis), {k: P(spec[1]) if k == "class_weight" else P(row_axis) for k in weights})

    def body(x, y, w):
        loss = fxj.sparse_cross_entropy(x, y, reduction=reduction, axis_name=class_axes, **rest, **w)
        if reduction == "none":
            return loss
        return jax.lax.psum(loss, row_axis) if row_axis else loss

    out_specs = P(row_axis) if reduction == "none" else P()
    mapped = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs)
    return lambda x, y: mapped(x, y, weights)


for label, spec, class_axes in (("rows+classes", P("b", "v"), "v"), ("classes-4", P(None, ("b", "v")), ("b", "v"))):

    @check(f"shard_map/{label}")
    def _(spec=spec, class_axes=class_axes, label=label):
        for name in ("plain", "everything"):
            y, options = CASES[name]
            for reduction in ("none", "sum"):
                program = shard_map_program(reduction, options, class_axes, spec)

                def total(x, program=program, y=y, reduction=reduction):
                    loss = program(x, y)
                    return jnp.sum(loss * upstream) if reduction == "none" else loss

                compiled = jax.jit(jax.value_and_grad(total))
                assert_close(compiled(logits), expected[f"{name}/{reduction}"], f"{label} {name} {reduction}")
                assert_small_collectives(compiled.lower(logits).compile(), 4 * ROWS)


@check("shard_map/unreduced-output-raises-like-optax")
def _():
    # The loss of a device's rows varies over the rows' axis: out_specs=P() without a psum is
    # refused (check_vma), as for optax, instead of returning one device's loss.
    for function in (fxj.sparse_cross_entropy, optax.softmax_cross_entropy_with_integer_labels):
        mapped = jax.shard_map(
            lambda x, y, f=function: f(x, y).mean(), mesh=mesh, in_specs=(P("b"), P("b")), out_specs=P()
        )
        try:
            mapped(logits, clean_labels)
        except ValueError as error:
            assert "out_specs" in str(error), error
            continue
        raise AssertionError(f"{function.__module__}: no error for an unreduced output")


@check("shard_map/rows-gradient-check-vma")
def _():
    # Without axis_name, inside shard_map over rows, gradients work with check_vma=True.
    mapped = jax.shard_map(
        lambda x, y: fxj.sparse_cross_entropy(x, y), mesh=mesh, in_specs=(P("b"), P("b")), out_specs=P("b")
    )
    result = jax.jit(jax.value_and_grad(lambda x: jnp.sum(mapped(x, clean_labels) * upstream)))(logits)
    assert_close(result, expected["plain/none"], "shard_map rows")


HIDDEN = 8
hidden = jnp.asarray(rng.standard_normal((ROWS, HIDDEN)), jnp.float32)
weight = jnp.asarray(rng.standard_normal((CLASSES, HIDDEN)) * 0.5, jnp.float32)
bias = jnp.asarray(rng.standard_normal(CLASSES) * 0.5, jnp.float32)


def linear_losses(h, w, b):
    """linear_cross_entropy under every reduction, plain and with every option."""
    out = {}
    for name in ("plain", "everything"):
        y, options = CASES[name]
        for reduction in REDUCTIONS:

            def total(h, w, b, y=y, options=options, reduction=reduction):
                loss = fxj.linear_cross_entropy(h, w, y, bias=b, reduction=reduction, **options)
                return jnp.sum(loss * upstream) if reduction == "none" else loss

            out[f"{name}/{reduction}"] = jax.value_and_grad(total, argnums=(0, 1, 2))(h, w, b)
    return out


@check("jit/linear-rows")
def _():
    expected_linear = jax.jit(linear_losses)(hidden, weight, bias)
    optax_total = jax.value_and_grad(
        lambda h, w, b: optax.softmax_cross_entropy_with_integer_labels(h @ w.T + b, clean_labels).mean(),
        argnums=(0, 1, 2),
    )(hidden, weight, bias)
    assert_close(expected_linear["plain/mean"], optax_total, "one device against optax")
    row_mesh = jax.sharding.Mesh(np.array(jax.devices()), ("d",))
    sharded = jax.device_put(hidden, NamedSharding(row_mesh, P("d", None)))
    program = jax.jit(linear_losses)
    results = program(sharded, weight, bias)
    for key, (value, grads) in results.items():
        assert_close((value, grads), expected_linear[key], f"linear {key}")
        assert grads[0].sharding.is_equivalent_to(sharded.sharding, 2), f"{key}: d_hidden {grads[0].sharding.spec}"
    found = collectives(program.lower(sharded, weight, bias).compile().as_text())
    # Scalars, and the weight and bias gradients' reduction over the rows (the unfused
    # program's one large collective); the hidden states are not gathered.
    assert {kind for kind, _ in found} == {"all-reduce"}, found
    assert all(size <= 4 * ROWS or size in (CLASSES, CLASSES * HIDDEN) for _, size in found), found
    # A bad label on one device's rows raises on every device, none left in a collective.
    bad = clean_labels.at[11].set(CLASSES)
    try:
        jax.block_until_ready(jax.jit(lambda h: fxj.linear_cross_entropy(h, weight, bad))(sharded))
    except Exception as error:
        assert f"label {CLASSES} at position (11,)" in str(error), error
        return
    raise AssertionError("no error for a label out of range")


@check("jit/linear-vocabulary")
def _():
    # A tensor-parallel head: the weight (and bias, class weights) split over "v".
    expected_linear = jax.jit(linear_losses)(hidden, weight, bias)
    program = jax.jit(linear_losses)
    head = jax.device_put(weight, NamedSharding(mesh, P("v", None)))
    head_bias = jax.device_put(bias, NamedSharding(mesh, P("v")))
    for spec in (P(None, None), P("b", None)):
        sharded = jax.device_put(hidden, NamedSharding(mesh, spec))
        results = program(sharded, head, head_bias)
        for key, (value, grads) in results.items():
            assert_close((value, grads), expected_linear[key], f"linear {spec} {key}")
            assert grads[0].sharding.is_equivalent_to(sharded.sharding, 2), f"{key}: d_hidden {grads[0].sharding}"
            assert grads[1].sharding.is_equivalent_to(head.sharding, 2), f"{key}: d_weight {grads[1].sharding}"
        found = collectives(program.lower(sharded, head, head_bias).compile().as_text())
        # O(N) statistics, the hidden states' gradient over the vocabulary ranges (N x H), and
        # the weight gradient over the rows; neither logits nor the weight are gathered.
        assert {kind for kind, _ in found} == {"all-reduce"}, found
        limit = max(4 * ROWS, ROWS * HIDDEN, CLASSES // 2 * HIDDEN)
        assert all(size <= limit for _, size in found), found


@check("shard_map/linear-axis-name")
def _():
    # The head's vocabulary split over "v" inside shard_map, rows over "b".
    expected_linear = jax.jit(linear_losses)(hidden, weight, bias)
    for name in ("plain", "everything"):
        y, options = CASES[name]
        weights = {k: v for k, v in options.items() if k in ("class_weight", "sample_weight")}
        rest = {k: v for k, v in options.items() if k not in weights}
        specs = {k: P("v") if k == "class_weight" else P("b") for k in weights}
        for reduction in ("none", "sum"):

            def body(h, w, b, y, weights, reduction=reduction, rest=rest):
                loss = fxj.linear_cross_entropy(h, w, y, bias=b, reduction=reduction, axis_name="v", **rest, **weights)
                return loss if reduction == "none" else jax.lax.psum(loss, "b")

            mapped = jax.shard_map(
                body,
                mesh=mesh,
                in_specs=(P("b"), P("v"), P("v"), P("b"), specs),
                out_specs=P("b") if reduction == "none" else P(),
            )

            def total(h, w, b, mapped=mapped, y=y, weights=weights, reduction=reduction):
                loss = mapped(h, w, b, y, weights)
                return jnp.sum(loss * upstream) if reduction == "none" else loss

            result = jax.jit(jax.value_and_grad(total, argnums=(0, 1, 2)))(hidden, weight, bias)
            assert_close(result, expected_linear[f"{name}/{reduction}"], f"linear axis_name {name} {reduction}")


print(json.dumps(RESULTS))

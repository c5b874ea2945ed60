"""fastxent.jax.token_stats / linear_token_stats: values and custom-VJP gradients against the
float64 reference, under jit and vmap (JAX's default 32-bit mode)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_grad_close, assert_loss_close

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import fastxent.jax as fj  # noqa: E402
from fastxent import reference  # noqa: E402


def test_token_stats_values_and_gradient(rng):
    logits = (rng.standard_normal((5, 700)) * 2).astype(np.float32)
    logits[0, ::4] = -np.inf
    labels = rng.integers(0, 700, 5)
    labels[0], labels[2] = 1, -100
    a, b, c = rng.standard_normal((3, 5)).astype(np.float32)
    options = dict(temperature=0.7, softcap=4.0, ignore_index=-100)

    def loss(x):
        stats = fj.token_stats(x, labels, **options)
        return (a * stats.logprob).sum() + (b * stats.entropy).sum() + (c * stats.lse).sum()

    grad = jax.jit(jax.grad(loss))(jnp.asarray(logits))
    ref, ref_grad = reference.token_stats_with_grad(logits, labels, a, b, c, **options)
    assert_grad_close(np.asarray(grad), ref_grad, np.float32, scale=10.0)
    stats = jax.jit(lambda x: fj.token_stats(x, labels, **options))(jnp.asarray(logits))
    for value, expected in zip(stats[:3], ref[:3], strict=True):
        assert value.dtype == jnp.float32
        assert_loss_close(np.asarray(value), expected, np.float32)
    np.testing.assert_array_equal(np.asarray(stats.argmax), ref[3])
    # vmap over a batch axis: one call per element, the same numbers.
    batched = jax.vmap(lambda x, y: fj.token_stats(x, y).entropy)(
        jnp.asarray(logits)[None], jnp.asarray(labels.clip(0))[None]
    )
    np.testing.assert_allclose(
        np.asarray(batched[0]), np.asarray(fj.token_stats(logits, labels.clip(0)).entropy), rtol=1e-6
    )


def test_linear_token_stats_gradients(rng):
    hidden = rng.standard_normal((2, 3, 8)).astype(np.float32)
    weight = rng.standard_normal((90, 8)).astype(np.float32)
    bias = rng.standard_normal(90).astype(np.float32)
    labels = rng.integers(0, 90, (2, 3))
    labels[1, 1] = -100
    a, b = rng.standard_normal((2, 2, 3)).astype(np.float32)

    def loss(h, w, bb):
        stats = fj.linear_token_stats(h, w, labels, bias=bb, temperature=1.5, ignore_index=-100)
        return (a * stats.logprob).sum() + (b * stats.entropy).sum()

    grads = jax.grad(loss, argnums=(0, 1, 2))(hidden, weight, bias)
    logits = hidden.reshape(6, 8).astype(np.float64) @ weight.T.astype(np.float64) + bias
    _, ref = reference.token_stats_with_grad(
        logits, labels.reshape(-1), a.reshape(-1), b.reshape(-1), temperature=1.5, ignore_index=-100
    )
    expected = ((ref @ weight).reshape(hidden.shape), ref.T @ hidden.reshape(6, 8), ref.sum(axis=0))
    for got, want in zip(grads, expected, strict=True):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())

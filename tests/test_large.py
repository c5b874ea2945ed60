"""More than 2**31 logits in one array: every offset past 2**31 must be computed in 64 bits.

(16385, 131072) half-precision logits are 2**31 + 2**17 elements (4.3 GB): row 16384 starts
exactly at offset 2**31. Each test allocates one such array, fills it cheaply (a pool of random
rows repeated with a period that does not divide 16384, and a fresh last row, so a wrapped offset
reads different data), and checks a handful of rows, the last one included, against the float64
reference computed on those rows alone.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import BFLOAT16, assert_grad_close, assert_loss_close, force_kernel_path

import fastxent
from fastxent import reference

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROWS, CLASSES = 16385, 131072
assert ROWS * CLASSES > 2**31
POOL_ROWS = 1000  # 16384 % 1000 != 0: a row at offset 2**31 wrapped to 0 would hold other data


def fill_logits(rng, shape, dtype) -> np.ndarray:
    """Random logits without a float64 (or float32) temporary of the whole array."""
    logits = np.empty(shape, dtype=dtype)
    flat_rows = logits.reshape(-1, CLASSES)
    pool = (rng.standard_normal((POOL_ROWS, CLASSES), dtype=np.float32) * np.float32(3)).astype(dtype)
    for start in range(0, flat_rows.shape[0], POOL_ROWS):
        stop = min(start + POOL_ROWS, flat_rows.shape[0])
        flat_rows[start:stop] = pool[: stop - start]
    flat_rows[-1] = (rng.standard_normal(CLASSES, dtype=np.float32) * np.float32(3)).astype(dtype)
    return logits


def checked_rows(rng):
    return sorted({0, 1, 8191, ROWS - 2, ROWS - 1, int(rng.integers(ROWS))})


def test_row_path_beyond_2_31_elements(rng, monkeypatch):
    force_kernel_path(monkeypatch, "rows")
    dtype = BFLOAT16
    logits = fill_logits(rng, (ROWS, CLASSES), dtype)
    labels = rng.integers(0, CLASSES, size=ROWS)
    rows = checked_rows(rng)
    saved = logits[rows].copy()
    ref_loss, ref_grad = reference.sparse_cross_entropy_with_grad(saved, labels[rows], reduction="none")

    loss = fastxent.sparse_cross_entropy(logits, labels, reduction="none")
    assert loss.shape == (ROWS,) and loss.dtype == np.float32
    assert_loss_close(loss[rows], ref_loss, dtype)
    assert logits[rows].tobytes() == saved.tobytes()

    mean, grad = fastxent.sparse_cross_entropy_with_grad(logits, labels, reduction="mean", inplace=True)
    assert grad is logits
    np.testing.assert_allclose(mean, loss.astype(np.float64).mean(), rtol=1e-5)
    assert_grad_close(grad[rows], ref_grad / ROWS, dtype, scale=1.0 / ROWS)
    del logits, grad


def test_split_path_beyond_2_31_elements(rng, monkeypatch):
    """Five rows of 429,522,944 classes, cut into parts; the last row ends past offset 2**31."""
    force_kernel_path(monkeypatch, "split")
    dtype = BFLOAT16  # holds gradients of 1e-9 (float16 would flush them to 0)
    num_rows = 5
    num_classes = ROWS * CLASSES // num_rows
    assert num_rows * num_classes == ROWS * CLASSES and (num_rows - 1) * num_classes < 2**31
    logits = fill_logits(rng, (num_rows, num_classes), dtype)
    labels = rng.integers(0, num_classes, size=num_rows)
    last = logits[-1]
    label = int(labels[-1])

    # Float64 log-sum-exp of the last row, chunk by chunk (the row is 0.86 GB).
    row_max = -math.inf
    sum_exp = 0.0
    for start in range(0, num_classes, 1 << 24):
        chunk = last[start : start + (1 << 24)].astype(np.float64)
        chunk_max = float(chunk.max())
        if chunk_max > row_max:
            sum_exp *= math.exp(row_max - chunk_max)
            row_max = chunk_max
        sum_exp += float(np.exp(chunk - row_max).sum())
    lse = row_max + math.log(sum_exp)
    positions = np.array(sorted({0, 1, label, num_classes // 2, num_classes - 1, int(rng.integers(num_classes))}))
    values = last[positions].astype(np.float64)
    expected_grad = np.exp(values - lse) - (positions == label)

    target = float(last[label])

    # One in-place call gives the per-row losses and the gradient of their sum.
    loss, grad = fastxent.sparse_cross_entropy_with_grad(logits, labels, reduction="none", inplace=True)
    assert grad is logits
    assert loss.shape == (num_rows,) and loss.dtype == np.float32
    assert_loss_close(loss[-1], lse - target, dtype)
    assert_grad_close(grad[-1, positions], expected_grad, dtype, scale=1.0)
    del logits, grad, last

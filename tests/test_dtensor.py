"""fastxent.torch on DTensors and under FSDP2: two Gloo processes on the CPU, one launch.

``dtensor_worker.py`` runs every case on both ranks and records the results; the tests here
compare them with PyTorch's float64 loss on the full tensors (the reference) and with the eager
``fastxent.torch`` on the full tensors, and check the placements of the results and gradients
(the vocabulary-parallel gradient stays sharded: each rank holds its own classes only), the
errors (the eager message, with the label's global position, on every rank) and FSDP2 with
``fastxent.transformers.apply`` before and after ``fully_shard`` against the stock model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

HERE = Path(__file__).resolve().parent
LAUNCH_TIMEOUT_S = 600
SEED = 20261207
NUM_ROWS, NUM_CLASSES, HIDDEN = 9, 37, 8
LOCAL_CLASSES = (19, 18)  # DTensor's chunking of 37 classes over 2 ranks
LOCAL_ROWS = (5, 4)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dtensor")
    command = [sys.executable, str(HERE / "dtensor_worker.py"), "--seed", str(SEED), "--out", str(out)]
    env = dict(os.environ, NUMBA_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    try:
        done = subprocess.run(command, cwd=HERE, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired as expired:
        pytest.fail(f"the two ranks did not finish in {LAUNCH_TIMEOUT_S} s (a hang?):\n{expired.stderr}")
    if done.returncode != 0:
        pytest.fail(f"the worker exited with {done.returncode}:\n{done.stdout}\n{done.stderr[-6000:]}")
    return load(out)


def load(out: Path):
    arrays = [dict(np.load(out / f"rank{r}.npz")) for r in range(2)]
    messages = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    return arrays, messages


# (rtol, atol relative to the largest finite reference value) per dtype of the sharded call.
TOLERANCES = {"torch.float64": (1e-10, 1e-12), "torch.float32": (2e-5, 1e-6), "torch.bfloat16": (2e-2, 1e-2)}


def _close(got, want, dtype, what):
    rtol, atol = TOLERANCES[dtype]
    scale = float(np.nanmax(np.abs(np.where(np.isfinite(want), want, 0.0)), initial=0.0))
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol * max(scale, 1.0), equal_nan=True, err_msg=what)


def _keys(arrays, prefix, suffix):
    return sorted(k[: -len(suffix)] for k in arrays if k.startswith(prefix) and k.endswith(suffix))


# ----------------------------------------------------------------------------------------
# cross_entropy
# ----------------------------------------------------------------------------------------


def check_cross_entropy(arrays, messages):
    """Every case on every rank: the loss and the gathered gradient equal PyTorch's float64
    result and the eager adapter's on the full tensors; the placements are the layout's."""
    keys = _keys(arrays[0], "", "/eager_grad")
    cross = [k for k in keys if not k.startswith("linear/")]
    assert len(cross) == 21 * 3, cross
    for rank, (got, notes) in enumerate(zip(arrays, messages, strict=True)):
        for key in cross:
            loss_dtype, grad_dtype = notes[f"{key}/dtype"]
            assert loss_dtype == grad_dtype, (key, loss_dtype, grad_dtype)
            for field in ("loss", "grad"):
                _close(
                    got[f"{key}/{field}"], got[f"{key}/ref_{field}"], loss_dtype, f"rank {rank} {key} {field} vs ref"
                )
                _close(
                    got[f"{key}/{field}"],
                    got[f"{key}/eager_{field}"],
                    loss_dtype,
                    f"rank {rank} {key} {field} vs eager",
                )
            loss_placement, grad_placement = notes[f"{key}/placements"]
            reduction = key.rsplit("/", 1)[1]
            if key.startswith("batch/"):
                assert grad_placement == "Shard(dim=0)", (key, grad_placement)
                want = "Shard(dim=0)" if reduction == "none" else "Replicate()"
                assert loss_placement == want, (key, loss_placement)
                local_rows = got[f"{key}/local_grad_shape"][0]
                assert local_rows == (LOCAL_ROWS[rank] if "one-row" not in key else 1 - rank), (key, local_rows)
            elif key.startswith("vocab/"):
                assert loss_placement == "Replicate()", (key, loss_placement)
                class_dim = 0 if "unbatched" in key else 1
                assert grad_placement == f"Shard(dim={class_dim})", (key, grad_placement)
                # No rank holds the whole gradient: its own classes only, as its logits.
                shape = got[f"{key}/local_grad_shape"]
                assert shape[class_dim] == LOCAL_CLASSES[rank], (key, shape)
                assert np.array_equal(shape, got[f"{key}/local_input_shape"]), key
            else:
                assert (loss_placement, grad_placement) == ("Replicate()", "Replicate()"), key


def check_nan_mean(arrays):
    """A "mean" over nothing counted is PyTorch's NaN, as the eager adapter gives it."""
    for got in arrays:
        for layout in ("batch", "vocab"):
            assert np.isnan(got[f"{layout}/all-ignored/mean/loss"]), layout
            assert got[f"{layout}/all-ignored/sum/loss"] == 0.0, layout


def test_cross_entropy(ranks):
    arrays, messages = ranks
    check_cross_entropy(arrays, messages)
    check_nan_mean(arrays)


# ----------------------------------------------------------------------------------------
# linear_cross_entropy
# ----------------------------------------------------------------------------------------


def check_linear(arrays, messages):
    keys = _keys(arrays[0], "linear/", "/eager_loss")
    assert len(keys) == 6 * 3, keys
    for rank, (got, notes) in enumerate(zip(arrays, messages, strict=True)):
        for key in keys:
            dtype = "torch.float32" if "float32" in key else "torch.float64"
            _close(got[f"{key}/loss"], got[f"{key}/eager_loss"], dtype, f"rank {rank} {key} loss vs eager")
            for field in ("hidden", "weight", "bias"):
                name = f"rank {rank} {key} grad {field}"
                _close(got[f"{key}/grad_{field}"], got[f"{key}/eager_grad_{field}"], dtype, name + " vs eager")
                if f"{key}/ref_grad_{field}" in got:
                    _close(got[f"{key}/grad_{field}"], got[f"{key}/ref_grad_{field}"], dtype, name + " vs ref")
            if f"{key}/ref_loss" in got:
                _close(got[f"{key}/loss"], got[f"{key}/ref_loss"], dtype, f"rank {rank} {key} loss vs ref")
            loss_p, hidden_p, weight_p, bias_p = notes[f"{key}/placements"]
            rows = "/rows" in key or "float32" in key
            reduction = key.rsplit("/", 1)[1]
            assert (weight_p, bias_p) == ("Shard(dim=0)", "Shard(dim=0)"), key
            assert hidden_p == ("Shard(dim=0)" if rows else "Replicate()"), (key, hidden_p)
            assert loss_p == ("Shard(dim=0)" if rows and reduction == "none" else "Replicate()"), (key, loss_p)
            assert tuple(got[f"{key}/local_head_grad_shape"]) == (LOCAL_CLASSES[rank], HIDDEN), key
        assert np.isnan(got["linear/all-ignored/mean/loss"])


def test_linear_cross_entropy(ranks):
    arrays, messages = ranks
    check_linear(arrays, messages)


# ----------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------


def check_errors(arrays, messages):
    """Every rank raises (none hangs), naming the label and its global position, or the placement."""
    for got, notes in zip(arrays, messages, strict=True):
        eager = notes["eager/bad_label"]
        assert eager.startswith("TargetOutOfBoundsError: label 42 at position (7,)"), eager
        # Shard(0): the label is in rank 1's rows; both ranks raise the eager error, word for word.
        assert notes["batch/bad_label"] == eager
        assert notes["batch/bad_label_none"] == eager
        assert notes["vocab/bad_label"] == eager
        assert notes["linear/bad_label"] == notes["eager/linear_bad_label"]
        assert notes["eager/linear_bad_label"].startswith("TargetOutOfBoundsError: label 42 at position (7,)")
        expected = {
            "partial": ["InvalidInputError", "Partial"],
            "target_mismatch": ["InvalidInputError", "target is a DTensor with placements (Replicate(),)"],
            "plain_target_batch": ["InvalidInputError", "target is a plain tensor"],
            "plain_logits": ["InvalidInputError", "input is a plain tensor"],
            "uneven": ["InvalidInputError", "uneven"],
            "mesh_2d": ["InvalidInputError", "mesh of shape (2, 1)", "1-D device mesh"],
            "spatial_shard": ["InvalidInputError", "Shard(dim=2)"],
            "batch/shape": ["InvalidInputError", "labels shape (8,)", "(9,)"],
            "linear/plain_weight": ["InvalidInputError", "linear_weight is a plain tensor"],
            "linear/replicated_weight": [
                "InvalidInputError",
                "linear_weight is a DTensor with placements (Replicate(),)",
            ],
            "interop": ["TypeError", "DTensor"],
        }
        for case, fragments in expected.items():
            for fragment in fragments:
                assert fragment in notes[case], (case, notes[case])
        np.testing.assert_allclose(got["after_errors/loss"], got["after_errors/ref_loss"], rtol=1e-5)


def test_errors(ranks):
    arrays, messages = ranks
    check_errors(arrays, messages)


# ----------------------------------------------------------------------------------------
# FSDP2
# ----------------------------------------------------------------------------------------

FSDP_VARIANTS = ("stock-fsdp", "apply-before", "apply-after", "head-unit-before", "head-unit-after")


def check_fsdp(arrays, messages):
    """One training step: the loss and every gathered gradient (the head's included) equal the
    stock model's, with the fused loss taking the head (no logits) where the head is not its own
    FSDP2 unit, and the stock forward where it is."""
    for rank, (got, notes) in enumerate(zip(arrays, messages, strict=True)):
        names = sorted(k for k in got if k.startswith("fsdp/ref/grad/"))
        assert "fsdp/ref/grad/lm_head.weight" in names
        for variant in FSDP_VARIANTS:
            assert notes[f"fsdp/{variant}/error"] is None, (variant, notes[f"fsdp/{variant}/error"])
            fused = int(got[f"fsdp/{variant}/fused_calls"])
            # The head as its own unit: FSDP2 shards its weight again before the loss reads it, so
            # that call runs the stock forward (FallbackWarning), with stock's numbers.
            stock = variant == "stock-fsdp" or variant.startswith("head-unit")
            assert fused == (0 if stock else 1), (variant, fused)
            assert bool(got[f"fsdp/{variant}/logits_none"]) == (not stock), variant
            np.testing.assert_allclose(got[f"fsdp/{variant}/loss"], got["fsdp/ref/loss"], rtol=1e-5, err_msg=variant)
            for name in names:
                ref = got[name]
                mine = got[name.replace("fsdp/ref/", f"fsdp/{variant}/")]
                scale = float(np.max(np.abs(ref)))
                np.testing.assert_allclose(
                    mine, ref, rtol=1e-4, atol=1e-5 * scale, err_msg=f"rank {rank} {variant} {name}"
                )


def test_fsdp2_transformers(ranks):
    arrays, messages = ranks
    check_fsdp(arrays, messages)


def test_kernels_never_read_a_wrapper_tensor_as_plain():
    """In process, no group needed: a tensor whose storage is not its data (here a jagged nested
    tensor, a wrapper subclass like DTensor) is refused before any kernel reads its memory."""
    import torch

    from fastxent import _torch_interop as interop

    nested = torch.nested.nested_tensor([torch.randn(2, 5), torch.randn(3, 5)], layout=torch.jagged)
    for convert in (interop.to_array, interop.to_numpy, interop.host):
        with pytest.raises(TypeError, match="NestedTensor"):
            convert(nested)

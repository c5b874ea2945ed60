"""Vocabulary-parallel cross-entropy against the single-process core on the concatenated logits.

Two layers. In-process: R ranks as threads over a test double of the communicator
(``sharding.ThreadGroup``): every option, reduction, dtype, layout, edge value and error, fast.
Real processes: ``mpiexec -n 2`` and ``-n 3`` with mpi4py (uneven shards of V = 1000), and two
torch.distributed ranks over Gloo on 127.0.0.1 (``distributed_worker.py``); each launch has a
timeout, so a rank that hangs fails the test instead of the suite.

The targets: the loss within 1e-6 relative (float32), the gathered gradient within the core's
tolerances, two collectives per call (after the first for a layout), 12 bytes per row and rank
(16 with class weights, label smoothing or not).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import BFLOAT16, assert_grad_close
from sharding import (
    OPTION_CASES,
    SHARDINGS,
    bounds,
    case_inputs,
    linear_inputs,
    make_case,
    run_ranks,
    shard_kwargs,
)

import fastxent
from fastxent import distributed
from fastxent.distributed import _sharded

HERE = Path(__file__).resolve().parent
LAUNCH_TIMEOUT_S = 300
SEED = 20240611


def assert_sharded_loss(got, ref, dtype=np.float32, from_logits=True, rtol=None):
    """1e-6 relative for float32 compute (also probabilities, which are clipped in float32)."""
    got64, ref64 = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got64.shape == ref64.shape, (got64.shape, ref64.shape)
    if rtol is None:
        rtol = 1e-10 if np.dtype(dtype) == np.float64 and from_logits else 1e-6
    np.testing.assert_allclose(got64, ref64, rtol=rtol, atol=0.0, equal_nan=True)


def sharded(widths, logits, labels, *, with_grad=True, axis=-1, **kwargs):
    """Run the sharded call on len(widths) thread ranks; (losses, gradient slices) per rank."""
    starts = bounds(widths)
    logits = np.asarray(logits)
    moved = np.moveaxis(logits, axis, -1)

    def work(comm):
        lo, hi = starts[comm.rank], starts[comm.rank + 1]
        local = np.ascontiguousarray(np.moveaxis(moved[..., lo:hi], -1, axis))
        call = distributed.sparse_cross_entropy_with_grad if with_grad else distributed.sparse_cross_entropy
        return call(local, labels, vocab_start=lo, group=comm, axis=axis, **shard_kwargs(kwargs, lo, hi))

    results = run_ranks(len(widths), work)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


def check_against_core(widths, logits, labels, *, axis=-1, **kwargs):
    ref_loss, ref_grad = fastxent.sparse_cross_entropy_with_grad(logits, labels, axis=axis, **kwargs)
    results = sharded(widths, logits, labels, axis=axis, **kwargs)
    dtype = np.asarray(logits).dtype
    for loss, _ in results:
        assert np.asarray(loss).dtype == np.asarray(ref_loss).dtype
        assert np.array_equal(loss, results[0][0], equal_nan=True), "ranks disagree on the loss"
    assert_sharded_loss(results[0][0], ref_loss, dtype, kwargs.get("from_logits", True))
    grad = np.concatenate([g for _, g in results], axis=axis)
    assert grad.dtype == dtype
    assert_grad_close(grad, ref_grad, dtype)


# ----------------------------------------------------------------------------------------
# In process: every option, reduction, dtype and layout
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", sorted(SHARDINGS))
@pytest.mark.parametrize("reduction", fastxent.REDUCTIONS)
@pytest.mark.parametrize("case", OPTION_CASES)
def test_matches_single_process(rng, case, reduction, size):
    logits, labels, kwargs = make_case(rng, case, 16, 1000)
    check_against_core(SHARDINGS[size], logits, labels, reduction=reduction, **kwargs)


@pytest.mark.parametrize("dtype", [np.float64, np.float16, BFLOAT16], ids=["float64", "float16", "bfloat16"])
@pytest.mark.parametrize("case", ["plain", "everything"])
def test_dtypes(rng, case, dtype):
    logits, labels, kwargs = make_case(rng, case, 16, 1000, dtype)
    check_against_core(SHARDINGS[3], logits, labels, reduction="mean", **kwargs)


def test_long_rows_split_across_threads(rng):
    """Few rows of a 32k vocabulary: each rank's kernel cuts its slice into parts (split rows)."""
    logits, labels, kwargs = make_case(rng, "everything", 2, 32000)
    check_against_core((20000, 12000), logits, labels, reduction="sum", **kwargs)


def test_class_axis_and_lead_shape(rng):
    logits = rng.standard_normal((3, 1000, 4)).astype(np.float32)
    labels = rng.integers(0, 1000, size=(3, 4))
    check_against_core(SHARDINGS[3], logits, labels, axis=1, reduction="none", label_smoothing=0.1)


def test_zero_width_shard_and_zero_rows(rng):
    logits, labels, kwargs = make_case(rng, "everything", 8, 1000)
    check_against_core((500, 0, 500), logits, labels, **kwargs)
    empty = np.zeros((0, 1000), np.float32)
    for reduction in fastxent.REDUCTIONS:
        check_against_core((600, 400), empty, np.zeros(0, int), reduction=reduction)


def test_inplace(rng):
    logits = rng.standard_normal((6, 1000)).astype(np.float32)
    labels = rng.integers(0, 1000, 6)
    ref_loss, ref_grad = fastxent.sparse_cross_entropy_with_grad(logits, labels)
    starts = bounds((600, 400))

    def work(comm):
        lo, hi = starts[comm.rank], starts[comm.rank + 1]
        local = logits[:, lo:hi].copy() if comm.rank == 0 else logits[:, lo:hi]  # a view: copied inside
        loss, grad = distributed.sparse_cross_entropy_with_grad(local, labels, vocab_start=lo, group=comm, inplace=True)
        assert grad is local
        return loss, local

    results = run_ranks(2, work)
    assert_sharded_loss(results[0][0], ref_loss)
    assert_grad_close(np.concatenate([g for _, g in results], axis=1), ref_grad, np.float32)


@pytest.mark.parametrize("options", ("plain", "smoothing", "smoothing_and_class_weight"))
def test_edge_values(rng, options):
    """-inf classes, a target at -inf, a row of -inf in one shard only, +inf, NaN, and 1e30."""
    kwargs = {
        "plain": {},
        "smoothing": {"label_smoothing": 0.1},
        "smoothing_and_class_weight": {"label_smoothing": 0.1, "class_weight": rng.uniform(0.5, 2.0, 1000)},
    }[options]
    logits = rng.standard_normal((7, 1000)).astype(np.float32)
    labels = rng.integers(0, 1000, 7)
    labels[1] = 10
    logits[0, ::3] = -np.inf
    logits[1, 10] = -np.inf
    logits[2, :600] = -np.inf  # everything in rank 0's shard
    logits[3, 700] = np.inf
    logits[4, 5] = np.nan
    logits[5] *= 1e30
    logits[6, :] = -np.inf
    for reduction in ("none", "sum"):
        ref_loss, ref_grad = fastxent.sparse_cross_entropy_with_grad(logits, labels, reduction=reduction, **kwargs)
        results = sharded((600, 400), logits, labels, reduction=reduction, **kwargs)
        np.testing.assert_array_equal(np.isnan(results[0][0]), np.isnan(ref_loss))
        np.testing.assert_array_equal(np.isinf(results[0][0]), np.isinf(ref_loss))
        assert_sharded_loss(results[0][0], ref_loss)
        grad = np.concatenate([g for _, g in results], axis=1)
        np.testing.assert_array_equal(np.isnan(grad), np.isnan(ref_grad))
        finite = np.isfinite(ref_grad).all(axis=1)
        assert_grad_close(grad[finite], ref_grad[finite], np.float32)


# ----------------------------------------------------------------------------------------
# In process: errors reach every rank, communication stays within budget
# ----------------------------------------------------------------------------------------


def run_all(widths, call):
    """``call(comm, lo, hi)`` on thread ranks; the results or exceptions in rank order."""
    starts = bounds(widths)
    return run_ranks(len(widths), lambda comm: call(comm, starts[comm.rank], starts[comm.rank + 1]))


def assert_every_rank_raises(results, *fragments):
    for rank, result in enumerate(results):
        assert isinstance(result, ValueError), f"rank {rank} did not raise: {result!r}"
    for fragment in fragments:
        assert any(fragment in str(result) for result in results), (fragment, [str(r) for r in results])


def test_bad_label_raises_on_every_rank(rng):
    logits, labels, _ = make_case(rng, "plain", 9, 1000)
    labels[4] = 1000
    results = run_all(
        (400, 350, 250),
        lambda comm, lo, hi: distributed.sparse_cross_entropy(logits[:, lo:hi], labels, vocab_start=lo, group=comm),
    )
    assert_every_rank_raises(results, "label 1000 at position (4,)", "[0, 1000)")
    assert all("label 1000 at position (4,)" in str(r) for r in results)


def test_negative_probability_raises_on_every_rank(rng):
    probs, labels, _ = make_case(rng, "probabilities", 5, 1000)
    probs[3, 900] = -0.25  # in the last shard only
    results = run_all(
        (400, 350, 250),
        lambda comm, lo, hi: distributed.sparse_cross_entropy(
            probs[:, lo:hi], labels, vocab_start=lo, group=comm, from_logits=False
        ),
    )
    assert_every_rank_raises(results, "row (3,)", "-0.25", "looks like logits")


@pytest.mark.parametrize(
    "starts, fragment",
    [
        ((0, 401, 751), "classes [400, 401) belong to no rank: rank 1 starts at 401"),
        ((0, 400, 740), "rank 2 holds [740, 990), which overlaps rank 1's [400, 750)"),
        ((0, 400, -5), "rank 2 has a negative vocab_start=-5"),
        ((10, 410, 760), "classes [0, 10) belong to no rank: rank 0 starts at 10"),
    ],
)
def test_wrong_tiling_names_the_rank(rng, starts, fragment):
    logits, labels, _ = make_case(rng, "plain", 4, 1000)
    widths = (400, 350, 250)
    results = run_all(
        widths,
        lambda comm, lo, hi: distributed.sparse_cross_entropy(
            logits[:, lo:hi], labels, vocab_start=starts[comm.rank], group=comm
        ),
    )
    assert_every_rank_raises(results, fragment)


def test_mismatched_inputs_raise_on_every_rank(rng):
    logits, labels, _ = make_case(rng, "plain", 6, 1000)

    def different_labels(comm, lo, hi):
        mine = labels.copy()
        mine[0] = (mine[0] + comm.rank) % 1000
        return distributed.sparse_cross_entropy(logits[:, lo:hi], mine, vocab_start=lo, group=comm)

    assert_every_rank_raises(run_all((600, 400), different_labels), "different labels")

    def wrong_weights_on_rank_1(comm, lo, hi):
        weights = np.ones(hi - lo + (comm.rank == 1))
        return distributed.sparse_cross_entropy(
            logits[:, lo:hi], labels, vocab_start=lo, group=comm, class_weight=weights
        )

    results = run_all((400, 350, 250), wrong_weights_on_rank_1)
    assert_every_rank_raises(results, "rank 1 rejected its arguments", "class_weight must hold")

    def wrong_shape_on_rank_0(comm, lo, hi):
        local = logits[:, lo:hi] if comm.rank else logits[:-1, lo:hi]
        return distributed.sparse_cross_entropy(local, labels, vocab_start=lo, group=comm)

    assert_every_rank_raises(run_all((600, 400), wrong_shape_on_rank_0), "rank 0 rejected", "labels shape")


def test_layout_change_on_some_ranks_does_not_deadlock(rng):
    """The vocabulary grows by 100 classes on the last rank only: the other rank's cached layout
    is unchanged, yet every rank joins the new tiling check and uses the new total."""
    logits, labels, _ = make_case(rng, "plain", 8, 1100)
    exchange_results = []

    def work(comm):
        for widths in ((600, 400), (600, 500), (600, 400)):
            starts = bounds(widths)
            lo, hi = starts[comm.rank], starts[comm.rank + 1]
            # The labels stay in [0, 1000), so the shorter vocabulary accepts them too.
            exchange_results.append(
                (
                    widths,
                    comm.rank,
                    distributed.sparse_cross_entropy(
                        logits[:, lo:hi], labels % 1000, vocab_start=lo, group=comm, reduction="none"
                    ),
                )
            )
        return True

    assert run_ranks(2, work) == [True, True]
    for widths, _, loss in exchange_results:
        total = sum(widths)
        assert_sharded_loss(loss, fastxent.sparse_cross_entropy(logits[:, :total], labels % 1000, reduction="none"))


@pytest.mark.parametrize(
    "kwargs, per_row, per_call",
    [
        ({}, 12, 0),
        ({"label_smoothing": 0.1}, 12, 0),
        ({"class_weight": True, "reduction": "mean"}, 16, 0),
        ({"class_weight": True, "label_smoothing": 0.1, "z_loss": 1e-3}, 16, 4),  # + the shard's weight sum
        ({"from_logits": False}, 12, 0),
        ({"from_logits": False, "label_smoothing": 0.1, "class_weight": True}, 16, 4),
    ],
)
def test_two_collectives_and_bytes_per_row(rng, kwargs, per_row, per_call):
    case = "probabilities" if kwargs.get("from_logits") is False else "plain"
    logits, labels, case_kwargs = make_case(rng, case, 64, 1000)
    kwargs = dict(kwargs)
    if kwargs.pop("class_weight", False):
        kwargs["class_weight"] = rng.uniform(0.5, 2, 1000)
    starts = bounds((600, 400))

    def work(comm):
        lo, hi = starts[comm.rank], starts[comm.rank + 1]
        local_kwargs = shard_kwargs({**case_kwargs, **kwargs}, lo, hi)
        counts = []
        for _ in range(2):
            before = (comm.collectives, comm.bytes_sent)
            distributed.sparse_cross_entropy_with_grad(
                logits[:, lo:hi], labels, vocab_start=lo, group=comm, **local_kwargs
            )
            counts.append((comm.collectives - before[0], comm.bytes_sent - before[1]))
        return counts

    for first, steady in run_ranks(2, work):
        assert first[0] == 3  # the layout's one-time all-gather
        assert steady[0] == 2
        assert steady[1] == per_row * 64 + 4 * (_sharded.TAIL + _sharded.SUM_TAIL) + per_call


# ----------------------------------------------------------------------------------------
# In process: the PyTorch autograd Function (both kernels: Numba on CPU tensors, and the
# PyTorch-operations kernel that CUDA tensors use, here run on CPU tensors)
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", ["numba", "torch-ops"])
@pytest.mark.parametrize("case", ["plain", "everything", "probabilities+smoothing+weights"])
def test_torch_function(rng, monkeypatch, case, kernel):
    torch = pytest.importorskip("torch")
    import fastxent.torch as fastxent_torch
    from fastxent.distributed import _torch

    logits, labels, kwargs = make_case(rng, case, 10, 1000)
    upstream = rng.uniform(0.5, 2.0, 10)
    ref_loss, ref_grad = fastxent.sparse_cross_entropy_with_grad(logits, labels, reduction="none", **kwargs)
    starts = bounds((400, 350, 250))
    use = _torch.NumpyKernel() if kernel == "numba" else _torch.TorchKernel()
    monkeypatch.setattr(_torch, "kernel_for", lambda tensor, from_logits=True: use)

    def work(comm):
        lo, hi = starts[comm.rank], starts[comm.rank + 1]
        local = torch.tensor(logits[:, lo:hi], requires_grad=True)
        loss = fastxent_torch.vocab_parallel_cross_entropy(
            local, torch.from_numpy(labels), vocab_start=lo, group=comm, **shard_kwargs(kwargs, lo, hi)
        )
        (loss * torch.from_numpy(upstream).float()).sum().backward()
        return loss.detach().numpy(), local.grad.numpy()

    results = run_ranks(3, work)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    assert_sharded_loss(results[0][0], ref_loss)
    grad = np.concatenate([g for _, g in results], axis=1)
    assert_grad_close(grad, ref_grad * upstream[:, None], np.float32)


@pytest.mark.parametrize("kernel", ["numba", "torch-ops"])
def test_torch_function_bfloat16(rng, kernel):
    torch = pytest.importorskip("torch")
    from fastxent import _torch_interop as interop
    from fastxent.distributed import _sharded as sharded_module
    from fastxent.distributed import _torch

    logits, labels, kwargs = make_case(rng, "everything", 8, 1000, BFLOAT16)
    ref_loss, ref_grad = fastxent.sparse_cross_entropy_with_grad(logits, labels, reduction="sum", **kwargs)
    starts = bounds((600, 400))

    def work(comm):
        lo, hi = starts[comm.rank], starts[comm.rank + 1]
        local = interop.from_numpy(np.ascontiguousarray(logits[:, lo:hi])).clone().requires_grad_(True)
        local_kwargs = shard_kwargs(kwargs, lo, hi)
        settings = sharded_module.check_settings(
            True,
            "sum",
            local_kwargs["ignore_index"],
            local_kwargs["label_smoothing"],
            local_kwargs["z_loss"],
            local_kwargs["softcap"],
            lo,
        )
        use = _torch.NumpyKernel() if kernel == "numba" else _torch.TorchKernel()
        loss = _torch.VocabParallelCrossEntropy.apply(
            local,
            torch.from_numpy(labels),
            lo,
            comm,
            settings,
            local_kwargs["class_weight"],
            local_kwargs["sample_weight"],
            use,
        )
        loss.backward()
        return loss.detach().numpy(), interop.to_numpy(local.grad)

    results = run_ranks(2, work)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    assert_sharded_loss(results[0][0], ref_loss)
    assert_grad_close(np.concatenate([g for _, g in results], axis=1), ref_grad, BFLOAT16)


# ----------------------------------------------------------------------------------------
# Real processes: mpiexec (mpi4py + the mpich wheel) and torch.distributed over Gloo
# ----------------------------------------------------------------------------------------


def _mpiexec():
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else shutil.which("mpiexec")


def _launch(command, out_dir: Path):
    env = dict(os.environ, NUMBA_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    try:
        completed = subprocess.run(command, cwd=HERE, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired as expired:
        pytest.fail(
            f"{' '.join(command)} did not finish in {LAUNCH_TIMEOUT_S} s (a rank hung?):\n"
            f"{expired.stdout}\n{expired.stderr}"
        )
    if completed.returncode != 0:
        pytest.fail(f"{' '.join(command)} exited with {completed.returncode}:\n{completed.stdout}\n{completed.stderr}")
    ranks = sorted(out_dir.glob("rank*.npz"))
    arrays = [dict(np.load(path)) for path in ranks]
    messages = [json.loads(path.with_suffix(".json").read_text()) for path in ranks]
    return arrays, messages


@pytest.fixture(scope="module", params=[2, 3], ids=["mpiexec-n2", "mpiexec-n3"])
def mpi_run(request, tmp_path_factory):
    pytest.importorskip("mpi4py")
    mpiexec = _mpiexec()
    if mpiexec is None:
        pytest.skip("mpiexec not found (pip install mpich)")
    widths = SHARDINGS[request.param]
    out_dir = tmp_path_factory.mktemp(f"mpi{request.param}")
    command = [
        mpiexec,
        "-n",
        str(len(widths)),
        sys.executable,
        str(HERE / "distributed_worker.py"),
        "mpi",
        "--widths",
        ",".join(map(str, widths)),
        "--seed",
        str(SEED),
        "--out",
        str(out_dir),
    ]
    return widths, _launch(command, out_dir)


@pytest.fixture(scope="module")
def gloo_run(tmp_path_factory):
    pytest.importorskip("torch")
    widths = SHARDINGS[2]
    out_dir = tmp_path_factory.mktemp("gloo")
    command = [
        sys.executable,
        str(HERE / "distributed_worker.py"),
        "gloo",
        "--widths",
        ",".join(map(str, widths)),
        "--seed",
        str(SEED),
        "--out",
        str(out_dir),
    ]
    return widths, _launch(command, out_dir)


def _check_processes(widths, arrays, messages, variants):
    assert len(arrays) == len(widths), f"{len(arrays)} of {len(widths)} ranks wrote results"
    num_classes = sum(widths)
    for name, logits, labels, kwargs in case_inputs(SEED, num_classes):
        for reduction in fastxent.REDUCTIONS:
            ref_loss, ref_grad = fastxent.sparse_cross_entropy_with_grad(logits, labels, reduction=reduction, **kwargs)
            for variant in variants:
                key = f"{variant}/{name}/{reduction}"
                for rank_arrays in arrays:
                    assert_sharded_loss(rank_arrays[f"{key}/loss"], ref_loss)
                grad = np.concatenate([rank_arrays[f"{key}/grad"] for rank_arrays in arrays], axis=1)
                assert_grad_close(grad, ref_grad, np.float32)
    # Errors: every rank raised, with the value and position, or the rank at fault.
    last = len(widths) - 1
    for rank, rank_messages in enumerate(messages):
        assert f"label {num_classes + 3} at position (5,)" in rank_messages["bad_label"]
        if len(widths) == 1:
            continue
        assert "label -7 at position (5,)" in rank_messages["negative_label"]
        assert f"belong to no rank: rank 1 starts at {widths[0] + 1}" in rank_messages["gap"]
        assert f"rank {last} holds [{num_classes - widths[-1] - 10}," in rank_messages["overlap"]
        expected = "class_weight must hold" if rank == 0 else "rank 0 rejected its arguments"
        assert expected in rank_messages["one_rank_wrong"]
    # The linear + cross-entropy with sharded output rows, against the single process.
    for name, hidden, weight, bias, labels, kwargs in linear_inputs(SEED, num_classes):
        for reduction in ("mean", "none"):
            ref = fastxent.linear_cross_entropy_with_grad(
                hidden, weight, labels, bias=bias, reduction=reduction, **kwargs
            )
            key = f"linear/{name}/{reduction}"
            scale = float(np.max(np.abs(ref[2])))
            for rank_arrays in arrays:
                assert_sharded_loss(rank_arrays[f"{key}/loss"], ref[0], rtol=2e-5)
                np.testing.assert_allclose(rank_arrays[f"{key}/hidden"], ref[1], rtol=2e-5, atol=2e-5 * scale)
            for field, want in (("weight", ref[2]), ("bias", ref[3])):
                got = np.concatenate([rank_arrays[f"{key}/{field}"] for rank_arrays in arrays])
                np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * scale)
    for rank, rank_messages in enumerate(messages):
        if len(widths) > 1:
            expected = "weight_shard shape" if rank == 0 else "rank 0 rejected its arguments"
            assert expected in rank_messages["linear_one_rank_wrong"]
    # Rank 1 failed (out of memory) in the statistics pass and in a chunk's GEMM, and stayed
    # alive: every rank raised within seconds, the others naming rank 1; the group still works.
    if len(widths) > 1:
        for rank, (rank_arrays, rank_messages) in enumerate(zip(arrays, messages, strict=True)):
            for key in ("failure_stats", "failure_gemm"):
                if rank == 1:
                    assert rank_messages[key].startswith("MemoryError: "), rank_messages[key]
                else:
                    assert rank_messages[key].startswith("RuntimeError: "), rank_messages[key]
                    assert "rank 1 failed" in rank_messages[key] or "1 other rank(s) failed" in rank_messages[key]
                assert float(rank_arrays[f"{key}/seconds"]) < 10.0, (key, rank_arrays[f"{key}/seconds"])
            assert_sharded_loss(rank_arrays["after_failures/loss"], rank_arrays["after_failures/expected"])
    # Then a correct call: the right loss, with two collectives.
    for rank_arrays in arrays:
        assert_sharded_loss(rank_arrays["after_errors/loss"], rank_arrays["after_errors/expected"])
        collectives, sent = rank_arrays["after_errors/comm"]
        # A single rank's "gap" call is a valid shorter vocabulary, so its layout check comes again.
        regathered = len(widths) == 1 and collectives == 3
        assert collectives == 2 or regathered
        # 12 rows, 12 bytes per row, the per-call flags (and the all-gather's two int64).
        assert sent == 12 * 12 + 4 * (_sharded.TAIL + _sharded.SUM_TAIL) + 16 * regathered


def test_mpi_processes(mpi_run):
    widths, (arrays, messages) = mpi_run
    _check_processes(widths, arrays, messages, ["numpy"])
    for rank_arrays in arrays:
        collectives, sent = rank_arrays["numpy/plain/mean/comm"]
        assert collectives in (2, 3)  # 3 on the layout's first call


def test_gloo_processes(gloo_run):
    widths, (arrays, messages) = gloo_run
    _check_processes(widths, arrays, messages, ["numpy", "torch-fn", "torch-ops"])


@pytest.mark.gpu
@pytest.mark.parametrize(
    "engine, widths", [("nccl", (1000,)), ("gloo", SHARDINGS[2])], ids=["nccl-1-rank", "gloo-2-ranks-cuda-tensors"]
)
def test_cuda_tensors(tmp_path, engine, widths):
    """What one GPU allows: NCCL with a single rank (two NCCL ranks need two GPUs), and two Gloo
    ranks sharing one GPU with CUDA tensors (the device kernel with real collectives)."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        if os.environ.get("FASTXENT_REQUIRE_GPU") == "1":
            pytest.fail("FASTXENT_REQUIRE_GPU=1 but PyTorch sees no CUDA device")
        pytest.skip("no CUDA device visible to PyTorch")
    command = [
        sys.executable,
        str(HERE / "distributed_worker.py"),
        engine,
        "--device",
        "cuda",
        "--widths",
        ",".join(map(str, widths)),
        "--seed",
        str(SEED),
        "--out",
        str(tmp_path),
    ]
    arrays, messages = _launch(command, tmp_path)
    _check_processes(widths, arrays, messages, ["numpy", "torch-fn", "torch-ops"])


_GROUP_LIFETIME = """
import gc, os, weakref
import numpy as np
import torch.distributed as dist
from fastxent import distributed
from fastxent.distributed import _comm

os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"])
dist.init_process_group("gloo", rank=0, world_size=1)
group = dist.new_group([0])
adapter = _comm.communicator_for(group)
assert _comm.communicator_for(group) is adapter  # one adapter per live group
loss = distributed.sparse_cross_entropy(np.ones((2, 3), np.float32), np.array([0, 2]), vocab_start=0, group=group)
np.testing.assert_allclose(loss, np.log(3.0), rtol=1e-6)
# Gloo sums arrays in host memory where they lie (the GPU emulator's device arrays are such).
buffer = np.arange(5, dtype=np.float32)
sent = adapter.bytes_sent
assert adapter.allreduce_sum_on_device(buffer[1:])
assert np.array_equal(buffer, np.arange(5)) and adapter.bytes_sent == sent + 16
alive = weakref.ref(group)
dist.destroy_process_group()
del group
gc.collect()
assert alive() is None, "the adapter cache keeps a destroyed process group alive"
assert not _comm._ADAPTERS
try:
    adapter.allreduce_sum(np.zeros(1))
except RuntimeError as error:
    assert "no longer exists" in str(error)
else:
    raise AssertionError("a collective on a dead group did not raise")
print("OK")
"""


def test_a_destroyed_process_group_is_not_kept_alive():
    """The adapter cache holds torch groups weakly: a group outliving destroy_process_group()
    would be destroyed at interpreter exit, where Gloo can abort the process. (The same one-rank
    group also checks the in-place reduction of an array through DLPack.)"""
    pytest.importorskip("torch")
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    done = subprocess.run(
        [sys.executable, "-c", _GROUP_LIFETIME],
        env=dict(os.environ, PORT=str(port)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0 and "OK" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]

"""Calls from several Python threads, from a forked child, and from a second process with a warm cache."""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import BFLOAT16, random_labels, random_logits

import fastxent
from fastxent.cpu import xent as cpu_xent

ROW_SHAPE = (64, 1000)  # enough rows for the row-parallel path with any thread count up to 32
SPLIT_SHAPE = (1, 4 * cpu_xent.SPLIT_MIN_CLASSES)  # one long row: the split-row path


def problems(rng):
    """Inputs for both kernel paths, several dtypes and options, without patching the thresholds."""
    cases = []
    for shape, dtype, options in (
        (ROW_SHAPE, np.float32, {}),
        (ROW_SHAPE, np.float64, {"label_smoothing": 0.1}),
        (ROW_SHAPE, BFLOAT16, {"z_loss": 1e-3}),
        (SPLIT_SHAPE, np.float32, {}),
        (SPLIT_SHAPE, np.float16, {"softcap": 20.0}),
        (SPLIT_SHAPE, np.float64, {"label_smoothing": 0.1}),
    ):
        logits = random_logits(rng, shape, dtype)
        labels = random_labels(rng, shape[:1], shape[1])
        cases.append((logits, labels, options))
    return cases


def compute(logits, labels, options):
    """Loss alone, loss and gradient, and in place: everything a caller may run."""
    loss = fastxent.sparse_cross_entropy(logits, labels, reduction="none", **options)
    loss_g, grad = fastxent.sparse_cross_entropy_with_grad(logits, labels, reduction="mean", **options)
    work = logits.copy()
    loss_i, grad_i = fastxent.sparse_cross_entropy_with_grad(work, labels, reduction="sum", inplace=True, **options)
    return loss, loss_g, grad, loss_i, grad_i


def assert_identical(got, expected):
    for a, b in zip(got, expected, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes(), "result differs from the serial call"


def test_paths_are_the_intended_ones():
    assert not cpu_xent.use_split_rows(*ROW_SHAPE)
    assert cpu_xent.use_split_rows(*SPLIT_SHAPE)
    assert len(cpu_xent.part_bounds_for(*SPLIT_SHAPE)) - 1 >= 2


@pytest.mark.timeout(300)
def test_threads_give_the_serial_results(rng):
    cases = problems(rng)
    serial = [compute(*case) for case in cases]
    repeats = 4
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = [(index, pool.submit(compute, *cases[index])) for _ in range(repeats) for index in range(len(cases))]
        for index, future in futures:
            assert_identical(future.result(timeout=240), serial[index])


def _child_compute(logits, labels, options):
    return compute(logits, labels, options)


# Forking is the point of this test; Python warns about it when another test module has
# imported a multithreaded library (JAX) into the same session.
@pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning")
@pytest.mark.timeout(300)
def test_forked_child_after_parallel_kernels(rng):
    cases = problems(rng)
    # The parent has run the row-parallel and the split-row kernels (thread pools started)
    # before it forks.
    parent = [compute(*case) for case in cases]
    context = multiprocessing.get_context("fork")
    with context.Pool(1) as pool:
        results = [pool.apply_async(_child_compute, case) for case in cases]
        for result, expected in zip(results, parent, strict=True):
            assert_identical(result.get(timeout=240), expected)
    # And the parent still works after the fork.
    assert_identical(compute(*cases[0]), parent[0])


CACHE_PROBE = textwrap.dedent("""
    import json, sys
    import numpy as np
    import fastxent
    from numba.core.dispatcher import Dispatcher

    data = np.load(sys.argv[1])
    results = {}
    for name in ("row", "split"):
        loss, grad = fastxent.sparse_cross_entropy_with_grad(data[name + "_logits"], data[name + "_labels"],
                                                             reduction="sum")
        results[name] = [float(loss), float(np.abs(grad).sum())]
    compiled, hits, misses = [], 0, 0
    for module_name, module in list(sys.modules.items()):
        if not module_name.startswith("fastxent.") or module is None:
            continue
        for attribute, value in vars(module).items():
            if isinstance(value, Dispatcher) and value.signatures:
                stats = value.stats
                hits += sum(stats.cache_hits.values())
                misses += sum(stats.cache_misses.values())
                for signature in value.signatures:
                    if signature not in stats.cache_hits:
                        compiled.append(f"{module_name}.{attribute}{signature}")
    print(json.dumps({"results": results, "hits": hits, "misses": misses, "compiled": compiled}))
""")


@pytest.mark.timeout(600)
def test_second_process_loads_kernels_from_the_cache(rng, tmp_path):
    arrays = {}
    expected = {}
    for name, shape in (("row", ROW_SHAPE), ("split", SPLIT_SHAPE)):
        logits = random_logits(rng, shape, np.float32)
        labels = random_labels(rng, shape[:1], shape[1])
        arrays[name + "_logits"], arrays[name + "_labels"] = logits, labels
        # Compiles (and writes the cache) here if no earlier test has.
        loss, grad = fastxent.sparse_cross_entropy_with_grad(logits, labels, reduction="sum")
        expected[name] = [float(loss), float(np.abs(grad).sum())]
    np.savez(tmp_path / "inputs.npz", **arrays)

    completed = subprocess.run(
        [sys.executable, "-c", CACHE_PROBE, str(tmp_path / "inputs.npz")],
        capture_output=True,
        text=True,
        timeout=540,
        check=True,
    )
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    # The same numbers to float32 rounding, not bit for bit: Numba links a kernel's callees into
    # each cached library as weak copies, optimised in that library (fast-math), and a process
    # runs the copy it loaded first, so the last bits of a gradient can depend on which kernels a
    # process called before (docs/architecture.md, "Reproducibility").
    assert report["results"].keys() == expected.keys()
    for name, values in expected.items():
        np.testing.assert_allclose(report["results"][name], values, rtol=4 * np.finfo(np.float32).eps, err_msg=name)
    assert report["misses"] == 0
    assert report["hits"] >= 2  # at least one kernel per path
    assert report["compiled"] == [], "compiled instead of loaded from the cache"

"""Helpers for the vocabulary-parallel tests: shard layouts, inputs, and an in-process group.

``ThreadGroup`` runs R "ranks" as threads of this process, with collectives that behave like
MPI's (float32 reductions in a fixed order). It is a test double for fast, wide coverage of the
composition; the real engines (mpiexec with mpi4py, torch.distributed with Gloo) are exercised
in ``test_distributed.py`` with real processes.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, List, Sequence

import numpy as np

from fastxent.distributed._comm import Communicator

# V = 1000 split unevenly over 2 and 3 ranks (the example), and a zero-width shard.
SHARDINGS = {
    2: (600, 400),
    3: (400, 350, 250),
}

# Every option with a global meaning, each alone and a few together.
OPTION_CASES = {
    "plain": {},
    "ignore_index": {"ignore_index": -100},
    "label_smoothing": {"label_smoothing": 0.1},
    "class_weight": {"class_weight": True},
    "smoothing+class_weight": {"label_smoothing": 0.2, "class_weight": True},
    "sample_weight": {"sample_weight": True},
    "z_loss": {"z_loss": 1e-3},
    "softcap": {"softcap": 5.0},
    "probabilities": {"from_logits": False},
    "probabilities+smoothing+weights": {
        "from_logits": False,
        "label_smoothing": 0.1,
        "class_weight": True,
        "sample_weight": True,
    },
    "everything": {
        "ignore_index": -100,
        "label_smoothing": 0.1,
        "class_weight": True,
        "sample_weight": True,
        "z_loss": 1e-4,
        "softcap": 8.0,
    },
}


# Rows per case in the real-process tests: small, so the launches stay fast on two cores.
NUM_ROWS = 12


def bounds(widths: Sequence[int]) -> List[int]:
    """Shard starts and the end: [0, w0, w0 + w1, ..., V]."""
    return [int(v) for v in np.concatenate([[0], np.cumsum(widths)])]


def make_case(rng: np.random.Generator, name: str, num_rows: int, num_classes: int, dtype=np.float32):
    """Full (unsharded) inputs and core keyword arguments for one option case."""
    spec = dict(OPTION_CASES[name])
    from_logits = spec.get("from_logits", True)
    if from_logits:
        logits = (3.0 * rng.standard_normal((num_rows, num_classes))).astype(dtype)
    else:
        probs = rng.random((num_rows, num_classes)) ** 4
        probs[rng.random(probs.shape) < 0.1] = 0.0
        logits = (probs / probs.sum(axis=1, keepdims=True)).astype(dtype)
    labels = rng.integers(0, num_classes, size=num_rows)
    kwargs = {k: v for k, v in spec.items() if k not in ("class_weight", "sample_weight")}
    if "ignore_index" in spec:
        labels[rng.random(num_rows) < 0.3] = spec["ignore_index"]
    if spec.get("class_weight"):
        kwargs["class_weight"] = rng.uniform(0.5, 2.0, num_classes)
    if spec.get("sample_weight"):
        kwargs["sample_weight"] = rng.uniform(0.0, 3.0, num_rows)
    return logits, labels, kwargs


def case_inputs(seed: int, num_classes: int, num_rows: int = NUM_ROWS):
    """(name, logits, labels, kwargs) for every option case, from one seed: the workers and the
    test process draw the same inputs."""
    rng = np.random.default_rng(seed)
    for name in OPTION_CASES:
        yield (name,) + make_case(rng, name, num_rows, num_classes)


LINEAR_FEATURES = 8
LINEAR_CASES = ("plain", "everything")


def linear_inputs(seed: int, num_classes: int, num_rows: int = NUM_ROWS):
    """(name, hidden, weight, bias, labels, kwargs) for the linear + cross-entropy cases, from
    one seed: the workers and the test process draw the same inputs."""
    rng = np.random.default_rng(seed + 2)
    for name in LINEAR_CASES:
        _, labels, kwargs = make_case(rng, name, num_rows, num_classes)
        hidden = rng.standard_normal((num_rows, LINEAR_FEATURES)).astype(np.float32)
        weight = (0.6 * rng.standard_normal((num_classes, LINEAR_FEATURES))).astype(np.float32)
        bias = (0.5 * rng.standard_normal(num_classes)).astype(np.float32)
        yield name, hidden, weight, bias, labels, kwargs


def shard_kwargs(kwargs: dict, lo: int, hi: int) -> dict:
    """The kwargs a rank holding classes [lo, hi) passes (its slice of the class weights)."""
    local = dict(kwargs)
    if local.get("class_weight") is not None:
        local["class_weight"] = np.asarray(kwargs["class_weight"])[lo:hi]
    return local


class _Exchange:
    """Shared state of one ThreadGroup: contributions per collective, merged in rank order."""

    def __init__(self, size: int):
        self.size = size
        self.barrier = threading.Barrier(size, timeout=60)
        self.slots: list = [None] * size


class ThreadCommunicator(Communicator):
    def __init__(self, exchange: _Exchange, rank: int):
        super().__init__()
        self._exchange = exchange
        self.rank = rank
        self.size = exchange.size
        self.group = exchange

    def _collect(self, value) -> list:
        exchange = self._exchange
        exchange.slots[self.rank] = value
        exchange.barrier.wait()
        values = list(exchange.slots)
        exchange.barrier.wait()
        return values

    def _reduce(self, buffer: np.ndarray, combine: Callable) -> np.ndarray:
        self._count(buffer.nbytes)
        parts = self._collect(buffer.copy())
        result = parts[0].copy()
        for part in parts[1:]:
            result = combine(result, part).astype(buffer.dtype)
        buffer[...] = result
        return buffer

    def allreduce_max(self, buffer):
        # MPI's MAX is a C comparison: a NaN loses or wins depending on the order, never warns.
        return self._reduce(buffer, lambda a, b: np.where(b > a, b, a))

    def allreduce_sum(self, buffer):
        return self._reduce(buffer, np.add)

    def allgather_ints(self, values):
        mine = np.asarray(values, dtype=np.int64)
        self._count(mine.nbytes)
        return np.stack(self._collect(mine))


def run_ranks(size: int, work: Callable[[ThreadCommunicator], object]) -> list:
    """Run ``work(comm)`` on ``size`` threads, one per rank; results (or exceptions) in rank order."""
    exchange = _Exchange(size)

    def one(rank):
        try:
            return work(ThreadCommunicator(exchange, rank))
        except Exception as error:  # returned, so the test can check every rank raised
            if not isinstance(error, (ValueError, TypeError, threading.BrokenBarrierError)):
                # A failure outside the protocol (the documented errors are ValueError and
                # TypeError, raised by every rank together): release the others at once instead
                # of letting them wait for the barrier's timeout.
                exchange.barrier.abort()
            return error

    with ThreadPoolExecutor(max_workers=size) as pool:
        return list(pool.map(one, range(size)))

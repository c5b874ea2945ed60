"""``fastxent bench --op token_stats``: per-token statistics against fastxent's cross-entropy and
the PyTorch composition.

Every case (N x V float32 logits on the CPU) times, in interleaved rounds (one call of each
implementation per round), medians over the rounds:

* forward: ``fastxent.token_stats`` against ``fastxent.sparse_cross_entropy`` (per-row losses)
  and, where PyTorch is installed, its composition under ``no_grad`` (``log_softmax``, a gather,
  the softmax-weighted entropy and ``logsumexp``);
* forward+backward (of logprob and entropy together): ``fastxent.torch.token_stats`` against
  ``fastxent.torch.cross_entropy``, the core ``sparse_cross_entropy_with_grad`` into a reused
  buffer, and the PyTorch composition.

Each row gives its median and its ratio to fastxent's cross-entropy of the same mode. The extra
memory of ``fastxent.linear_token_stats`` at (N, ``LINEAR_FEATURES``, V) is measured once per
case as the peak of NumPy's allocations (``tracemalloc``) against the float32 logits' size.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
import tracemalloc
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

import fastxent

HEADLINE_SHAPES = ((2048, 128256),)
QUICK_SHAPES = ((256, 32000),)
LINEAR_FEATURES = 256
PEER_OF_MODE = {"forward": "fastxent sparse_cross_entropy", "forward+backward": "fastxent.torch cross_entropy"}


def interleaved(repeats: int, calls: Dict[str, Callable[[], object]]) -> Dict[str, float]:
    """Median seconds of each call, the calls alternating within every round (after a warm-up
    call each: compiles, pooled buffers faulted in)."""
    for call in calls.values():
        call()
    times: Dict[str, List[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            gc.collect()
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def torch_composition(logits, target):
    """logprob, entropy and lse from PyTorch's own ops (the peer)."""
    import torch

    log_p = torch.log_softmax(logits, dim=-1)
    logprob = log_p.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return logprob, entropy, torch.logsumexp(logits, dim=-1)


def forward_calls(logits: np.ndarray, labels: np.ndarray, torch) -> Dict[str, Callable[[], object]]:
    calls = {
        "fastxent token_stats": lambda: fastxent.token_stats(logits, labels),
        PEER_OF_MODE["forward"]: lambda: fastxent.sparse_cross_entropy(logits, labels, reduction="none"),
    }
    if torch is not None:
        x, y = torch.from_numpy(logits), torch.from_numpy(labels)

        def composition():
            with torch.no_grad():
                return torch_composition(x, y)

        calls["torch composition"] = composition
    return calls


def backward_calls(logits: np.ndarray, labels: np.ndarray, torch) -> Dict[str, Callable[[], object]]:
    import fastxent.torch as ft

    x, y = torch.from_numpy(logits), torch.from_numpy(labels)
    out = np.empty_like(logits)

    def leaf():
        return x.detach().requires_grad_(True)

    def ours():
        inputs = leaf()
        stats = ft.token_stats(inputs, y)
        (stats.logprob.sum() - 0.01 * stats.entropy.sum()).backward()
        return inputs.grad

    def cross_entropy():
        inputs = leaf()
        ft.cross_entropy(inputs, y).backward()
        return inputs.grad

    def composition():
        inputs = leaf()
        logprob, entropy, _ = torch_composition(inputs, y)
        (logprob.sum() - 0.01 * entropy.sum()).backward()
        return inputs.grad

    return {
        "fastxent.torch token_stats": ours,
        PEER_OF_MODE["forward+backward"]: cross_entropy,
        "fastxent sparse_cross_entropy_with_grad": lambda: fastxent.sparse_cross_entropy_with_grad(
            logits, labels, out=out
        ),
        "torch composition": composition,
    }


def linear_extra_bytes(num_rows: int, num_classes: int, seed: int = 0) -> Tuple[int, float]:
    """(peak extra bytes, seconds) of one ``linear_token_stats`` call at (N, LINEAR_FEATURES, V)."""
    rng = np.random.default_rng(seed)
    hidden = rng.standard_normal((num_rows, LINEAR_FEATURES), dtype=np.float32)
    weight = (rng.standard_normal((num_classes, LINEAR_FEATURES)) * 0.05).astype(np.float32)
    labels = rng.integers(0, num_classes, num_rows)
    fastxent.linear_token_stats(hidden[:16], weight, labels[:16])  # compile outside the measurement
    tracemalloc.start()
    try:
        start = time.perf_counter()
        fastxent.linear_token_stats(hidden, weight, labels)
        seconds = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak, seconds


def parse_shapes(text: Optional[str], quick: bool) -> Tuple[Tuple[int, int], ...]:
    if not text:
        return QUICK_SHAPES if quick else HEADLINE_SHAPES
    shapes = tuple(tuple(int(v) for v in item.split("x")) for item in text.split(","))
    if any(len(shape) != 2 for shape in shapes):
        raise ValueError(f"--op token_stats takes shapes as NxV; got {text!r}")
    return shapes  # type: ignore[return-value]


def markdown(rows: List[dict], threads: int, repeats: int) -> str:
    lines = [
        f"float32 on the CPU, {threads} threads, median of {repeats} interleaved rounds; "
        "x peer: the ratio to fastxent's cross-entropy of the same mode.",
        "",
        "| N x V | mode | implementation | median | x peer |",
        "|---|---|---|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['case']} | {row['mode']} | {row['name']} | {row['median_s'] * 1e3:.1f} ms | {row['x_peer']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    """Entry of ``fastxent bench --op token_stats`` (``--shapes`` as NxV,...)."""
    try:
        shapes = parse_shapes(args.shapes, args.quick)
    except ValueError as error:
        print(f"fastxent bench: {error}", file=sys.stderr)
        return 2
    if getattr(args, "device", "cpu") != "cpu":
        print("fastxent bench: --op token_stats measures the CPU only", file=sys.stderr)
        return 2
    threads = args.threads or os.cpu_count() or 1
    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:
        torch = None
    import numba

    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    repeats = args.repeats or (2 if args.quick else 5)
    modes = ("forward", "forward+backward") if args.modes == "both" else (args.modes,)
    rows: List[dict] = []
    notes: List[str] = []
    for num_rows, num_classes in shapes:
        rng = np.random.default_rng(args.seed)
        logits = rng.standard_normal((num_rows, num_classes), dtype=np.float32)
        labels = rng.integers(0, num_classes, num_rows)
        case = f"{num_rows}x{num_classes}"
        for mode in modes:
            if mode == "forward+backward" and torch is None:
                continue
            calls = forward_calls(logits, labels, torch) if mode == "forward" else backward_calls(logits, labels, torch)
            medians = interleaved(repeats, calls)
            peer = medians[PEER_OF_MODE[mode]]
            rows.extend(
                {"case": case, "mode": mode, "name": name, "median_s": seconds, "x_peer": seconds / peer}
                for name, seconds in medians.items()
            )
        if args.memory:
            peak, seconds = linear_extra_bytes(num_rows, num_classes, args.seed)
            logits_bytes = num_rows * num_classes * 4
            notes.append(
                f"linear_token_stats {num_rows}x{LINEAR_FEATURES}x{num_classes}: {seconds * 1e3:.0f} ms, peak extra "
                f"memory {peak / 2**20:.1f} MiB = {peak / logits_bytes:.4f} of the float32 logits"
            )
    text = markdown(rows, threads, repeats) + "".join(f"\n{note}\n" for note in notes)
    print(text)
    os.makedirs(args.output, exist_ok=True)
    path = os.path.join(args.output, "token-stats-cpu.md")
    with open(path, "w") as out:
        out.write("# fastxent.token_stats on the CPU\n\n" + text)
    print(f"wrote {path}")
    return 0

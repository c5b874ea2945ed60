"""Per-token statistics against their peers at one shape, interleaved, medians.

    PYTHONPATH=$PWD python benchmarks/token_stats_ab.py [--rows 2048] [--classes 128256] [--repeats 7]

Measures, float32 on the CPU, each pair alternating call by call:

1. ``fastxent.token_stats`` against ``fastxent.sparse_cross_entropy`` (forward, per-row losses);
2. ``fastxent.torch.token_stats`` forward + backward (of logprob and entropy together)
   against fastxent's cross-entropy forward + backward (``fastxent.torch.cross_entropy``, and
   the core ``sparse_cross_entropy_with_grad`` into a reused buffer) and against the PyTorch
   composition (log_softmax, gather, softmax-weighted entropy) on the same tensors;
3. the extra memory of ``fastxent.linear_token_stats`` at (rows, 256, classes), as the peak
   of NumPy's traced allocations during the call, against the float32 logits' size.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
import tracemalloc

import numpy as np
import torch

import fastxent
import fastxent.torch as ft


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(repeats: int, **fns) -> dict:
    """Median seconds of each function, the functions alternating within every repeat."""
    for fn in fns.values():  # warm-up: compile, fault in pooled buffers
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            gc.collect()
            times[name].append(timed(fn))
    return {name: statistics.median(values) for name, values in times.items()}


def torch_composition(x: torch.Tensor, y: torch.Tensor):
    log_p = torch.log_softmax(x, dim=-1)
    logprob = log_p.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return logprob, entropy


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--classes", type=int, default=128256)
    parser.add_argument("--features", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--skip-composition", action="store_true")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    n, v = args.rows, args.classes
    logits = rng.standard_normal((n, v), dtype=np.float32)
    labels = rng.integers(0, v, n)
    print(f"{n} x {v} float32, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")

    # 1. Forward.
    forward = interleaved(
        args.repeats,
        sparse_cross_entropy=lambda: fastxent.sparse_cross_entropy(logits, labels, reduction="none"),
        token_stats=lambda: fastxent.token_stats(logits, labels),
    )
    print_pair("forward", forward, "token_stats", "sparse_cross_entropy")

    # 2. Forward + backward.
    x = torch.from_numpy(logits)
    y = torch.from_numpy(labels)
    out = np.empty_like(logits)

    def stats_step():
        leaf = x.detach().requires_grad_(True)
        stats = ft.token_stats(leaf, y)
        (stats.logprob.sum() - 0.01 * stats.entropy.sum()).backward()
        return leaf.grad

    def torch_xent_step():
        leaf = x.detach().requires_grad_(True)
        ft.cross_entropy(leaf, y).backward()
        return leaf.grad

    def core_step():
        return fastxent.sparse_cross_entropy_with_grad(logits, labels, out=out)

    def composition_step():
        leaf = x.detach().requires_grad_(True)
        logprob, entropy = torch_composition(leaf, y)
        (logprob.sum() - 0.01 * entropy.sum()).backward()
        return leaf.grad

    steps = dict(token_stats=stats_step, torch_cross_entropy=torch_xent_step, core_with_grad=core_step)
    if not args.skip_composition:
        steps["torch_composition"] = composition_step
    both = interleaved(args.repeats, **steps)
    print_pair("fwd+bwd", both, "token_stats", "torch_cross_entropy")
    print_pair("fwd+bwd", both, "token_stats", "core_with_grad")
    if "torch_composition" in both:
        print_pair("fwd+bwd", both, "torch_composition", "token_stats")

    # 3. Extra memory of the fused linear form.
    hidden = rng.standard_normal((n, args.features), dtype=np.float32)
    weight = (rng.standard_normal((v, args.features)) * 0.05).astype(np.float32)
    fastxent.linear_token_stats(hidden[:16], weight, labels[:16])
    tracemalloc.start()
    start = time.perf_counter()
    fastxent.linear_token_stats(hidden, weight, labels)
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    logits_bytes = n * v * 4
    print(
        f"linear_token_stats {n}x{args.features}x{v}: {seconds * 1e3:.0f} ms, peak extra memory "
        f"{peak / 2**20:.1f} MiB = 1/{logits_bytes / peak:.0f} of the float32 logits ({logits_bytes / 2**20:.0f} MiB)"
    )


def print_pair(what: str, times: dict, name: str, peer: str) -> None:
    print(
        f"{what}: {name} {times[name] * 1e3:.1f} ms, {peer} {times[peer] * 1e3:.1f} ms, "
        f"ratio {times[name] / times[peer]:.2f}"
    )


if __name__ == "__main__":
    main()

"""One rank of the real-process vocabulary-parallel tests (launched by ``test_distributed.py``).

    mpiexec -n 3 python distributed_worker.py mpi --widths 400,350,250 --seed 7 --out DIR
    python distributed_worker.py gloo --widths 600,400 --seed 7 --out DIR   (spawns the ranks)
    python distributed_worker.py nccl --device cuda --widths 1000 --seed 7 --out DIR

Every rank regenerates the same inputs from the seed (``sharding.make_case``), runs every
option case and reduction on its slice, then the error cases, and writes what it got to
DIR/rank<r>.npz (losses, gradients, communication counts) and DIR/rank<r>.json (error messages).
The test process compares them with the single-process result; this script asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time

os.environ.setdefault("NUMBA_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from sharding import NUM_ROWS, bounds, case_inputs, linear_inputs, make_case, shard_kwargs  # noqa: E402

import fastxent  # noqa: E402
from fastxent import distributed  # noqa: E402


def _error_of(call) -> str:
    try:
        call()
    except Exception as error:  # every rank records what it raised
        return f"{type(error).__name__}: {error}"
    return "no error"


def run_rank(rank: int, group, widths, seed: int, out: str, with_torch: bool, device: str = "cpu") -> None:
    starts = bounds(widths)
    lo, hi, num_classes = starts[rank], starts[rank + 1], starts[-1]
    comm = distributed.communicator_for(group)
    arrays, messages = {}, {}
    torch_kernels = ()
    if with_torch:
        import torch

        from fastxent.distributed import _torch

        torch_kernels = (("torch-fn", _torch.NumpyKernel()), ("torch-ops", _torch.TorchKernel()))
        if device != "cpu":  # CUDA tensors: the kernel the Function picks (CUDA kernels), and torch ops
            torch_kernels = (("torch-fn", None), ("torch-ops", _torch.TorchKernel()))

    for name, logits, labels, kwargs in case_inputs(seed, num_classes):
        local_kwargs = shard_kwargs(kwargs, lo, hi)
        for reduction in fastxent.REDUCTIONS:
            before = (comm.collectives, comm.bytes_sent)
            loss, grad = distributed.sparse_cross_entropy_with_grad(
                logits[:, lo:hi], labels, vocab_start=lo, group=group, reduction=reduction, **local_kwargs
            )
            arrays[f"numpy/{name}/{reduction}/loss"] = loss
            arrays[f"numpy/{name}/{reduction}/grad"] = grad
            arrays[f"numpy/{name}/{reduction}/comm"] = np.array(
                [comm.collectives - before[0], comm.bytes_sent - before[1]]
            )
            for label, kernel in torch_kernels:
                local = torch.tensor(logits[:, lo:hi], device=device, requires_grad=True)
                settings = distributed._sharded.check_settings(
                    local_kwargs.get("from_logits", True),
                    reduction,
                    local_kwargs.get("ignore_index"),
                    local_kwargs.get("label_smoothing", 0.0),
                    local_kwargs.get("z_loss", 0.0),
                    local_kwargs.get("softcap"),
                    lo,
                )
                use = kernel if kernel is not None else _torch.kernel_for(local, settings.from_logits)
                value = _torch.VocabParallelCrossEntropy.apply(
                    local,
                    torch.from_numpy(labels).to(device),
                    lo,
                    group,
                    settings,
                    local_kwargs.get("class_weight"),
                    local_kwargs.get("sample_weight"),
                    use,
                )
                value.sum().backward()
                arrays[f"{label}/{name}/{reduction}/loss"] = value.detach().cpu().numpy()
                arrays[f"{label}/{name}/{reduction}/grad"] = local.grad.cpu().numpy()

    logits, labels, _ = make_case(np.random.default_rng(seed + 1), "plain", NUM_ROWS, num_classes)
    local = logits[:, lo:hi]
    bad = labels.copy()
    bad[5] = num_classes + 3
    messages["bad_label"] = _error_of(lambda: distributed.sparse_cross_entropy(local, bad, vocab_start=lo, group=group))
    bad[5] = -7
    messages["negative_label"] = _error_of(
        lambda: distributed.sparse_cross_entropy(local, bad, vocab_start=lo, group=group, ignore_index=-100)
    )
    # A gap: every rank after the first starts one class late.
    messages["gap"] = _error_of(
        lambda: distributed.sparse_cross_entropy(
            logits[:, lo : hi - (rank == len(widths) - 1)], labels, vocab_start=lo + (rank > 0), group=group
        )
    )
    # An overlap: the last rank starts ten classes early.
    last = rank == len(widths) - 1
    messages["overlap"] = _error_of(
        lambda: distributed.sparse_cross_entropy(
            logits[:, lo - 10 * last : hi], labels, vocab_start=lo - 10 * last, group=group
        )
    )
    # One rank gets its class weights wrong: every rank must raise, none may hang.
    weights = np.ones(hi - lo + (rank == 0))
    messages["one_rank_wrong"] = _error_of(
        lambda: distributed.sparse_cross_entropy(local, labels, vocab_start=lo, group=group, class_weight=weights)
    )
    # After all that, a correct call works and costs two collectives.
    before = (comm.collectives, comm.bytes_sent)
    arrays["after_errors/loss"] = distributed.sparse_cross_entropy(local, labels, vocab_start=lo, group=group)
    arrays["after_errors/comm"] = np.array([comm.collectives - before[0], comm.bytes_sent - before[1]])
    arrays["after_errors/expected"] = fastxent.sparse_cross_entropy(logits, labels)

    # The linear + cross-entropy with the output layer's rows sharded: chunks of 5 rows.
    for name, hidden, weight, bias, labels, kwargs in linear_inputs(seed, num_classes):
        local_kwargs = shard_kwargs(kwargs, lo, hi)
        for reduction in ("mean", "none"):
            results = distributed.linear_cross_entropy_with_grad(
                hidden, weight[lo:hi], labels, vocab_start=lo, group=group, bias=bias[lo:hi],
                reduction=reduction, block_rows=5, **local_kwargs,
            )  # fmt: skip
            for field, value in zip(("loss", "hidden", "weight", "bias"), results, strict=True):
                arrays[f"linear/{name}/{reduction}/{field}"] = value
    short = weight[lo:hi, :-1] if rank == 0 else weight[lo:hi]
    messages["linear_one_rank_wrong"] = _error_of(
        lambda: distributed.linear_cross_entropy(hidden, short, labels, vocab_start=lo, group=group)
    )

    # Rank 1's own work fails and it stays alive (as a training loop that caught the error would):
    # every rank must raise promptly, the others naming rank 1, and the group must stay usable.
    if len(widths) > 1:
        from fastxent.cpu.linear import NumpyLinearOps
        from fastxent.cpu.xent import NumpyKernel

        labels = np.random.default_rng(seed + 2).integers(0, num_classes, size=NUM_ROWS)
        calls = (
            ("failure_stats", NumpyKernel, "stats", lambda: distributed.sparse_cross_entropy(
                local, labels, vocab_start=lo, group=group)),
            ("failure_gemm", NumpyLinearOps, "hidden_grad", lambda: distributed.linear_cross_entropy_with_grad(
                hidden, weight[lo:hi], labels, vocab_start=lo, group=group, block_rows=5)),
        )  # fmt: skip
        for key, owner, name, call in calls:
            original = getattr(owner, name)
            if rank == 1:
                setattr(owner, name, _raising(name))
            began = time.monotonic()
            messages[key] = _error_of(call)
            arrays[f"{key}/seconds"] = np.array(time.monotonic() - began)
            setattr(owner, name, original)
        arrays["after_failures/loss"] = distributed.sparse_cross_entropy(local, labels, vocab_start=lo, group=group)
        arrays["after_failures/expected"] = fastxent.sparse_cross_entropy(logits, labels)

    np.savez(os.path.join(out, f"rank{rank}.npz"), **arrays)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as handle:
        json.dump(messages, handle)


def _raising(name: str):
    def fail(*args, **kwargs):
        raise MemoryError(f"{name} ran out of memory on rank 1")

    return fail


def _mpi_main(args) -> None:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    if comm.Get_size() != len(args.widths):
        raise SystemExit(f"launched with {comm.Get_size()} ranks for {len(args.widths)} shards")
    # group=None resolves to MPI.COMM_WORLD when torch.distributed is not initialised.
    run_rank(comm.Get_rank(), None, args.widths, args.seed, args.out, with_torch=False)


def _torch_rank(rank: int, port: int, args) -> None:
    import torch.distributed as dist

    backend = "nccl" if args.engine == "nccl" else "gloo"
    if args.device != "cpu":
        import torch

        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=len(args.widths))
    try:
        # group=None resolves to torch's default group once it is initialised.
        run_rank(rank, None, args.widths, args.seed, args.out, with_torch=True, device=args.device)
    finally:
        dist.destroy_process_group()


def _torch_main(args) -> None:
    import torch.multiprocessing as mp

    with socket.socket() as probe:  # a free loopback port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_torch_rank, args=(port, args), nprocs=len(args.widths))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("engine", choices=("mpi", "gloo", "nccl"))
    parser.add_argument("--device", default="cpu", help="torch engines: cpu or cuda tensors")
    parser.add_argument("--widths", type=lambda text: [int(w) for w in text.split(",")], required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    (_mpi_main if args.engine == "mpi" else _torch_main)(args)


if __name__ == "__main__":
    sys.exit(main())

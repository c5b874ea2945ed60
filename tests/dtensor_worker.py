"""Two Gloo ranks running fastxent.torch on DTensors and under FSDP2 (launched by ``test_dtensor.py``).

    python dtensor_worker.py --seed 7 --out DIR [--no-fsdp]

Every rank builds the same full tensors from the seed, distributes them over a 1-D CPU mesh of
both ranks, and records for each case: the DTensor call's loss and gathered gradients
(``full_tensor()``), their placements, PyTorch's float64 loss and gradients on the full tensors,
and the eager ``fastxent.torch`` result on the full tensors. Then the error cases (the message
each rank raised, and the eager message for the same full inputs), then FSDP2 with
``fastxent.transformers.apply`` on a tiny Llama against the stock model. Results go to
DIR/rank<r>.npz and DIR/rank<r>.json; the test process asserts, this script does not.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import signal
import socket
import sys

os.environ.setdefault("NUMBA_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor  # noqa: E402

import fastxent.torch as ft  # noqa: E402
from fastxent import _torch_interop as interop  # noqa: E402

NUM_ROWS = 9  # odd: DTensor's chunking gives the ranks 5 and 4 rows
NUM_CLASSES = 37  # odd: 19 and 18 classes
HIDDEN = 8


def _error_of(call) -> str:
    try:
        call()
    except Exception as error:  # every rank records what it raised
        return f"{type(error).__name__}: {error}"
    return "no error"


def _numpy(tensor) -> np.ndarray:
    if isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()
    return tensor.detach().to(torch.float64).numpy()


def _placements(tensor) -> str:
    return ",".join(repr(p) for p in tensor.placements) if isinstance(tensor, DTensor) else "plain"


class Recorder:
    def __init__(self):
        self.arrays, self.messages = {}, {}

    def put(self, key, value):
        self.arrays[key] = np.asarray(value)
        self._progress(key)

    def note(self, key, value):
        self.messages[key] = value
        self._progress(key)

    @staticmethod
    def _progress(key):
        if os.environ.get("FASTXENT_WORKER_TRACE"):
            print(f"rank {dist.get_rank()}: {key}", file=sys.stderr, flush=True)


def _inputs(gen, shape, num_classes, *, ignore=0, edge=False, probabilities=False):
    logits = torch.randn(shape, generator=gen, dtype=torch.float64) * 3
    lead = (shape[0], *shape[2:]) if len(shape) > 1 else ()
    if probabilities:
        target = torch.softmax(torch.randn(shape, generator=gen, dtype=torch.float64), dim=1 if len(shape) > 1 else 0)
    else:
        target = torch.randint(0, num_classes, lead, generator=gen)
        flat = target.reshape(-1)
        flat[:ignore] = -100  # the first rows (rank 0's) ignored
    if edge:
        flat_logits = logits.reshape(shape[0], num_classes, -1)
        flat_logits[1, 3] = -float("inf")  # a class with probability 0 (never the target here)
        flat_logits[2] *= 1e29  # huge magnitudes: exact only when the max goes first
        if not probabilities:
            t = target.reshape(shape[0], -1)
            t[1] = torch.where(t[1] == 3, torch.full_like(t[1], 4), t[1])
    return logits, target


def cross_entropy_cases(mesh, rec: Recorder, seed: int):
    gen = torch.Generator().manual_seed(seed)
    weight64 = torch.rand(NUM_CLASSES, generator=gen, dtype=torch.float64) + 0.5
    n, c = NUM_ROWS, NUM_CLASSES
    # (name, logits shape, logits placement, target placement, options, input kwargs)
    cases = [
        ("batch/plain", (n, c), Shard(0), Shard(0), {}, {}),
        (
            "batch/weights+ignore+smoothing",
            (n, c),
            Shard(0),
            Shard(0),
            {"weight": True, "label_smoothing": 0.1},
            {"ignore": 3},
        ),
        ("batch/edges", (n, c), Shard(0), Shard(0), {}, {"edge": True}),
        ("batch/spatial", (n, c, 3), Shard(0), Shard(0), {"weight": True}, {"ignore": 2}),
        ("batch/probabilities", (n, c), Shard(0), Shard(0), {"label_smoothing": 0.05}, {"probabilities": True}),
        ("batch/smoothing1", (n, c), Shard(0), Shard(0), {"label_smoothing": 1.0}, {}),
        ("batch/one-row", (1, c), Shard(0), Shard(0), {"weight": True}, {}),
        ("batch/all-ignored", (n, c), Shard(0), Shard(0), {}, {"ignore": n}),
        ("batch/float32", (n, c), Shard(0), Shard(0), {"dtype": torch.float32}, {"ignore": 1}),
        ("batch/bfloat16", (n, c), Shard(0), Shard(0), {"dtype": torch.bfloat16, "weight": True}, {"ignore": 1}),
        ("vocab/plain", (n, c), Shard(1), Replicate(), {}, {}),
        ("vocab/minus-one", (n, c), Shard(-1), Replicate(), {"label_smoothing": 0.1}, {"ignore": 2}),
        ("vocab/plain-target", (n, c), Shard(1), None, {"weight": True}, {}),
        (
            "vocab/sharded-weight",
            (n, c),
            Shard(1),
            Replicate(),
            {"weight": "sharded", "label_smoothing": 0.2},
            {"ignore": 4},
        ),
        ("vocab/edges", (n, c), Shard(1), Replicate(), {}, {"edge": True}),
        ("vocab/spatial", (n, c, 3), Shard(1), Replicate(), {"weight": True}, {"ignore": 2}),
        ("vocab/unbatched", (c,), Shard(0), Replicate(), {}, {}),
        ("vocab/all-ignored", (n, c), Shard(1), Replicate(), {}, {"ignore": n}),
        ("vocab/float32", (n, c), Shard(1), Replicate(), {"dtype": torch.float32}, {"ignore": 1}),
        ("vocab/bfloat16", (n, c), Shard(1), Replicate(), {"dtype": torch.bfloat16, "weight": True}, {"ignore": 1}),
        ("replicated", (n, c), Replicate(), Replicate(), {"weight": True}, {"ignore": 2}),
    ]
    for name, shape, placement, target_placement, options, input_kwargs in cases:
        options = dict(options)
        dtype = options.pop("dtype", torch.float64)
        weight_kind = options.pop("weight", None)
        logits64, target = _inputs(gen, shape, c, **input_kwargs)
        weight = None if weight_kind is None else weight64.to(dtype)
        logits = logits64.to(dtype)
        if target.is_floating_point():
            target = target.to(dtype)
        for reduction in ("none", "mean", "sum"):
            key = f"{name}/{reduction}"
            local = distribute_tensor(logits, mesh, [placement]).requires_grad_()
            dt_target = target if target_placement is None else distribute_tensor(target, mesh, [target_placement])
            dt_weight = weight
            if weight_kind == "sharded":
                dt_weight = distribute_tensor(weight, mesh, [Shard(0)])
            loss = ft.cross_entropy(local, dt_target, dt_weight, reduction=reduction, **options)
            upstream = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
            if isinstance(loss, DTensor):
                dt_upstream = distribute_tensor(upstream, mesh, loss.placements)
            else:
                dt_upstream = upstream
            loss.backward(dt_upstream)
            rec.put(f"{key}/loss", _numpy(loss))
            rec.put(f"{key}/grad", _numpy(local.grad))
            rec.note(f"{key}/placements", [_placements(loss), _placements(local.grad)])
            rec.put(f"{key}/local_grad_shape", np.array(local.grad.to_local().shape))
            rec.put(f"{key}/local_input_shape", np.array(local.to_local().shape))
            # PyTorch in float64 on the full tensors: the reference.
            # (The inputs as the sharded call got them: rounded to its dtype.)
            full = logits.detach().to(torch.float64).clone().requires_grad_()
            ref_target = target.to(torch.float64) if target.is_floating_point() else target
            ref_weight = None if weight is None else weight.to(torch.float64)
            ref = F.cross_entropy(full, ref_target, ref_weight, reduction=reduction, **options)
            ref.backward(upstream.to(torch.float64))
            rec.put(f"{key}/ref_loss", _numpy(ref))
            rec.put(f"{key}/ref_grad", _numpy(full.grad))
            # The eager adapter on the same full tensors.
            eager_in = logits.clone().requires_grad_()
            eager = ft.cross_entropy(eager_in, target, weight, reduction=reduction, **options)
            eager.backward(upstream)
            rec.put(f"{key}/eager_loss", _numpy(eager))
            rec.put(f"{key}/eager_grad", _numpy(eager_in.grad))
            rec.note(f"{key}/dtype", [str(loss.dtype), str(local.grad.dtype)])


def linear_cases(mesh, rec: Recorder, seed: int):
    gen = torch.Generator().manual_seed(seed + 1)
    n, v, h = NUM_ROWS, NUM_CLASSES, HIDDEN
    weight64 = torch.rand(v, generator=gen, dtype=torch.float64) + 0.5
    cases = [
        ("linear/replicated", Replicate(), Replicate(), {}, 0),
        ("linear/replicated-plain-target", Replicate(), None, {"weight": True, "label_smoothing": 0.1}, 2),
        ("linear/rows", Shard(0), Shard(0), {}, 0),
        ("linear/rows-options", Shard(0), Shard(0), {"weight": "sharded", "softcap": 4.0, "z_loss": 1e-3}, 3),
        ("linear/all-ignored", Replicate(), Replicate(), {}, n),
        ("linear/float32", Shard(0), Shard(0), {"dtype": torch.float32}, 1),
    ]
    for name, hidden_placement, target_placement, options, ignore in cases:
        options = dict(options)
        dtype = options.pop("dtype", torch.float64)
        weight_kind = options.pop("weight", None)
        hidden = torch.randn(n, h, generator=gen, dtype=torch.float64).to(dtype)
        head = (torch.randn(v, h, generator=gen, dtype=torch.float64) * 0.5).to(dtype)
        bias = (torch.randn(v, generator=gen, dtype=torch.float64) * 0.1).to(dtype)
        target = torch.randint(0, v, (n,), generator=gen)
        target[:ignore] = -100
        class_weight = None if weight_kind is None else weight64.to(dtype)
        for reduction in ("none", "mean", "sum"):
            key = f"{name}/{reduction}"
            d_hidden = distribute_tensor(hidden, mesh, [hidden_placement]).requires_grad_()
            d_head = distribute_tensor(head, mesh, [Shard(0)]).requires_grad_()
            d_bias = distribute_tensor(bias, mesh, [Shard(0)]).requires_grad_()
            d_target = target if target_placement is None else distribute_tensor(target, mesh, [target_placement])
            d_weight = class_weight
            if weight_kind == "sharded":
                d_weight = distribute_tensor(class_weight, mesh, [Shard(0)])
            loss = ft.linear_cross_entropy(
                d_hidden, d_head, d_target, linear_bias=d_bias, weight=d_weight, reduction=reduction, **options
            )
            upstream = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
            loss.backward(distribute_tensor(upstream, mesh, loss.placements))
            rec.put(f"{key}/loss", _numpy(loss))
            for field, tensor in (("hidden", d_hidden), ("weight", d_head), ("bias", d_bias)):
                rec.put(f"{key}/grad_{field}", _numpy(tensor.grad))
            rec.note(
                f"{key}/placements",
                [_placements(loss), _placements(d_hidden.grad), _placements(d_head.grad), _placements(d_bias.grad)],
            )
            rec.put(f"{key}/local_head_grad_shape", np.array(d_head.grad.to_local().shape))
            # The eager adapter on the full tensors, and PyTorch's composition in float64.
            tensors = [t.clone().requires_grad_() for t in (hidden, head, bias)]
            eager = ft.linear_cross_entropy(
                tensors[0],
                tensors[1],
                target,
                linear_bias=tensors[2],
                weight=class_weight,
                reduction=reduction,
                **options,
            )
            eager.backward(upstream)
            rec.put(f"{key}/eager_loss", _numpy(eager))
            for field, tensor in zip(("hidden", "weight", "bias"), tensors, strict=True):
                rec.put(f"{key}/eager_grad_{field}", _numpy(tensor.grad))
            if not options:
                full = [t.to(torch.float64).clone().requires_grad_() for t in (hidden, head, bias)]
                logits = F.linear(full[0], full[1], full[2])
                ref = F.cross_entropy(logits, target, None if class_weight is None else weight64, reduction=reduction)
                ref.backward(upstream.to(torch.float64))
                rec.put(f"{key}/ref_loss", _numpy(ref))
                for field, tensor in zip(("hidden", "weight", "bias"), full, strict=True):
                    rec.put(f"{key}/ref_grad_{field}", _numpy(tensor.grad))


def error_cases(mesh, rec: Recorder, seed: int):
    gen = torch.Generator().manual_seed(seed + 2)
    rank = dist.get_rank()
    n, c = NUM_ROWS, NUM_CLASSES
    logits = torch.randn(n, c, generator=gen)
    target = torch.randint(0, c, (n,), generator=gen)
    bad = target.clone()
    bad[7] = c + 5  # in rank 1's rows (rows 5..8)
    bad[8] = -3
    rec.note("eager/bad_label", _error_of(lambda: ft.cross_entropy(logits, bad)))
    shard0, shard1, rep = [Shard(0)], [Shard(1)], [Replicate()]
    rec.note(
        "batch/bad_label",
        _error_of(
            lambda: ft.cross_entropy(distribute_tensor(logits, mesh, shard0), distribute_tensor(bad, mesh, shard0))
        ),
    )
    rec.note(
        "batch/bad_label_none",
        _error_of(
            lambda: ft.cross_entropy(
                distribute_tensor(logits, mesh, shard0), distribute_tensor(bad, mesh, shard0), reduction="none"
            )
        ),
    )
    rec.note(
        "vocab/bad_label",
        _error_of(lambda: ft.cross_entropy(distribute_tensor(logits, mesh, shard1), distribute_tensor(bad, mesh, rep))),
    )
    head = torch.randn(c, HIDDEN, generator=gen)
    hidden = torch.randn(n, HIDDEN, generator=gen)
    rec.note("eager/linear_bad_label", _error_of(lambda: ft.linear_cross_entropy(hidden, head, bad)))
    rec.note(
        "linear/bad_label",
        _error_of(
            lambda: ft.linear_cross_entropy(
                distribute_tensor(hidden, mesh, rep),
                distribute_tensor(head, mesh, shard0),
                distribute_tensor(bad, mesh, rep),
            )
        ),
    )
    # Placements that are not supported: a clear error naming them, on every rank.
    partial = DTensor.from_local(logits / 2, mesh, [Partial()], run_check=False)
    rec.note("partial", _error_of(lambda: ft.cross_entropy(partial, distribute_tensor(target, mesh, rep))))
    rec.note(
        "target_mismatch",
        _error_of(
            lambda: ft.cross_entropy(distribute_tensor(logits, mesh, shard0), distribute_tensor(target, mesh, rep))
        ),
    )
    rec.note("plain_target_batch", _error_of(lambda: ft.cross_entropy(distribute_tensor(logits, mesh, shard0), target)))
    rec.note(
        "plain_logits",
        _error_of(lambda: ft.cross_entropy(logits, distribute_tensor(target, mesh, rep))),
    )
    # Uneven shards that are not DTensor's chunking: rank 0 holds 3 rows, rank 1 holds 6.
    rows = slice(0, 3) if rank == 0 else slice(3, 9)
    uneven = DTensor.from_local(logits[rows], mesh, shard0, run_check=False, shape=logits.shape, stride=logits.stride())
    uneven_t = DTensor.from_local(
        target[rows], mesh, shard0, run_check=False, shape=target.shape, stride=target.stride()
    )
    rec.note("uneven", _error_of(lambda: ft.cross_entropy(uneven, uneven_t)))
    mesh2 = init_device_mesh("cpu", (2, 1), mesh_dim_names=("dp", "tp"))
    rec.note(
        "mesh_2d",
        _error_of(
            lambda: ft.cross_entropy(
                distribute_tensor(logits, mesh2, [Shard(0), Replicate()]),
                distribute_tensor(target, mesh2, [Shard(0), Replicate()]),
            )
        ),
    )
    rec.note(
        "spatial_shard",
        _error_of(
            lambda: ft.cross_entropy(
                distribute_tensor(torch.randn(2, c, 4), mesh, [Shard(2)]),
                distribute_tensor(torch.zeros(2, 4, dtype=torch.long), mesh, [Shard(1)]),
            )
        ),
    )
    rec.note(
        "batch/shape",
        _error_of(
            lambda: ft.cross_entropy(
                distribute_tensor(logits, mesh, shard0), distribute_tensor(target[:-1], mesh, shard0)
            )
        ),
    )
    rec.note(
        "linear/plain_weight",
        _error_of(lambda: ft.linear_cross_entropy(distribute_tensor(hidden, mesh, rep), head, target)),
    )
    rec.note(
        "linear/replicated_weight",
        _error_of(
            lambda: ft.linear_cross_entropy(
                distribute_tensor(hidden, mesh, rep),
                distribute_tensor(head, mesh, rep),
                distribute_tensor(target, mesh, rep),
            )
        ),
    )
    # A DTensor never reaches the kernels as a plain tensor.
    rec.note("interop", _error_of(lambda: interop.to_array(distribute_tensor(logits, mesh, shard0))))
    # After the errors every rank is still in step: a correct call gives the right loss.
    after = ft.cross_entropy(distribute_tensor(logits, mesh, shard0), distribute_tensor(target, mesh, shard0))
    rec.put("after_errors/loss", _numpy(after))
    rec.put("after_errors/ref_loss", _numpy(F.cross_entropy(logits.double(), target)))


def run_rank(rank: int, args) -> None:
    mesh = init_device_mesh("cpu", (2,))
    rec = Recorder()
    sections = os.environ.get("FASTXENT_WORKER_SECTIONS", "cross,linear,errors").split(",")
    if "cross" in sections:
        cross_entropy_cases(mesh, rec, args.seed)
    if "linear" in sections:
        linear_cases(mesh, rec, args.seed)
    if "errors" in sections:
        error_cases(mesh, rec, args.seed)
    if args.fsdp:
        from fsdp_llama import fsdp_cases

        fsdp_cases(rec, args.seed)
    np.savez(os.path.join(args.out, f"rank{rank}.npz"), **rec.arrays)
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as handle:
        json.dump(rec.messages, handle)


def _rank_main(rank: int, port: int, args) -> None:
    # `kill -USR1 <pid>` prints where a rank is (a hang shows up as the test's timeout).
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        run_rank(rank, args)
    finally:
        dist.destroy_process_group()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--no-fsdp", dest="fsdp", action="store_false")
    args = parser.parse_args(argv)
    import torch.multiprocessing as mp

    with socket.socket() as probe:  # a free loopback port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_rank_main, args=(port, args), nprocs=2)


if __name__ == "__main__":
    sys.exit(main())

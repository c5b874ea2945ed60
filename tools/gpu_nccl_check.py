"""Single-rank NCCL, for tools/gpu_check.sh: the distributed paths' collectives on the device.

One process, a torch.distributed NCCL group of one rank, CUDA memory only:

* ``fastxent.distributed.linear_cross_entropy_with_grad`` on CuPy arrays: d_hidden is reduced
  where it lies (``allreduce_sum_on_device`` used, once), and the loss and every gradient equal
  the single-process ``fastxent.linear_cross_entropy_with_grad`` on the same arrays;
* ``fastxent.torch.vocab_parallel_cross_entropy`` on CUDA tensors (its statistics staged
  through NCCL) equals ``torch.nn.functional.cross_entropy``, forward and backward.

    python tools/gpu_nccl_check.py      # exit 0 when every check passes

Exit status: 0 all checks passed, 1 a check failed, 2 no CUDA device or no NCCL.
"""

from __future__ import annotations

import os
import socket
import sys

ROWS, HIDDEN, CLASSES = 512, 256, 32000


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main() -> int:
    import torch

    if not torch.cuda.is_available() or not torch.distributed.is_nccl_available():
        print("no CUDA device or no NCCL in this PyTorch")
        return 2
    import cupy
    import numpy as np
    import torch.distributed as dist
    import torch.nn.functional as F

    import fastxent
    import fastxent.torch as fxt
    from fastxent import distributed
    from fastxent.distributed import _comm

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1)
    failures = []
    try:
        rng = np.random.default_rng(0)
        hidden = cupy.asarray(rng.standard_normal((ROWS, HIDDEN), dtype=np.float32))
        weight = cupy.asarray(rng.standard_normal((CLASSES, HIDDEN), dtype=np.float32) / HIDDEN**0.5)
        labels = rng.integers(0, CLASSES, ROWS)
        on_device = []
        reduce_on_device = _comm.TorchCommunicator.allreduce_sum_on_device

        def counted(self, array):
            done = reduce_on_device(self, array)
            on_device.append(done)
            return done

        _comm.TorchCommunicator.allreduce_sum_on_device = counted
        got = distributed.linear_cross_entropy_with_grad(hidden, weight, labels, vocab_start=0)
        expected = fastxent.linear_cross_entropy_with_grad(hidden, weight, cupy.asarray(labels))
        cupy.cuda.get_current_stream().synchronize()
        if on_device != [True]:
            failures.append(f"d_hidden was not reduced on the device: {on_device}")
        for name, a, b in zip(("loss", "d_hidden", "d_weight"), got[:3], expected[:3], strict=True):
            error = float(cupy.max(cupy.abs(cupy.asarray(a) - cupy.asarray(b))) / cupy.max(cupy.abs(cupy.asarray(b))))
            print(f"linear {name}: relative error {error:.2e}")
            if not error < 1e-5:
                failures.append(f"linear {name}: relative error {error:.2e}")

        logits = torch.randn(ROWS, CLASSES, device="cuda", requires_grad=True)
        target = torch.from_numpy(labels).cuda()
        loss = fxt.vocab_parallel_cross_entropy(logits, target, vocab_start=0, reduction="mean")
        loss.backward()
        reference_logits = logits.detach().clone().requires_grad_()
        reference = F.cross_entropy(reference_logits, target)
        reference.backward()
        for name, a, b in (("loss", loss, reference), ("grad", logits.grad, reference_logits.grad)):
            error = float((a.detach() - b.detach()).abs().max() / b.detach().abs().max())
            print(f"vocab_parallel_cross_entropy {name}: relative error {error:.2e}")
            if not error < 1e-5:
                failures.append(f"vocab_parallel_cross_entropy {name}: relative error {error:.2e}")
    finally:
        dist.destroy_process_group()
    for failure in failures:
        print("FAILED:", failure)
    print("all NCCL checks passed" if not failures else f"{len(failures)} NCCL check(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""PyTorch autograd Function for vocabulary-parallel cross-entropy (Megatron-style, fused).

``vocab_parallel_cross_entropy(local_logits, target, vocab_start=...)`` takes this rank's slice
(..., V_local) of the logits and the global targets, and returns the loss over the whole
vocabulary. The forward pass does the two all-reductions of ``fastxent.distributed._sharded``;
the backward pass needs no communication: it sweeps this rank's slice once with the saved
per-row statistics (O(N) numbers), so no N x V_local softmax is kept between the passes.

Every kernel here implements the range layer's protocol (``fastxent._range.RangeKernel``), and
tensors reach the kernels through ``fastxent._torch_interop``. CPU tensors run the core Numba
kernels on a zero-copy NumPy view. CUDA tensors of logits run fastxent's CUDA kernels
(``fastxent.gpu.partial``) on a zero-copy CuPy view, on PyTorch's current stream
(``CudaKernel``; bfloat16 through its bits where CuPy has no bfloat16); without CuPy, and for
probabilities, the per-slice statistics and gradient are PyTorch operations on the device
(``TorchKernel``). Either way the per-row
epilogue runs on the host on O(N) numbers, and the collectives go through the process group
(NCCL stages them on the GPU).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from fastxent import _range
from fastxent import _torch_interop as interop
from fastxent._checks import Reduction
from fastxent._range import IGNORED, PROB_EPS, PROB_ONE_MINUS_EPS, RowStats
from fastxent.cpu.xent import NumpyKernel
from fastxent.distributed._comm import communicator_for
from fastxent.distributed._sharded import Shard, check_labels, check_settings, sharded_forward

# Rows per chunk of the device sweeps: bounds the float32/float64 temporaries to about this
# many elements whatever N is.
CHUNK_ELEMENTS = 1 << 24


def _compute(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class TorchKernel:
    """The range layer's kernel (``fastxent._range.RangeKernel``) with PyTorch operations, for
    tensors on any device.

    Follows the Numba kernels' arithmetic (float32 compute, float64 for float64 inputs; Keras'
    clip in the compute type for probabilities). The target values and the target's gradient
    are formed in float64 by the range layer on O(N) numbers, and the gradient at the target is
    rounded once, as on the CPU.
    """

    @staticmethod
    def _chunk(rows: torch.Tensor) -> int:
        return max(1, CHUNK_ELEMENTS // max(1, rows.shape[1]))

    @staticmethod
    def _values(x: torch.Tensor, options) -> torch.Tensor:
        if options.softcap is not None:
            return options.softcap * torch.tanh(x / options.softcap)
        return x

    def targets(self, rows: torch.Tensor, labels: np.ndarray, options):
        num_rows = rows.shape[0]
        target_value, target_input = np.zeros(num_rows), np.zeros(num_rows)
        owned = np.flatnonzero(labels >= 0)
        if owned.size:
            index = torch.from_numpy(owned).to(rows.device)
            raw = rows[index, torch.from_numpy(labels[owned]).to(rows.device)].to(_compute(rows.dtype))
            target_value[owned], target_input[owned] = _range.target_values(raw.cpu().numpy(), options)
        return target_value, target_input

    @staticmethod
    def _clip_bounds(compute: torch.dtype):
        """Keras' clip bounds rounded to the compute type, as the CPU kernels form them."""
        bounds = torch.tensor([PROB_EPS, PROB_ONE_MINUS_EPS], dtype=compute)
        return float(bounds[0]), float(bounds[1])

    def stats(self, rows: torch.Tensor, labels: np.ndarray, options) -> RowStats:
        num_rows, width = rows.shape
        if num_rows == 0 or width == 0:
            return _range.neutral_stats(num_rows)
        compute = _compute(rows.dtype)
        low, high = self._clip_bounds(compute)
        weights = None if options.class_weight is None else torch.from_numpy(options.class_weight).to(rows.device)
        smoothing = options.label_smoothing != 0.0
        parts = {"max": [], "sum": [], "weighted": [], "min": []}
        step = self._chunk(rows)
        for lo in range(0, num_rows, step):
            x = rows[lo : lo + step].to(compute)
            if options.from_logits:
                values = self._values(x, options)
                part_max = values.amax(dim=1)
                # While the max is -inf every value is -inf: sum relative to 0 (gives 0, not NaN).
                reference = torch.where(part_max > -torch.inf, part_max, torch.zeros_like(part_max))
                parts["max"].append(part_max)
                parts["sum"].append(torch.exp(values - reference[:, None]).sum(dim=1))
            else:
                clipped = x.clamp(low, high)
                values = torch.log(clipped)
                parts["max"].append(torch.zeros(x.shape[0], dtype=compute, device=rows.device))
                parts["sum"].append(clipped.sum(dim=1))
                parts["min"].append(x.amin(dim=1))
            if smoothing:
                wide = values.to(torch.float64)
                parts["weighted"].append((wide if weights is None else wide * weights).sum(dim=1))

        def gathered(name):
            return torch.cat(parts[name]).to(torch.float64).cpu().numpy()

        stats = _range.neutral_stats(num_rows)._asdict()
        stats["row_max"], stats["sum_exp"] = gathered("max"), gathered("sum")
        if smoothing:
            stats["weighted_sum"] = gathered("weighted")
        if not options.from_logits:
            stats["row_min"] = gathered("min")
        ignored = labels == IGNORED
        for name in ("row_max", "sum_exp", "weighted_sum", "row_min"):
            stats[name][ignored] = _range.neutral_stats(1)._asdict()[name][0]
        stats["target_value"], stats["target_input"] = self.targets(rows, labels, options)
        return RowStats(**stats)

    def grad(self, rows: torch.Tensor, labels: np.ndarray, stats, coefs, target_weight, options, *, inplace: bool):
        num_rows, width = rows.shape
        out = rows if inplace else torch.empty_like(rows)
        if num_rows == 0 or width == 0:
            return out
        device = rows.device
        compute = _compute(rows.dtype)
        low, high = self._clip_bounds(compute)

        def column(values):
            return torch.from_numpy(np.ascontiguousarray(values)).to(device=device, dtype=compute)[:, None]

        row_max, coef_p, coef_w = column(stats.row_max), column(coefs.coef_p), column(coefs.coef_w)
        counted = torch.from_numpy(labels != IGNORED).to(device)[:, None]
        weights = (
            None
            if options.class_weight is None
            else torch.from_numpy(options.class_weight).to(device=device, dtype=compute)
        )
        step = self._chunk(rows)
        for lo in range(0, num_rows, step):
            hi = min(lo + step, num_rows)
            x = rows[lo:hi].to(compute)
            weight_term = coef_w[lo:hi] if weights is None else coef_w[lo:hi] * weights
            if options.from_logits:
                values = self._values(x, options)
                reference = torch.where(row_max[lo:hi] > -torch.inf, row_max[lo:hi], torch.zeros_like(row_max[lo:hi]))
                grad = coef_p[lo:hi] * torch.exp(values - reference) - weight_term
                if options.softcap is not None:
                    grad = grad * (1.0 - (values / options.softcap) ** 2)
            else:
                clipped = x.clamp(low, high)
                inside = (x >= low) & (x <= high)
                grad = torch.where(inside, coef_p[lo:hi] - weight_term / clipped, torch.zeros_like(clipped))
            grad = torch.where(counted[lo:hi], grad, torch.zeros_like(grad))
            out[lo:hi] = grad.to(out.dtype)

        # The target's gradient, formed in float64 by the range layer and rounded once.
        owned = np.flatnonzero(labels >= 0)
        if owned.size:
            target = _range.target_grads(
                labels,
                stats,
                coefs,
                target_weight,
                options,
                compute=np.float64 if compute == torch.float64 else np.float32,
            )[owned]
            index = torch.from_numpy(owned).to(device)
            out[index, torch.from_numpy(labels[owned]).to(device)] = (
                torch.from_numpy(target).to(device=device, dtype=compute).to(out.dtype)
            )
        return out


class CudaKernel:
    """The range layer's kernel for tensors of logits: fastxent's CUDA kernels
    (``fastxent.gpu.partial``) on zero-copy CuPy views, launched on PyTorch's current stream of
    the tensor's device (``fastxent._torch_interop``)."""

    def __init__(self):
        import cupy  # noqa: F401  (ImportError here: the caller picks another kernel)

        from fastxent.gpu import partial

        self._partial = partial

    def targets(self, rows: torch.Tensor, labels: np.ndarray, options):
        return TorchKernel().targets(rows, labels, options)

    def stats(self, rows: torch.Tensor, labels: np.ndarray, options):
        view, storage = interop.to_cupy_storage(rows)
        with interop.on_stream(rows):
            return self._partial.range_stats(view, labels, options, storage=storage)

    def grad(self, rows: torch.Tensor, labels: np.ndarray, stats, coefs, target_weight, options, *, inplace: bool):
        out = rows if inplace else torch.empty_like(rows)
        view, storage = interop.to_cupy_storage(rows)
        out_view = None if inplace else interop.to_cupy_storage(out)[0]
        with interop.on_stream(rows):
            self._partial.range_grad(
                view, labels, stats, coefs, target_weight, options, inplace=inplace, out=out_view, storage=storage
            )
        return out


def kernel_for(tensor: torch.Tensor, from_logits: bool = True):
    """The core Numba kernels for CPU tensors; for device tensors, fastxent's CUDA kernels where
    CuPy is importable and the inputs are logits, else PyTorch operations."""
    if tensor.device.type == "cpu":
        return NumpyKernel()
    if from_logits and tensor.device.type == "cuda":
        try:
            return CudaKernel()
        except ImportError:
            pass
    return TorchKernel()


class VocabParallelCrossEntropy(torch.autograd.Function):
    """Forward: loss over the whole vocabulary (two collectives). Backward: this slice's gradient."""

    @staticmethod
    def forward(ctx, local_logits, target, vocab_start, group, settings, class_weight, sample_weight, kernel):
        labels = check_labels(interop.host(target))
        comm = communicator_for(group)
        lead_shape = tuple(labels.shape)
        rows, width, dtype, local_error = None, 0, np.float32, None
        try:
            if not local_logits.is_floating_point() or local_logits.dim() < 1:
                raise TypeError(
                    f"local_logits must be a floating tensor of rank >= 1; got {local_logits.dtype} "
                    f"of shape {tuple(local_logits.shape)}"
                )
            if tuple(local_logits.shape[:-1]) != lead_shape:
                raise ValueError(
                    f"target shape {lead_shape} must equal the local logits' shape without the "
                    f"class axis, {tuple(local_logits.shape[:-1])}"
                )
            width = int(local_logits.shape[-1])
            flat = local_logits.detach().reshape(-1, width).contiguous()
            rows = interop.to_numpy(flat) if isinstance(kernel, NumpyKernel) else flat
            dtype = np.float64 if local_logits.dtype == torch.float64 else np.float32
        except (TypeError, ValueError) as error:
            local_error = error
        shard = Shard(rows, vocab_start, width, dtype, interop.host(class_weight, np.float64), local_error)
        forward = sharded_forward(comm, kernel, shard, labels, settings, interop.host(sample_weight, np.float64))
        ctx.forward = forward
        ctx.shape = tuple(local_logits.shape)
        ctx.save_for_backward(local_logits)  # autograd then refuses a backward after in-place edits
        loss = torch.from_numpy(np.asarray(forward.loss)).to(local_logits.device)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        ctx.saved_tensors  # noqa: B018  (the version check on the saved logits)
        forward = ctx.forward
        upstream = grad_output.detach().to(torch.float64).cpu().numpy()
        grad_rows = forward.grad(upstream=upstream)
        grad = interop.from_numpy(grad_rows) if isinstance(grad_rows, np.ndarray) else grad_rows
        return grad.reshape(ctx.shape).to(grad_output.device), None, None, None, None, None, None, None


def vocab_parallel_cross_entropy(
    local_logits: torch.Tensor,
    target: torch.Tensor,
    *,
    vocab_start: int,
    group: Any = None,
    reduction: Reduction = "none",
    from_logits: bool = True,
    ignore_index: Optional[int] = None,
    label_smoothing: float = 0.0,
    class_weight: Any = None,
    sample_weight: Any = None,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
) -> torch.Tensor:
    """Cross-entropy of logits whose class axis (the last) is sharded across ``group``'s ranks.

    Megatron-LM's ``vocab_parallel_cross_entropy`` with fastxent's kernels and options: by
    default the per-token loss (``reduction="none"``), the other reductions as in
    ``fastxent.sparse_cross_entropy`` with global denominators. Differentiable w.r.t.
    ``local_logits``; the gradient of this rank's slice needs no further communication.

    Args:
        local_logits: (..., V_local) this rank's classes [vocab_start, vocab_start + V_local).
            CPU tensors use the Numba kernels; CUDA tensors fastxent's CUDA kernels through
            CuPy (PyTorch operations without CuPy, and for probabilities).
        target: (...) integer global class ids, identical on every rank.
        vocab_start: this shard's first global class (shards may differ in size).
        group: a torch.distributed process group (Gloo for CPU tensors, NCCL for CUDA
            tensors), an mpi4py communicator, or None (the default group).
        class_weight: this shard's (V_local,) class weights. sample_weight: per-token weights,
            identical on every rank. The other options are those of the core API.

    Returns:
        The loss tensor (float32; float64 for float64 logits) on the logits' device, identical
        on every rank.
    """
    settings = check_settings(from_logits, reduction, ignore_index, label_smoothing, z_loss, softcap, vocab_start)
    return VocabParallelCrossEntropy.apply(
        local_logits,
        target,
        int(vocab_start),
        group,
        settings,
        class_weight,
        sample_weight,
        kernel_for(local_logits, settings.from_logits),
    )

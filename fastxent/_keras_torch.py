"""fastxent.keras on Keras' PyTorch backend: the per-row losses from logits and the fused linear loss.

``fastxent.keras`` calls these when ``keras.backend.backend()`` is "torch". Sparse labels and
dense targets go to ``fastxent.torch.cross_entropy`` (``reduction="none"``), the linear layer to
``fastxent.torch.linear_cross_entropy``; the classes are moved to the last axis and the rows
flattened, so that the kernel reads the rows where they are (a class axis other than the last
costs one copy).

Keras' PyTorch backend is reproduced: labels are cast to int64 (truncated), a label axis of 1
at ``axis`` is squeezed, the labels must have ``y_pred``'s shape without ``axis``, and a label
-100 gives loss 0 (``F.cross_entropy``'s and ``F.nll_loss``' default ``ignore_index``, which
Keras leaves in place).
"""

from __future__ import annotations

import numpy as np
import torch

import fastxent.torch as fastxent_torch

__all__ = ["NAME", "SKIPPED_LABEL", "dense_logits_per_row", "labels_like_keras", "linear_loss", "sparse_logits_per_row"]

NAME = "torch"
SKIPPED_LABEL = -100
# ``model.compile(jit_compile=True)`` runs Keras' step under ``torch.compile``. fastxent.torch's
# autograd functions hand the tensors' memory to the kernels, which Dynamo cannot trace (fake
# tensors have none): Dynamo runs these two calls as they are, between the graphs it compiles
# around them, and autograd joins the pieces (the same gradients, with a graph break each).
_cross_entropy = torch.compiler.disable(fastxent_torch.cross_entropy)
_linear_cross_entropy = torch.compiler.disable(fastxent_torch.linear_cross_entropy)
# The ignore_index handed to fastxent.torch's linear loss when the layer ignores no label.
_NO_LABEL = int(np.iinfo(np.int64).min)


def labels_like_keras(y_true, y_pred, axis):
    """The int64 labels and the shape checks of Keras' PyTorch ``sparse_categorical_crossentropy``."""
    target = torch.as_tensor(y_true).to(torch.long)
    output = torch.as_tensor(y_pred)
    if len(target.shape) == len(output.shape) and target.shape[axis] == 1:
        target = torch.squeeze(target, dim=axis)
    if len(output.shape) < 1:
        raise ValueError(f"Argument `output` must be at least rank 1. Received: output.shape={output.shape}")
    without_classes = list(output.shape)
    del without_classes[axis]
    if list(target.shape) != without_classes:
        raise ValueError(
            "Arguments `target` and `output` must have the same shape up until the last dimension: "
            f"target.shape={target.shape}, output.shape={output.shape}"
        )
    return target


def _rows(tensor, class_axis):
    """``tensor`` as (rows, C) with the classes last (a view when they are last already)."""
    return torch.movedim(tensor, class_axis, -1).reshape(-1, tensor.shape[class_axis])


def sparse_logits_per_row(logits, labels, class_axis, valid):
    """Per-row cross-entropy of ``logits`` (classes on ``class_axis``) in their dtype; rows where
    ``valid`` is False, and labels -100, give 0 and no gradient."""
    if valid is not None:
        labels = torch.where(valid, labels, SKIPPED_LABEL)
    losses = _cross_entropy(_rows(logits, class_axis), labels.reshape(-1), reduction="none", ignore_index=SKIPPED_LABEL)
    return losses.reshape(labels.shape)


def dense_logits_per_row(logits, targets, class_axis):
    """Per-row ``-sum(targets * log_softmax(logits))`` in the logits' dtype (PyTorch's gradient
    for the targets, when they require one)."""
    rows_shape = logits.shape[:class_axis] + logits.shape[class_axis + 1 :]
    losses = _cross_entropy(_rows(logits, class_axis), _rows(targets, class_axis), reduction="none")
    return losses.reshape(rows_shape)


def linear_loss(hidden, kernel, bias, labels, options, *, want_grads, want_head_grads):
    """The reduced loss of ``hidden @ kernel + bias`` (kernel (H, V), Dense's layout) against
    ``labels``, by ``fastxent.torch.linear_cross_entropy``. Autograd decides which gradients are
    computed (``want_grads`` needs no flag here); a frozen head is detached.

    "sum_over_batch_size" and "mean" are the "sum" divided here, with 0 (not PyTorch's NaN) when
    no row is counted, as the core API and the other backends give.
    """
    del want_grads
    if not want_head_grads:
        kernel = kernel.detach()
        bias = None if bias is None else bias.detach()
    labels = labels.to(torch.long).reshape(-1)
    ignore_index = _NO_LABEL if options["ignore_index"] is None else int(options["ignore_index"])
    class_weight = options["class_weight"]
    if class_weight is not None:
        class_weight = torch.as_tensor(class_weight, dtype=hidden.dtype, device=hidden.device)
    total = _linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]),
        kernel.T,  # the (V, H) weight of nn.Linear, as a view of the kernel
        labels,
        linear_bias=bias,
        weight=class_weight,
        reduction="sum",
        ignore_index=ignore_index,
        label_smoothing=options["label_smoothing"],
        softcap=options["softcap"],
        z_loss=options["z_loss"],
    )
    reduction = options["reduction"]
    if reduction == "sum":
        return total
    counted = labels != ignore_index
    if reduction == "mean" and class_weight is not None:
        divisor = (class_weight[torch.where(counted, labels, 0)] * counted).sum()
    else:
        divisor = counted.sum()
    # Nothing counted: the sum is 0, and so is the loss (no 0 / 0).
    return total / torch.where(divisor == 0, 1, divisor).to(total.dtype)

"""The implementations under test: fastxent and its peers, all on the same arrays.

Each implementation imports its framework only in ``load`` (TensorFlow, PyTorch and JAX are
never imported by fastxent's core), sets its thread count there, and then:

    state = impl.prepare(logits, labels)   convert the inputs once (compile, for JAX), untimed
    impl.reset(state)                       untimed, before every call (restores in-place input)
    out = impl.run(state, mode)             the timed call: the "mean" loss, and its gradient
    impl.wait(out)                          returns once the result exists (GPU, JAX)
    loss, loss_dtype, grad = impl.to_numpy(out)

Peers compute what a user of that framework would write:
- NumPy: max / exp / sum / log / take, then softmax minus the one-hot, divided by N. Its ufuncs
  run on one thread whatever the thread setting. bfloat16 input is widened to float32 first.
- TensorFlow: ``tf.nn.sparse_softmax_cross_entropy_with_logits`` then ``reduce_mean`` in a
  ``tf.function``; the gradient through ``GradientTape`` (the fused op's own backprop, scaled).
- PyTorch: ``F.cross_entropy``; forward under ``no_grad``, the gradient with autograd.
- torch.compile: ``torch.compile(F.cross_entropy)`` (Inductor, static shapes, fullgraph),
  compiled in ``prepare`` (untimed) for each case and mode, then timed like PyTorch's.
- JAX: ``logsumexp`` minus the target logit, ``jit`` and ``value_and_grad``; half precision is
  widened to float32 inside the jitted function.

Each framework's peer is followed by fastxent's adapter for it (``fastxent.torch``,
``fastxent.tf``, ``fastxent.jax``; ``torch.compile`` is followed by the compiled
``fastxent.torch.cross_entropy``) doing the same work in the same harness, so a table shows the
adapter beside the framework's own loss and beside the core (its "x core" column).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from fastxent.bench.cases import FORWARD, FORWARD_BACKWARD, MODES

PEER_NAMES = ("numpy", "tensorflow", "torch", "torch.compile", "jax")


class Implementation:
    """Base class: CPU NumPy arrays in, results out; subclasses override what differs."""

    name = ""
    label = ""
    framework = "numpy"  # the import that must succeed; also groups memory-measuring processes
    modes: Tuple[str, ...] = MODES
    is_peer = True

    def __init__(self) -> None:
        self.device = "cpu"
        self.threads = 1
        self.notes: List[str] = []

    def installed(self) -> bool:
        return importlib.util.find_spec(self.framework) is not None

    def load(self, device: str, threads: int) -> Optional[str]:
        """Import the framework and set its threads; None when usable, else the reason why not."""
        self.device, self.threads = device, threads
        if not self.installed():
            return "not installed"
        return self._load()

    def _load(self) -> Optional[str]:
        return None

    def unsupported(self, case) -> Optional[str]:
        """Why this implementation cannot run ``case``, or None."""
        return None

    def prepare(self, logits, labels, modes: Sequence[str] = MODES) -> Dict[str, Any]:
        """Inputs in the framework's form, ready for ``run`` in each of ``modes``."""
        return {"logits": logits, "labels": labels}

    def reset(self, state) -> None:
        pass

    def run(self, state, mode: str):
        raise NotImplementedError

    def wait(self, out) -> None:
        pass

    def to_numpy(self, out) -> Tuple[float, str, Optional[np.ndarray]]:
        loss, grad = out
        loss = _host(loss)
        return float(loss), loss.dtype.name, None if grad is None else _host(grad)


def _host(array) -> np.ndarray:
    """A NumPy copy of a NumPy or CuPy array (0-d arrays included)."""
    if type(array).__module__.split(".")[0] == "cupy":
        return array.get()
    return np.asarray(array)


class Fastxent(Implementation):
    name = label = "fastxent"
    framework = "fastxent"
    is_peer = False

    def _load(self):
        if self.device == "cpu":
            import numba

            # fastxent picks its Numba threading layer (TBB) on import; setting the thread count
            # first would start Numba's default layer instead.
            import fastxent.cpu.xent  # noqa: F401

            wanted = self.threads
            self.threads = min(wanted, numba.config.NUMBA_NUM_THREADS)
            numba.set_num_threads(self.threads)
            if self.threads < wanted:
                self.notes.append(f"Numba allows at most {self.threads} threads here")
        return None

    def run(self, state, mode):
        import fastxent  # looked up at call time: tests substitute a perturbed function here

        if mode == FORWARD:
            return fastxent.sparse_cross_entropy(state["logits"], state["labels"]), None
        return fastxent.sparse_cross_entropy_with_grad(state["logits"], state["labels"])


class FastxentInplace(Fastxent):
    """The gradient written over the logits: no N x C allocation. Each call gets fresh logits
    (copied in, untimed), so it always computes on the case's data."""

    name = "fastxent-inplace"
    label = "fastxent (inplace)"
    modes = (FORWARD_BACKWARD,)

    def prepare(self, logits, labels, modes=MODES):
        return {"source": logits, "logits": logits.copy(), "labels": labels}

    def reset(self, state):
        state["logits"][...] = state["source"]

    def run(self, state, mode):
        import fastxent

        return fastxent.sparse_cross_entropy_with_grad(state["logits"], state["labels"], inplace=True)


class FastxentOut(Fastxent):
    """The gradient written into a buffer the caller keeps across calls (``out=``), as a
    training loop would: no allocation and no page faults per call."""

    name = "fastxent-out"
    label = "fastxent (out=)"
    modes = (FORWARD_BACKWARD,)

    def prepare(self, logits, labels, modes=MODES):
        out = np.empty_like(logits)
        out.fill(0)  # touch every page before timing, as a reused buffer would be
        return {"logits": logits, "labels": labels, "out": out}

    def run(self, state, mode):
        import fastxent

        return fastxent.sparse_cross_entropy_with_grad(state["logits"], state["labels"], out=state["out"])


def numpy_cross_entropy(xp, logits, labels, want_grad: bool):
    """The textbook composition, in whatever array module ``xp`` is (NumPy, or CuPy on GPU)."""
    x = logits if logits.dtype in (np.float32, np.float64) else logits.astype(np.float32)
    num_rows = x.shape[0]
    rows = xp.arange(num_rows)
    row_max = x.max(axis=1, keepdims=True)
    exp = xp.exp(x - row_max)
    sum_exp = exp.sum(axis=1)
    lse = xp.log(sum_exp) + row_max[:, 0]
    loss = (lse - x[rows, labels]).mean()
    if not want_grad:
        return loss, None
    grad = exp
    grad /= sum_exp[:, None]
    grad[rows, labels] -= 1.0
    grad /= num_rows
    return loss, grad.astype(logits.dtype, copy=False)


class NumpyPeer(Implementation):
    name = label = "numpy"

    def _load(self):
        if self.device == "gpu":
            self.label = "numpy (CuPy)"
            self.notes.append("the same composition with CuPy arrays")
        else:
            self.notes.append("NumPy ufuncs run on one thread")
        return None

    def run(self, state, mode):
        if self.device == "gpu":
            import cupy as xp
        else:
            xp = np
        return numpy_cross_entropy(xp, state["logits"], state["labels"], mode == FORWARD_BACKWARD)


class TorchPeer(Implementation):
    name = label = "torch"
    framework = "torch"

    def _load(self):
        import torch

        self.torch = torch
        self.cross_entropy = torch.nn.functional.cross_entropy
        if self.device == "gpu":
            if not torch.cuda.is_available():
                return "no CUDA build or no GPU visible to PyTorch"
            return None
        torch.set_num_threads(self.threads)
        try:  # allowed once per process, before any inter-op parallel work
            torch.set_num_interop_threads(self.threads)
        except RuntimeError:
            pass
        return None

    def prepare(self, logits, labels, modes=MODES):
        torch = self.torch
        if self.device == "gpu":
            tensor = torch.from_dlpack(logits)
            target = torch.from_dlpack(labels)
        else:
            if logits.dtype.name == "bfloat16":  # ml_dtypes: share the bits, no copy
                tensor = torch.from_numpy(logits.view(np.int16)).view(torch.bfloat16)
            else:
                tensor = torch.from_numpy(logits)
            target = torch.from_numpy(labels)
        leaf = tensor.detach().requires_grad_(True)
        return {"logits": tensor, "leaf": leaf, "labels": target}

    def run(self, state, mode):
        torch = self.torch
        cross_entropy = state.get("compiled", self.cross_entropy)
        if mode == FORWARD:
            with torch.no_grad():
                return cross_entropy(state["logits"], state["labels"]), None
        loss = cross_entropy(state["leaf"], state["labels"])
        (grad,) = torch.autograd.grad(loss, state["leaf"])
        return loss, grad

    def wait(self, out):
        if self.device == "gpu":
            self.torch.cuda.synchronize()

    def to_numpy(self, out):
        loss, grad = out
        dtype = str(loss.dtype).replace("torch.", "")
        if grad is not None:
            if grad.dtype == self.torch.bfloat16:
                from ml_dtypes import bfloat16

                grad = grad.view(self.torch.int16).cpu().numpy().view(bfloat16)
            else:
                grad = grad.detach().cpu().numpy()
        return float(loss.float().item()), dtype, grad


def _compile_for_case(impl, state, modes):
    """``torch.compile`` of ``impl.cross_entropy`` for this case's shapes (Inductor, fullgraph,
    static shapes), compiled here by one untimed call per mode (forward under no_grad and
    forward+backward are two graphs)."""
    torch = impl.torch
    # One graph per case and mode: more than Dynamo's default limit of recompilations per
    # function over a whole grid. fullgraph makes a hit limit an error, never a silent fallback.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 1024)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 4096)
    state["compiled"] = torch.compile(impl.cross_entropy, fullgraph=True, dynamic=False)
    for mode in modes:
        impl.run(state, mode)
    return state


class TorchCompiledPeer(TorchPeer):
    """``torch.compile(F.cross_entropy)``: PyTorch's loss as a compiled training step has it."""

    name = "torch.compile"
    label = "torch.compile(F.cross_entropy)"

    def prepare(self, logits, labels, modes=MODES):
        return _compile_for_case(self, super().prepare(logits, labels, modes), modes)


class TensorflowPeer(Implementation):
    name = label = "tensorflow"
    framework = "tensorflow"

    def _load(self):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import tensorflow as tf

        self.tf = tf
        if self.device == "gpu":
            if not tf.config.list_physical_devices("GPU"):
                return "no GPU visible to TensorFlow"
            self.tf_device = "/GPU:0"
        else:
            self.tf_device = "/CPU:0"
            try:  # only possible before TensorFlow's runtime starts
                tf.config.threading.set_intra_op_parallelism_threads(self.threads)
                tf.config.threading.set_inter_op_parallelism_threads(self.threads)
            except RuntimeError:
                self.notes.append("thread counts were fixed before fastxent bench could set them")
        self.functions: Dict[Any, Any] = {}
        self.per_row_loss = tf.nn.sparse_softmax_cross_entropy_with_logits
        return None

    def _function(self, dtype, mode):
        key = (dtype, mode)
        if key not in self.functions:
            tf = self.tf
            signature = [tf.TensorSpec([None, None], dtype), tf.TensorSpec([None], tf.int64)]

            def forward(logits, labels):
                losses = self.per_row_loss(labels=labels, logits=logits)
                return tf.reduce_mean(losses)

            def forward_backward(logits, labels):
                with tf.GradientTape() as tape:
                    tape.watch(logits)
                    loss = forward(logits, labels)
                return loss, tape.gradient(loss, logits)

            body = forward if mode == FORWARD else forward_backward
            self.functions[key] = tf.function(body, input_signature=signature)
        return self.functions[key]

    def prepare(self, logits, labels, modes=MODES):
        tf = self.tf
        with tf.device(self.tf_device):
            tensor = tf.constant(_host(logits))
            target = tf.constant(_host(labels))
        return {"logits": tensor, "labels": target}

    def run(self, state, mode):
        logits = state["logits"]
        with self.tf.device(self.tf_device):
            out = self._function(logits.dtype, mode)(logits, state["labels"])
        return (out, None) if mode == FORWARD else out

    def wait(self, out):
        if self.device == "gpu":
            self.tf.test.experimental.sync_devices()

    def to_numpy(self, out):
        loss, grad = out
        return float(np.float32(loss.numpy())), loss.dtype.name, None if grad is None else grad.numpy()


class JaxPeer(Implementation):
    name = label = "jax"
    framework = "jax"

    def _load(self):
        if self.device == "cpu" and "jax" not in __import__("sys").modules:
            flags = os.environ.get("XLA_FLAGS", "")
            os.environ["XLA_FLAGS"] = (
                f"{flags} --xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={self.threads}"
            ).strip()
        import jax
        import jax.numpy as jnp

        self.jax, self.jnp = jax, jnp
        try:
            self.jax_device = jax.devices("gpu" if self.device == "gpu" else "cpu")[0]
        except RuntimeError:
            return "no GPU visible to JAX"

        mean_loss = self._mean_loss()
        self.forward = jax.jit(mean_loss)
        self.forward_backward = jax.jit(jax.value_and_grad(mean_loss))
        return None

    def _mean_loss(self):
        jax, jnp = self.jax, self.jnp

        def mean_loss(logits, labels):
            x = logits if logits.dtype in (jnp.float32, jnp.float64) else logits.astype(jnp.float32)
            lse = jax.nn.logsumexp(x, axis=-1)
            target = jnp.take_along_axis(x, labels[:, None], axis=-1)[:, 0]
            return jnp.mean(lse - target)

        return mean_loss

    def prepare(self, logits, labels, modes=MODES):
        logits = self.jax.device_put(_host(logits), self.jax_device)
        labels = self.jax.device_put(_host(labels), self.jax_device)
        # Compiled here, for this shape, so that neither timing nor memory includes XLA's compiler.
        state = {"logits": logits, "labels": labels}
        for mode in modes:
            function = self.forward if mode == FORWARD else self.forward_backward
            state[mode] = function.lower(logits, labels).compile()
        return state

    def run(self, state, mode):
        out = state[mode](state["logits"], state["labels"])
        return (out, None) if mode == FORWARD else out

    def wait(self, out):
        for item in out:
            if item is not None:
                item.block_until_ready()

    def to_numpy(self, out):
        loss, grad = out
        return float(np.float32(loss)), str(loss.dtype), None if grad is None else np.asarray(grad)


# ----------------------------------------------------------------------------------------
# fastxent through each framework's adapter: the peer's own setup (threads, inputs, compiled
# functions), fastxent's adapter in place of the framework's loss.
# ----------------------------------------------------------------------------------------


class FastxentTorch(TorchPeer):
    """``fastxent.torch.cross_entropy``: no-grad forward, and autograd's gradient."""

    name = label = "fastxent.torch"
    is_peer = False

    def _load(self):
        reason = super()._load()
        if reason is None:
            import fastxent.torch

            self.cross_entropy = fastxent.torch.cross_entropy
        return reason


class FastxentTorchCompiled(FastxentTorch):
    """``torch.compile(fastxent.torch.cross_entropy)``: fastxent's custom operator inside a
    compiled graph, beside ``torch.compile(F.cross_entropy)``."""

    name = "fastxent.torch.compile"
    label = "torch.compile(fastxent.torch)"

    def prepare(self, logits, labels, modes=MODES):
        return _compile_for_case(self, super().prepare(logits, labels, modes), modes)


class FastxentTensorflow(TensorflowPeer):
    """``fastxent.tf.sparse_softmax_cross_entropy_with_logits`` in the same ``tf.function``
    (and ``GradientTape``) as TensorFlow's own op."""

    name = label = "fastxent.tf"
    is_peer = False

    def _load(self):
        reason = super()._load()
        if reason is None:
            import fastxent.tf

            self.per_row_loss = fastxent.tf.sparse_softmax_cross_entropy_with_logits
        return reason


class FastxentJax(JaxPeer):
    """``fastxent.jax.sparse_cross_entropy(..., reduction="mean")`` under ``jit`` and
    ``value_and_grad``: the mean taken by the kernel, as a fastxent user asks for it (the mean of
    optax-style per-row losses costs one more scaling pass over the gradient)."""

    name = label = "fastxent.jax"
    is_peer = False

    def _mean_loss(self):
        import fastxent.jax

        def mean_loss(logits, labels):
            return fastxent.jax.sparse_cross_entropy(logits, labels, reduction="mean")

        return mean_loss


PEERS = {
    "numpy": NumpyPeer,
    "tensorflow": TensorflowPeer,
    "torch": TorchPeer,
    "torch.compile": TorchCompiledPeer,
    "jax": JaxPeer,
}
ADAPTERS = {
    "tensorflow": FastxentTensorflow,
    "torch": FastxentTorch,
    "torch.compile": FastxentTorchCompiled,
    "jax": FastxentJax,
}
IMPLEMENTATIONS = {
    "fastxent": Fastxent,
    "fastxent-inplace": FastxentInplace,
    "fastxent-out": FastxentOut,
    **PEERS,
    **{adapter.name: adapter for adapter in ADAPTERS.values()},
}


def implementations(peers) -> List[Implementation]:
    """fastxent (new gradient, in place, into a kept buffer), then each named peer followed by
    fastxent's adapter for that framework, each a fresh (unloaded) object."""
    unknown = [name for name in peers if name not in PEERS]
    if unknown:
        raise ValueError(f"unknown peer {unknown[0]!r}; expected some of {', '.join(PEER_NAMES)}")
    chosen: List[Implementation] = [Fastxent(), FastxentInplace(), FastxentOut()]
    for name in peers:
        chosen.append(PEERS[name]())
        if name in ADAPTERS:
            chosen.append(ADAPTERS[name]())
    return chosen

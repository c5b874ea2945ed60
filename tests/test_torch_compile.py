"""fastxent.torch's custom operators (``fastxent::cross_entropy``, ``fastxent::linear_cross_entropy``)
where PyTorch users train: ``torch.library.opcheck`` on PyTorch's own OpInfo samples and on the
linear head, ``torch.compile(fullgraph=True)`` (no graph break, one compilation for every batch
size under ``dynamic=True``, the eager numbers), ``torch.export``, the same errors as eager code
from compiled code, and a ``fastxent.transformers``-patched causal LM compiled whole.

Compiled graphs use the ``aot_eager`` backend (AOTAutograd traces forward and backward through
the operators' fake implementations and registered autograd, as Inductor's front end does) except
one Inductor test; compiling is slow, so each test compiles few graphs."""

from __future__ import annotations

import gc
import operator

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch._dynamo.testing import CompileCounterWithBackend  # noqa: E402

import fastxent.torch as fxt  # noqa: E402

pytestmark = pytest.mark.peers

FLOAT32 = dict(rtol=2e-5, atol=2e-6)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test starts with no compiled code, so compile counts are its own."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _op_args(sample, want_grad=True):
    """``fastxent::cross_entropy``'s arguments for an OpInfo sample of F.cross_entropy."""
    kwargs = sample.kwargs
    return (
        sample.input,
        sample.args[0],
        kwargs.get("weight"),
        int(kwargs.get("ignore_index", -100)),
        kwargs.get("reduction", "mean"),
        float(kwargs.get("label_smoothing", 0.0)),
        want_grad,
    )


def _representative(samples):
    """One OpInfo sample per kind PyTorch's list covers (index or probability targets,
    unbatched, spatial, class weights, ignore_index, label smoothing, each reduction), in float64."""
    chosen, kinds = [], set()
    for sample in samples:
        target = sample.args[0]
        kind = (
            target.is_floating_point(),
            sample.input.dim(),
            tuple(sorted(sample.kwargs)),
            sample.kwargs.get("reduction", "mean"),
        )
        if kind not in kinds:
            kinds.add(kind)
            chosen.append(sample)
    return chosen


def test_opcheck_on_pytorchs_opinfo_samples():
    """``torch.library.opcheck`` (schema, autograd registration, fake tensors against the real
    kernel, AOTAutograd with dynamic shapes) on a representative subset of the OpInfo samples of
    ``nn.functional.cross_entropy``, with and without the kept gradient."""
    from torch.testing._internal.common_methods_invocations import op_db

    (op,) = [o for o in op_db if o.name == "nn.functional.cross_entropy" and o.variant_test_name == ""]
    torch.manual_seed(0)
    samples = _representative(op.sample_inputs("cpu", torch.float64, requires_grad=True))
    assert len(samples) >= 8
    kinds = {(s.args[0].is_floating_point(), s.kwargs.get("reduction", "mean")) for s in samples}
    assert kinds >= {(False, "none"), (False, "mean"), (False, "sum"), (True, "mean"), (True, "none")}
    for index, sample in enumerate(samples):
        # The fast checks on every sample; AOTAutograd's on every other one (it is the slow one).
        tests = ("test_schema", "test_autograd_registration", "test_faketensor")
        if index % 2 == 0:
            tests = tests + ("test_aot_dispatch_dynamic",)
        torch.library.opcheck(torch.ops.fastxent.cross_entropy.default, _op_args(sample), test_utils=tests)
    # The forward-only call (no kept gradient) and a float32 batch.
    torch.library.opcheck(torch.ops.fastxent.cross_entropy.default, _op_args(samples[0], want_grad=False))
    x = torch.randn(6, 11, requires_grad=True)
    t = torch.tensor([0, 3, -100, 10, 5, 5])
    torch.library.opcheck(torch.ops.fastxent.cross_entropy.default, (x, t, None, -100, "mean", 0.1, True))


def test_opcheck_linear_cross_entropy():
    """opcheck of ``fastxent::linear_cross_entropy``: every gradient kept ("mean"), a bias and
    class weights ("sum"), and reduction "none" with its per-row backward."""
    torch.manual_seed(0)
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(9, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 8, -100, 3, 3])
    cw = torch.rand(9, dtype=torch.float64) + 0.5
    op = torch.ops.fastxent.linear_cross_entropy.default
    torch.library.opcheck(op, (x, w, None, t, None, None, "mean", -100, 0.0, None, 0.0, True, True, False))
    torch.library.opcheck(op, (x, w, b, t, cw, None, "sum", -100, 0.1, 3.0, 1e-3, True, True, True))
    torch.library.opcheck(op, (x, w, b, t, None, None, "none", -100, 0.0, None, 0.0, False, False, False))


def _loss_and_grad(function, x, t, **kwargs):
    x = x.detach().requires_grad_()
    loss = function(x, t, **kwargs)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), grad


def _compilations(counter):
    """How many compilations the counting backend has seen so far (the first call may count
    two: Dynamo restarts its analysis once to specialise a float option)."""
    return counter.frame_count


def test_compiled_cross_entropy_no_break_no_recompile_same_numbers():
    """fullgraph=True with dynamic=True: one compilation serves batch sizes 3, 5 and 8, with
    class weights, ignore_index and label smoothing, and gives eager's loss and gradient; the
    loss under no_grad (forward-only kernel) too."""
    counter = CompileCounterWithBackend("aot_eager")
    options = dict(weight=torch.rand(13) + 0.5, ignore_index=2, label_smoothing=0.05)
    compiled = torch.compile(fxt.cross_entropy, backend=counter, fullgraph=True, dynamic=True)
    compilations = None
    for batch in (3, 5, 8):
        x = torch.randn(batch, 13)
        t = torch.randint(0, 13, (batch,))
        t[0] = 2
        got = _loss_and_grad(compiled, x, t, **options)
        expected = _loss_and_grad(fxt.cross_entropy, x, t, **options)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        torch.testing.assert_close(got, _loss_and_grad(F.cross_entropy, x, t, **options), **FLOAT32)
        compilations = compilations if batch > 3 else _compilations(counter)
    assert _compilations(counter) == compilations
    # Reduction "none" with an incoming gradient per row, and probability targets.
    x, t = torch.randn(4, 6), torch.randint(0, 6, (4,))
    got = _loss_and_grad(torch.compile(fxt.cross_entropy, backend="aot_eager", fullgraph=True), x, t, reduction="none")
    torch.testing.assert_close(got, _loss_and_grad(fxt.cross_entropy, x, t, reduction="none"), rtol=0, atol=0)
    q = torch.softmax(torch.randn(4, 6), 1)
    got = _loss_and_grad(torch.compile(fxt.cross_entropy, backend="aot_eager", fullgraph=True), x, q)
    torch.testing.assert_close(got, _loss_and_grad(fxt.cross_entropy, x, q), rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t), fxt.cross_entropy(x, t), rtol=0, atol=0)


def test_opcheck_kept_gradient_pair():
    """opcheck of the operators torch.compile uses for class-index targets: the forward that keeps
    its gradient behind a ticket, and the backward that redeems it (every check runs the backward
    several times on one ticket: the first takes the kept gradient, the rest compute it again and
    must give the same numbers)."""
    torch.manual_seed(0)
    x = torch.randn(6, 11, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 3, -100, 10, 5, 5])
    forward = torch.ops.fastxent.cross_entropy_kept.default
    # Each call's ticket is a new number by design, so AOTAutograd's comparison of two runs'
    # outputs does not apply to the forward; the compile tests below run it through AOTAutograd.
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    for reduction in ("mean", "sum", "none"):
        class_weight = torch.rand(11, dtype=torch.float64) + 0.5
        torch.library.opcheck(forward, (x, t, class_weight, -100, reduction, 0.1), test_utils=checks)
    _, ticket = forward(x.detach(), t, None, -100, "mean", 0.1)
    backward = torch.ops.fastxent.kept_cross_entropy_grad.default
    grad_loss = torch.tensor(2.5, dtype=torch.float64)
    torch.library.opcheck(
        backward,
        (ticket, x.detach(), t, None, -100, "mean", 0.1, grad_loss),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
    )


def _backward_graphs():
    """A torch.compile backend that records AOTAutograd's backward graphs (run as traced), split
    from the forward by Inductor's partitioner."""
    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    graphs = []

    def backend(gm, example_inputs):
        def keep_backward(graph, _inputs):
            graphs.append(graph)
            return graph

        return aot_module_simplified(
            gm,
            example_inputs,
            fw_compiler=lambda g, _: g,
            bw_compiler=keep_backward,
            partition_fn=min_cut_rematerialization_partition,
        )

    return backend, graphs


def test_compiled_backward_hands_on_the_kept_gradient():
    """Compiled, the backward graph is the one operator that redeems the kept gradient (no
    multiply, no copy of a saved (N, C) gradient around it); loss.backward(), a scaled loss and a
    per-row incoming gradient give eager's bits; every ticket is gone after its backward, or with
    its graph when no backward runs."""
    from fastxent import _torch_kept

    gc.collect()  # graphs other tests left in reference cycles, with their tickets
    kept_before = _torch_kept.kept_count()
    backend, graphs = _backward_graphs()
    compiled = torch.compile(fxt.cross_entropy, backend=backend, fullgraph=True, dynamic=True)
    torch.manual_seed(0)
    for reduction, scale in (("mean", 1.0), ("sum", 3.0), ("none", 0.5)):
        x = torch.randn(7, 40)
        t = torch.randint(0, 40, (7,))
        t[3] = -100
        leaf = x.clone().requires_grad_()
        (compiled(leaf, t, reduction=reduction, label_smoothing=0.1).sum() * scale).backward()
        eager = x.clone().requires_grad_()
        (fxt.cross_entropy(eager, t, reduction=reduction, label_smoothing=0.1).sum() * scale).backward()
        torch.testing.assert_close(leaf.grad, eager.grad, rtol=0, atol=0)
        assert _torch_kept.kept_count() == kept_before
    assert graphs
    for graph in graphs:
        calls = [node.target for node in graph.graph.nodes if node.op == "call_function"]
        assert calls == [torch.ops.fastxent.kept_cross_entropy_grad.default], calls
    loss = compiled(x.clone().requires_grad_(), t)
    assert _torch_kept.kept_count() == kept_before + 1
    del loss
    assert _torch_kept.kept_count() == kept_before


def test_compiled_linear_backward_hands_on_the_kept_gradients():
    """The fused linear head compiled: opcheck of its kept pair, a backward graph that is the one
    redeeming operator, eager's bits for every gradient (incoming gradient 1 and 0.75, with and
    without a bias), and no ticket left behind."""
    from fastxent import _torch_kept

    torch.manual_seed(0)
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(17, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(17, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 16, -100, 3, 3, 9])
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    forward = torch.ops.fastxent.linear_cross_entropy_kept.default
    torch.library.opcheck(forward, (x, w, b, t, None, "sum", -100, 0.1, 3.0, 1e-3, True, True, True), test_utils=checks)
    _, ticket = forward(x.detach(), w.detach(), None, t, None, "mean", -100, 0.0, None, 0.0, True, True, False)
    torch.library.opcheck(
        torch.ops.fastxent.kept_linear_cross_entropy_grads.default,
        (
            ticket,
            x.detach(),
            w.detach(),
            None,
            t,
            None,
            "mean",
            -100,
            0.0,
            None,
            0.0,
            True,
            True,
            False,
            0.5 * x[0, 0].detach(),
        ),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
    )
    gc.collect()
    kept_before = _torch_kept.kept_count()
    backend, graphs = _backward_graphs()
    compiled = torch.compile(fxt.linear_cross_entropy, backend=backend, fullgraph=True, dynamic=True)

    def step(function, bias, scale):
        loss = function(x, w, t, linear_bias=bias, label_smoothing=0.1) * scale
        return torch.autograd.grad(loss, [x, w] if bias is None else [x, w, bias])

    for bias, scale in ((None, 1.0), (b, 0.75)):
        expected = step(fxt.linear_cross_entropy, bias, scale)
        torch.testing.assert_close(step(compiled, bias, scale), expected, rtol=0, atol=0)
        assert _torch_kept.kept_count() == kept_before
    assert graphs
    for graph in graphs:
        calls = [node.target for node in graph.graph.nodes if node.op == "call_function"]
        redeem = torch.ops.fastxent.kept_linear_cross_entropy_grads.default
        assert [c for c in calls if c is not operator.getitem] == [redeem], calls


def test_compiled_second_backward_recomputes_the_same_bits():
    """With donated buffers off (PyTorch then allows retain_graph=True under compile), a second
    backward through one compiled graph finds its ticket spent and computes the gradient again:
    the same bits as the first, for an incoming gradient of 1 and of 2."""
    import torch._functorch.config as functorch_config

    torch.manual_seed(0)
    x, t = torch.randn(5, 30), torch.randint(0, 30, (5,))
    with functorch_config.patch(donated_buffer=False):
        compiled = torch.compile(fxt.cross_entropy, backend="inductor", fullgraph=True)
        for scale in (1.0, 2.0):
            leaf = x.clone().requires_grad_()
            loss = compiled(leaf, t) * scale
            (first,) = torch.autograd.grad(loss, leaf, retain_graph=True)
            (second,) = torch.autograd.grad(loss, leaf)
            torch.testing.assert_close(second, first, rtol=0, atol=0)
            torch.testing.assert_close(first, scale * _loss_and_grad(fxt.cross_entropy, x, t)[1], rtol=0, atol=0)


class _Classifier(torch.nn.Module):
    """A linear model with fastxent's CrossEntropyLoss, as a training step writes it."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 10))
        self.loss = fxt.CrossEntropyLoss(label_smoothing=0.1)

    def forward(self, features, labels):
        return self.loss(self.body(features), labels)


def _model_step(model, features, labels):
    model.zero_grad()
    loss = model(features, labels)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def test_compiled_module_with_crossentropyloss_and_export():
    """CrossEntropyLoss inside a model: compiled with fullgraph=True and dynamic=True (one
    compilation for two batch sizes) and exported with torch.export, both give eager's loss and
    parameter gradients."""
    torch.manual_seed(0)
    model = _Classifier()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=True)
    compilations = None
    for batch in (6, 9):
        features, labels = torch.randn(batch, 8), torch.randint(0, 10, (batch,))
        torch.testing.assert_close(
            _model_step(compiled, features, labels), _model_step(model, features, labels), rtol=1e-6, atol=1e-7
        )
        compilations = compilations if batch > 6 else _compilations(counter)
    assert _compilations(counter) == compilations

    batch = torch.export.Dim("batch", min=2)
    features, labels = torch.randn(6, 8), torch.randint(0, 10, (6,))
    exported = torch.export.export(model, (features, labels), dynamic_shapes=({0: batch}, {0: batch}))
    assert any("fastxent.cross_entropy" in str(node.target) for node in exported.graph.nodes)
    features, labels = torch.randn(11, 8), torch.randint(0, 10, (11,))
    torch.testing.assert_close(exported.module()(features, labels), model(features, labels), rtol=0, atol=0)


def test_compiled_linear_cross_entropy():
    """linear_cross_entropy compiled (fullgraph, dynamic: one compilation for two batch sizes):
    eager's loss and the gradients of input, weight and bias, for "mean" and "none"."""
    torch.manual_seed(0)
    w = torch.randn(20, 6, requires_grad=True)
    b = torch.randn(20, requires_grad=True)

    def step(function, x, t, **kwargs):
        x = x.detach().requires_grad_()
        loss = function(x, w, t, linear_bias=b, **kwargs)
        grads = torch.autograd.grad(loss.sum() * 1.5, (x, w, b))
        return loss.detach(), grads

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fxt.linear_cross_entropy, backend=counter, fullgraph=True, dynamic=True)
    compilations = None
    for rows in (5, 7):
        x, t = torch.randn(rows, 6), torch.randint(0, 20, (rows,))
        t[1] = -100
        torch.testing.assert_close(
            step(compiled, x, t, z_loss=1e-3), step(fxt.linear_cross_entropy, x, t, z_loss=1e-3), rtol=0, atol=0
        )
        compilations = compilations if rows > 5 else _compilations(counter)
    assert _compilations(counter) == compilations
    compiled_none = torch.compile(fxt.linear_cross_entropy, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(
        step(compiled_none, x, t, reduction="none"),
        step(fxt.linear_cross_entropy, x, t, reduction="none"),
        rtol=0,
        atol=0,
    )


def test_compiled_code_raises_eagers_errors():
    """Bad input through compiled code (fullgraph) raises what eager code raises, type and
    message: a label out of range is found by the kernel, bad shapes, dtypes and options by the
    operators' own checks at run time; never a result."""
    x = torch.randn(4, 5, requires_grad=True)
    w = torch.randn(9, 5, requires_grad=True)
    bad_calls = [
        (fxt.cross_entropy, (x, torch.tensor([0, 1, 7, 3])), {}),  # label out of range
        (fxt.cross_entropy, (x, torch.tensor([0, 1, 2])), {}),  # target shape
        (fxt.cross_entropy, (x, torch.rand(4)), {}),  # probabilities of the wrong shape
        (fxt.cross_entropy, (x, torch.rand(4, 5)), {"ignore_index": 1}),
        (fxt.cross_entropy, (x, torch.tensor([0, 1, 2, 3])), {"reduction": "avg"}),
        (fxt.linear_cross_entropy, (x, w, torch.tensor([0, 9, 1, 2])), {}),  # label out of range
        (fxt.linear_cross_entropy, (x, w[:, :4], torch.tensor([0, 1, 1, 2])), {}),  # in_features
        (fxt.linear_cross_entropy, (x, w, torch.tensor([0, 1, 1])), {}),  # target shape
        (fxt.linear_cross_entropy, (x, w, torch.tensor([0, 1, 1, 2])), {"label_smoothing": 1.5}),
    ]
    for function, args, kwargs in bad_calls:
        with pytest.raises((ValueError, RuntimeError)) as eager:
            function(*args, **kwargs)
        compiled = torch.compile(function, backend="aot_eager", fullgraph=True)
        with pytest.raises(type(eager.value)) as traced:
            compiled(*args, **kwargs)
        assert str(traced.value) == str(eager.value)
        torch._dynamo.reset()
    message = r"label 7 at position \(2,\) is outside the valid range \[0, 5\)"
    with pytest.raises(fxt.TargetOutOfBoundsError, match=message):
        torch.compile(fxt.cross_entropy, backend="aot_eager", fullgraph=True)(x, torch.tensor([0, 1, 7, 3]))


def test_inductor_compiles_both_losses_in_one_graph():
    """The default backend (Inductor, C++ code) around both operators in one graph: the loss and
    every gradient equal eager's."""
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 12)

    def losses(x, t):
        hidden = torch.tanh(x)
        return fxt.cross_entropy(head(hidden), t) + fxt.linear_cross_entropy(hidden, head.weight, t, reduction="sum")

    x, t = torch.randn(5, 8), torch.randint(0, 12, (5,))

    def step(function):
        head.zero_grad()
        leaf = x.clone().requires_grad_()
        loss = function(leaf, t)
        loss.backward()
        return loss.detach(), leaf.grad, head.weight.grad.clone(), head.bias.grad.clone()

    torch.testing.assert_close(step(torch.compile(losses, fullgraph=True)), step(losses), rtol=1e-6, atol=1e-6)


def test_compiled_patched_causal_lm(monkeypatch):
    """A tiny Llama patched by fastxent.transformers, compiled with fullgraph=True and
    dynamic=True: no graph break, no recompilation for another batch shape, the compiled forward
    takes the fused path too (no logits in its output), and the loss and every parameter
    gradient equal the eager patched model's. A model whose forward does
    what the fused loss does not reproduce (adds to the logits) compiles to the stock forward,
    with stock's numbers."""
    transformers = pytest.importorskip("transformers")
    import fastxent.transformers as fxtf

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=300,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    model = transformers.LlamaForCausalLM(config)
    model.train()
    fxtf.apply(model)
    input_ids = torch.randint(3, 300, (2, 10))
    labels = input_ids.clone()
    labels[0, :3] = -100

    def step(function):
        model.zero_grad()
        loss = function(input_ids=input_ids, labels=labels).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    calls = {"n": 0}
    fused = fxtf._fused_linear_cross_entropy()

    def counted(*args, **kwargs):
        calls["n"] += 1
        return fused(*args, **kwargs)

    monkeypatch.setattr(fxtf, "_fused_linear_cross_entropy", lambda: counted)
    expected = step(model)
    assert calls["n"] == 1, "the eager patched model did not take the fused path"
    got = step(torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=True))
    assert calls["n"] == 2, "the compiled model's trace did not take the fused path"
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # Without the counting wrapper (Dynamo guards on its count): another batch size and
    # sequence length reuse the compiled code, still without logits.
    monkeypatch.undo()
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=True)
    assert compiled(input_ids=input_ids, labels=labels).logits is None
    compilations = _compilations(counter)
    other_ids = torch.randint(3, 300, (3, 7))
    assert compiled(input_ids=other_ids, labels=other_ids.clone()).logits is None
    assert _compilations(counter) == compilations

    class AddsToLogitsForCausalLM(transformers.LlamaForCausalLM):
        def forward(self, input_ids=None, labels=None, **kwargs):
            logits = self.lm_head(self.model(input_ids=input_ids).last_hidden_state) + 0.5
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size)
            return transformers.modeling_outputs.CausalLMOutputWithPast(loss=loss, logits=logits)

    torch.manual_seed(0)
    odd = AddsToLogitsForCausalLM(config)
    stock_loss = odd(input_ids=input_ids, labels=labels).loss
    fxtf.apply(odd)
    torch._dynamo.reset()
    compiled_odd = torch.compile(odd, backend="aot_eager", fullgraph=True)(input_ids=input_ids, labels=labels)
    assert compiled_odd.logits is not None
    torch.testing.assert_close(compiled_odd.loss, stock_loss, rtol=1e-6, atol=1e-7)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible to PyTorch")
def test_cuda_operators_opcheck_and_compile():
    """The CUDA registrations: opcheck on CUDA tensors (float32 and bfloat16), and a compiled
    loss on a side stream equal to eager's (the kernels launch on PyTorch's current stream)."""
    pytest.importorskip("cupy")
    torch.manual_seed(0)
    op = torch.ops.fastxent.cross_entropy.default
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(16, 1000, device="cuda", dtype=dtype, requires_grad=True)
        t = torch.randint(0, 1000, (16,), device="cuda")
        t[3] = -100
        torch.library.opcheck(op, (x, t, None, -100, "mean", 0.1, True))
    w = torch.randn(300, 32, device="cuda", requires_grad=True)
    h = torch.randn(16, 32, device="cuda", requires_grad=True)
    t = torch.randint(0, 300, (16,), device="cuda")
    linear = torch.ops.fastxent.linear_cross_entropy.default
    torch.library.opcheck(linear, (h, w, None, t, None, None, "mean", -100, 0.0, None, 0.0, True, True, False))
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        x = torch.randn(64, 5000, device="cuda", requires_grad=True)
        t = torch.randint(0, 5000, (64,), device="cuda")
        compiled = torch.compile(fxt.cross_entropy, fullgraph=True)
        got = _loss_and_grad(compiled, x, t)
        expected = _loss_and_grad(fxt.cross_entropy, x, t)
    torch.cuda.synchronize()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)

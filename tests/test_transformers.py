"""Hugging Face transformers integration (fastxent.transformers): tiny random causal LMs, built in
code, patched against stock: the same loss and the same gradient for every parameter. Every
*ForCausalLM class the installed transformers builds tiny on the CPU (fused, or run stock with a
FallbackWarning; never a different number); the documented families fused, with the logit
transforms and loss terms they use (scales, softcaps, padded vocabularies, the MoE router's
auxiliary loss); the transformers semantics the fused forward keeps (shifted labels,
shift_labels, -100 padding, num_items_in_batch, logits_to_keep, tied and frozen heads, PEFT),
Trainer with gradient accumulation, generate, and remove."""

from __future__ import annotations

import copy
import time
import warnings

import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

import fastxent  # noqa: E402
import fastxent._linear_api  # noqa: E402
import fastxent.transformers as fxtf  # noqa: E402

pytestmark = pytest.mark.peers

VOCAB = 1000
BATCH, SEQ = 2, 12
# float32 tolerances: the fused loss sums the same float32 products in another order and its
# log-sum-exp in float64, so loss and gradients agree with stock to a few float32 ulps of their
# scale, not bit for bit.
RTOL, ATOL = 2e-5, 1e-6

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def _config(family: str, **overrides):
    """A tiny random config of one family (vocab 1000, hidden 32, 2 layers)."""
    options = dict(COMMON, **overrides)
    if family == "llama":
        return transformers.LlamaConfig(**options)
    if family == "mistral":
        return transformers.MistralConfig(**options)
    if family == "qwen2":
        return transformers.Qwen2Config(**options)
    if family == "qwen3":
        return transformers.Qwen3Config(head_dim=8, **options)
    if family == "gemma2":
        # A cap small enough that the tiny model's logits reach the tanh's bend: the softcap
        # changes the loss (checked in test_softcap_is_applied).
        options.setdefault("final_logit_softcapping", 0.05)
        return transformers.Gemma2Config(head_dim=8, **options)
    if family == "gemma3":
        options.setdefault("final_logit_softcapping", 0.05)
        return transformers.Gemma3TextConfig(head_dim=8, **options)
    if family == "phi3":
        return transformers.Phi3Config(**options)
    raise ValueError(family)


MODEL_CLASSES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
}
FAMILIES = tuple(MODEL_CLASSES)


def _model(family: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = getattr(transformers, MODEL_CLASSES[family])(_config(family, **overrides))
    model.train()
    return model


def _pair(family: str, **overrides):
    """(stock, patched): the same weights, the second patched."""
    stock = _model(family, **overrides)
    patched = copy.deepcopy(stock)
    fxtf.apply(patched)
    return stock, patched


def _inputs(seed: int = 1):
    input_ids, labels = _batch(seed)
    return dict(input_ids=input_ids, labels=labels)


def _batch(seed: int = 1):
    """input_ids and labels (BATCH, SEQ); the labels padded with -100 at both ends of a row, as a
    collator's padding and a prompt mask leave them."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=generator)
    labels = input_ids.clone()
    labels[0, :3] = -100
    labels[1, -4:] = -100
    return input_ids, labels


def _loss_and_grads(model, **inputs):
    model.zero_grad(set_to_none=True)
    output = model(**inputs)
    output.loss.backward()
    grads = {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()}
    return output, grads


def _assert_same_training_step(stock, patched, **inputs):
    """Loss and every parameter's gradient equal within float32 tolerance, and the patched model
    really took the fused path (no logits)."""
    expected, expected_grads = _loss_and_grads(stock, **inputs)
    got, grads = _loss_and_grads(patched, **inputs)
    assert got.logits is None, "the patched forward built logits: the fused path was not taken"
    assert expected.logits is not None
    torch.testing.assert_close(got.loss, expected.loss, rtol=RTOL, atol=ATOL)
    assert got.loss.dtype == expected.loss.dtype == torch.float32
    _assert_same_grads(grads, expected_grads)
    return got, expected


def _assert_same_grads(grads, expected_grads):
    """Every parameter's gradient to 1e-4 relative, with an absolute floor of 1e-5 of its own
    scale (or of 1e-8 of the largest gradient, for gradients that are zero in exact arithmetic
    and rounding noise in float32, such as an attention key's bias)."""
    assert expected_grads.keys() == grads.keys()
    largest = max((g.abs().max().item() for g in expected_grads.values() if g is not None), default=0.0)
    for name, expected_grad in expected_grads.items():
        if expected_grad is None:
            assert grads[name] is None, name
            continue
        assert grads[name] is not None, name
        scale = max(expected_grad.abs().max().item(), 1e-3 * largest)
        torch.testing.assert_close(
            grads[name], expected_grad, rtol=1e-4, atol=1e-5 * scale + 1e-12, msg=lambda m, name=name: f"{name}: {m}"
        )


# ----------------------------------------------------------------------------------------
# Same loss and gradients as stock, per family
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["labels", "shift_labels", "num_items_in_batch"])
@pytest.mark.parametrize("family", FAMILIES)
def test_family_matches_stock(family, variant):
    stock, patched = _pair(family)
    input_ids, labels = _batch()
    inputs = dict(input_ids=input_ids, labels=labels)
    if variant == "shift_labels":
        # Pre-shifted targets aligned with the logits: the labels are then ignored (so they are
        # scrambled here to prove it), as in ForCausalLMLoss.
        shift = torch.full_like(labels, -100)
        shift[:, :-1] = labels[:, 1:]
        shift[1, 2] = -100
        inputs.update(shift_labels=shift, labels=torch.randint(3, VOCAB, labels.shape))
    elif variant == "num_items_in_batch":
        # A tensor divisor, as the Trainer passes: a count over several micro-batches, larger
        # than this batch's own count (so a mean would give another number).
        inputs.update(num_items_in_batch=torch.tensor(37))
    _assert_same_training_step(stock, patched, **inputs)


def test_num_items_in_batch_divides_the_sum():
    stock, patched = _pair("llama")
    input_ids, labels = _batch()
    summed = patched(input_ids=input_ids, labels=labels, num_items_in_batch=1).loss
    counted = int((labels[:, 1:] != -100).sum())
    mean = patched(input_ids=input_ids, labels=labels).loss
    torch.testing.assert_close(summed / counted, mean, rtol=RTOL, atol=ATOL)
    as_float = patched(input_ids=input_ids, labels=labels, num_items_in_batch=float(counted)).loss
    torch.testing.assert_close(as_float, mean, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_tied_embeddings(family):
    stock, patched = _pair(family, tie_word_embeddings=True)
    assert patched.lm_head.weight is patched.model.embed_tokens.weight
    input_ids, labels = _batch()
    _assert_same_training_step(stock, patched, input_ids=input_ids, labels=labels)
    # The head's gradient reached the shared parameter: it differs from the embedding-only part
    # (rows of tokens absent from the input get a gradient only through the head).
    grad = patched.model.embed_tokens.weight.grad
    absent = torch.ones(VOCAB, dtype=torch.bool)
    absent[input_ids.reshape(-1)] = False
    assert grad[absent].abs().sum() > 0


def test_softcap_is_applied():
    """The Gemma 2 cap changes the loss at this scale, so matching stock means it was applied."""
    input_ids, labels = _batch()
    capped = fxtf.apply(_model("gemma2"))
    uncapped = fxtf.apply(_model("gemma2", final_logit_softcapping=None))
    with torch.no_grad():
        a = capped(input_ids=input_ids, labels=labels).loss
        b = uncapped(input_ids=input_ids, labels=labels).loss
    assert abs(a.item() - b.item()) > 1e-3


def test_logits_to_keep():
    stock, patched = _pair("llama")
    input_ids, labels = _batch()
    keep = 5
    # The loss is over the kept positions: labels of their length, as with stock.
    _assert_same_training_step(stock, patched, input_ids=input_ids, labels=labels[:, -keep:], logits_to_keep=keep)
    for model in (stock, patched):
        with pytest.raises(ValueError, match="batch_size"):
            model(input_ids=input_ids, labels=labels, logits_to_keep=keep)


def test_kwargs_reach_the_decoder():
    """attention_mask, position_ids and output_hidden_states go to the decoder unchanged."""
    stock, patched = _pair("qwen2")
    input_ids, labels = _batch()
    mask = torch.ones_like(input_ids)
    mask[1, -4:] = 0
    got, expected = _assert_same_training_step(
        stock, patched, input_ids=input_ids, labels=labels, attention_mask=mask, output_hidden_states=True
    )
    assert len(got.hidden_states) == len(expected.hidden_states) == 3
    torch.testing.assert_close(got.hidden_states[-1], expected.hidden_states[-1])


def test_tuple_output():
    stock, patched = _pair("llama")
    input_ids, labels = _batch()
    got = patched(input_ids=input_ids, labels=labels, return_dict=False)
    expected = stock(input_ids=input_ids, labels=labels, return_dict=False)
    assert isinstance(got, tuple) and got[1] is None and len(got) == len(expected)
    torch.testing.assert_close(got[0], expected[0], rtol=RTOL, atol=ATOL)


def _spy_weight_grad(monkeypatch):
    """Records the weight_grad flag of each fused linear + cross-entropy call."""
    calls = []
    original = fastxent._linear_api.linear_cross_entropy_with_grad

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weight_grad", True))
        return original(*args, **kwargs)

    from fastxent import _torch_ops

    monkeypatch.setattr(fastxent._linear_api, "linear_cross_entropy_with_grad", spy)
    for module in (fastxent, fastxent.torch, _torch_ops):
        if hasattr(module, "linear_cross_entropy_with_grad"):
            monkeypatch.setattr(module, "linear_cross_entropy_with_grad", spy)
    return calls


def test_frozen_head_does_no_dw_work(monkeypatch):
    stock, patched = _pair("llama")
    for model in (stock, patched):
        model.lm_head.weight.requires_grad_(False)
    calls = _spy_weight_grad(monkeypatch)
    input_ids, labels = _batch()
    _assert_same_training_step(stock, patched, input_ids=input_ids, labels=labels)
    assert calls == [False]
    assert patched.lm_head.weight.grad is None


def test_peft_modules_to_save_head(monkeypatch):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    stock = peft.get_peft_model(_model("llama"), config)
    patched = copy.deepcopy(stock)
    fxtf.apply(patched)
    head = patched.get_base_model().lm_head
    assert type(head).__name__ == "ModulesToSaveWrapper"
    calls = _spy_weight_grad(monkeypatch)
    input_ids, labels = _batch()
    _assert_same_training_step(stock, patched, input_ids=input_ids, labels=labels)
    # The adapter's copy of the head trains; the original stays frozen and unused.
    assert calls == [True]
    assert head.modules_to_save["default"].weight.grad is not None
    assert head.original_module.weight.grad is None


# ----------------------------------------------------------------------------------------
# Where the stock forward still runs
# ----------------------------------------------------------------------------------------


def test_real_logits_without_labels_or_in_eval():
    stock, patched = _pair("gemma2")
    input_ids, labels = _batch()
    with torch.no_grad():
        torch.testing.assert_close(patched(input_ids=input_ids).logits, stock(input_ids=input_ids).logits)
        stock.eval()
        patched.eval()
        got = patched(input_ids=input_ids, labels=labels)
        expected = stock(input_ids=input_ids, labels=labels)
    torch.testing.assert_close(got.logits, expected.logits)
    torch.testing.assert_close(got.loss, expected.loss)


def test_generate_gives_the_same_tokens():
    stock, patched = _pair("llama")
    prompt = _batch()[0][:, :4]
    for model in (stock, patched):
        model.eval()
    expected = stock.generate(prompt, max_new_tokens=6, do_sample=False)
    got = patched.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, expected) and got.shape == (BATCH, 10)


def test_custom_loss_function_runs_stock():
    stock, patched = _pair("llama")
    seen = []

    def loss_function(logits, labels, vocab_size, **kwargs):
        seen.append(logits.shape)
        return logits.float().mean()

    patched.loss_function = loss_function
    output = patched(**_inputs())
    assert seen == [(BATCH, SEQ, VOCAB)] and output.logits is not None


def test_not_a_causal_lm_is_refused():
    with pytest.raises(TypeError, match="ForCausalLM"):
        fxtf.apply(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="ForCausalLM"):
        fxtf.apply(transformers.LlamaModel)


# ----------------------------------------------------------------------------------------
# What the forward does to the logits: traced, fused where reproducible, else stock with a warning
# ----------------------------------------------------------------------------------------

# Forward hooks on the head: each returns what the forward then works with (a hook's output
# replaces the head's), traced like the model's own code. (hook, fused?)
HEAD_HOOKS = {
    "scale": (lambda module, args, out: 3.0 * out, True),
    "divide by a 0-d tensor": (lambda module, args, out: out / torch.tensor(0.25), True),
    "in place": (lambda module, args, out: out.mul_(0.5), True),
    "softcap, scale, upcast": (
        lambda module, args, out: (torch.tanh(out.float() * 20.0) / 20.0).contiguous() * 2.0,
        True,
    ),
    "negative cap": (lambda module, args, out: torch.tanh(out * 30.0) * -0.5, True),
    "add": (lambda module, args, out: out + 1.0, False),
    "tanh twice": (lambda module, args, out: torch.tanh(torch.tanh(out)), False),
    "stack": (lambda module, args, out: torch.stack([out, out]).sum(0), False),
    "per-class scale": (lambda module, args, out: out * torch.linspace(0.5, 1.5, VOCAB), False),
    "learnable scale": (lambda module, args, out: out * module.learnable, False),
    "downcast": (lambda module, args, out: out.to(torch.bfloat16), False),
    "log-softmax": (lambda module, args, out: out - torch.logsumexp(out, -1, keepdim=True), False),
}


@pytest.mark.parametrize("hook", HEAD_HOOKS)
def test_logit_transforms_traced(hook):
    """A reproducible transform of the logits is fused; anything else runs stock with a
    FallbackWarning naming it. Either way: stock's loss and gradients."""
    function, fused = HEAD_HOOKS[hook]
    stock, patched = _pair("llama")
    for model in (stock, patched):
        model.lm_head.learnable = torch.nn.Parameter(torch.tensor(1.5))
        model.lm_head.register_forward_hook(function)
    input_ids, labels = _batch()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        expected, expected_grads = _loss_and_grads(stock, input_ids=input_ids, labels=labels)
        got, grads = _loss_and_grads(patched, input_ids=input_ids, labels=labels)
    fallbacks = [str(w.message) for w in caught if issubclass(w.category, fxtf.FallbackWarning)]
    assert (got.logits is None) == fused and len(fallbacks) == (0 if fused else 1), fallbacks
    torch.testing.assert_close(got.loss, expected.loss, rtol=RTOL, atol=ATOL)
    _assert_same_grads(grads, expected_grads)
    if not fused:
        assert "LlamaForCausalLM.forward" in fallbacks[0] and "stock forward" in fallbacks[0]
        with warnings.catch_warnings():
            warnings.simplefilter("error", fxtf.FallbackWarning)
            with pytest.raises(fxtf.FallbackWarning):
                patched(input_ids=input_ids, labels=labels)


def test_fallback_keeps_the_dropout_masks():
    """A fallback reruns the forward from the random state of the call: with dropout, the same
    loss as one stock call from that state."""
    stock, patched = _pair("llama", attention_dropout=0.5)
    for model in (stock, patched):
        model.lm_head.register_forward_hook(lambda module, args, out: out + 1.0)
    inputs = _inputs()
    torch.manual_seed(11)
    expected = stock(**inputs).loss
    torch.manual_seed(11)
    with pytest.warns(fxtf.FallbackWarning):
        got = patched(**inputs).loss
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)
    torch.manual_seed(12)
    assert abs(stock(**inputs).loss.item() - expected.item()) > 1e-4  # the dropout is effective


def test_router_aux_loss_reaches_the_router():
    """Mixtral with output_router_logits: the stock code adds router_aux_loss_coef * aux_loss to
    the fused loss, so the router's gate gets the auxiliary loss's gradient as in stock."""
    stock, why = _build_tiny("MixtralForCausalLM")
    assert stock is not None, why
    assert stock.config.output_router_logits and stock.config.router_aux_loss_coef == 0.5
    expected, got, fallbacks = _stock_and_patched(stock)
    assert fallbacks == [] and got[0].logits is None
    _assert_same_step(expected, got)
    torch.testing.assert_close(got[0].aux_loss, expected[0].aux_loss)
    gates = [name for name in got[1] if name.endswith("gate.weight")]
    assert gates and all(got[1][name].abs().sum() > 0 for name in gates)

    # Switched on by the call's argument instead of the config: the same, traced per call.
    plain, why = _build_tiny("MixtralForCausalLM", features=False)
    patched = fxtf.apply(copy.deepcopy(plain))
    inputs = dict(_sweep_batch(), output_router_logits=True)
    expected = _loss_and_grads(plain, **inputs)
    got = _loss_and_grads(patched, **inputs)
    assert got[0].logits is None and got[0].aux_loss is not None
    _assert_same_step(expected, got)


def test_own_cross_entropy_falls_back_with_a_warning():
    """BartForCausalLM computes its own unshifted CrossEntropyLoss on logits.view(-1, V): stock
    with a FallbackWarning, stock's numbers."""
    stock, why = _build_tiny("BartForCausalLM")
    assert stock is not None, why
    expected, got, fallbacks = _stock_and_patched(stock)
    assert got[0].logits is not None and len(fallbacks) == 1 and "Tensor.view" in fallbacks[0]
    _assert_same_step(expected, got)


# ----------------------------------------------------------------------------------------
# apply / remove
# ----------------------------------------------------------------------------------------


def test_remove_restores_the_stock_forward():
    model = _model("llama")
    stock_forward = model.forward
    fxtf.apply(model)
    fxtf.apply(model)  # twice is once
    assert fxtf.is_applied(model) and model.forward.__func__ is not type(model).forward
    assert _model("llama").forward.__func__ is type(model).forward  # other instances untouched
    fxtf.remove(model)
    assert not fxtf.is_applied(model)
    assert "forward" not in model.__dict__ and model.forward == stock_forward
    # The head's and the loss's forwarders go too: no instance attribute is left behind.
    assert "forward" not in model.lm_head.__dict__ and "_loss_function" not in model.__dict__
    assert model(**_inputs()).logits is not None


@pytest.mark.parametrize("family", ["gemma2", "phi3"])
def test_compiled_family_takes_the_fused_path(family):
    """torch.compile(fullgraph=True) of a patched model: the compiled forward takes the fused
    path (no logits) and gives stock's loss and gradients, Gemma 2's softcap included."""
    stock, patched = _pair(family)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(patched, backend="aot_eager", fullgraph=True)
        expected, expected_grads = _loss_and_grads(stock, **_inputs())
        patched.zero_grad(set_to_none=True)
        got = compiled(**_inputs())
        got.loss.backward()
        assert got.logits is None, "the compiled forward built logits: the fused path was not taken"
        torch.testing.assert_close(got.loss, expected.loss, rtol=RTOL, atol=ATOL)
        grads = {name: None if p.grad is None else p.grad.clone() for name, p in patched.named_parameters()}
        _assert_same_grads(grads, expected_grads)
    finally:
        torch._dynamo.reset()


def test_a_deep_copy_computes_with_its_own_weights():
    """A deep copy of a patched model (a frozen reference policy, an EMA copy) forwards to its
    own head and loss: after its head's weights change, its fused loss is the stock loss of its
    own weights, and the original's is unchanged."""
    stock, patched = _pair("llama")
    reference = copy.deepcopy(patched)
    with torch.no_grad():
        reference.lm_head.weight.mul_(0.5)
        stock_copy = copy.deepcopy(stock)
        stock_copy.lm_head.weight.mul_(0.5)
    inputs = _inputs()
    copied = reference(**inputs)
    assert copied.logits is None, "the copy did not take the fused path"
    torch.testing.assert_close(copied.loss, stock_copy(**inputs).loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(patched(**inputs).loss, stock(**inputs).loss, rtol=1e-5, atol=1e-6)
    # Inference on the copy: its own head, real logits.
    reference.eval()
    torch.testing.assert_close(reference(**inputs).logits, stock_copy.eval()(**inputs).logits)


def test_class_level_apply_and_remove():
    cls = transformers.MistralForCausalLM
    stock_forward = cls.forward
    try:
        fxtf.apply(cls)
        assert fxtf.is_applied(cls)
        model = _model("mistral")  # built after the patch
        assert fxtf.is_applied(model)
        assert model(**_inputs()).logits is None
    finally:
        fxtf.remove(cls)
    assert cls.forward is stock_forward and not fxtf.is_applied(cls)
    assert _model("mistral")(**_inputs()).logits is not None


# ----------------------------------------------------------------------------------------
# The logits-based drop-in
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["labels", "shift_labels", "num_items_in_batch"])
def test_causal_lm_loss_drop_in(variant):
    stock = _model("phi3")
    model = copy.deepcopy(stock)
    model.loss_function = fxtf.causal_lm_loss
    input_ids, labels = _batch()
    inputs = dict(input_ids=input_ids, labels=labels)
    if variant == "shift_labels":
        inputs["shift_labels"] = torch.roll(labels, -1, dims=1)
    elif variant == "num_items_in_batch":
        inputs["num_items_in_batch"] = torch.tensor(23.0)
    expected, expected_grads = _loss_and_grads(stock, **inputs)
    got, grads = _loss_and_grads(model, **inputs)
    torch.testing.assert_close(got.loss, expected.loss, rtol=RTOL, atol=ATOL)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-7, msg=name)


def test_fused_forward_with_drop_in_loss_function():
    """A model whose loss_function is the drop-in keeps the fused path (same semantics)."""
    stock, patched = _pair("llama")
    patched.loss_function = fxtf.causal_lm_loss
    input_ids, labels = _batch()
    _assert_same_training_step(stock, patched, input_ids=input_ids, labels=labels)


# ----------------------------------------------------------------------------------------
# Trainer with gradient accumulation
# ----------------------------------------------------------------------------------------


def _dataset():
    """8 examples of varied length, padded to 12 (labels -100 on the padding): with gradient
    accumulation the Trainer's num_items_in_batch, not a per-micro-batch mean, weights them."""
    generator = torch.Generator().manual_seed(3)
    rows = []
    for i in range(8):
        length = 4 + (i * 5) % 9
        ids = torch.randint(3, VOCAB, (SEQ,), generator=generator)
        ids[length:] = 0
        mask = (torch.arange(SEQ) < length).long()
        labels = ids.masked_fill(mask == 0, -100)
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return rows


def _train(model, tmp_path):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=3,
        # Plain SGD: the weights then differ from stock by the gradients' difference times the
        # learning rate (Adam divides tiny gradients by their own size and magnifies it).
        optim="sgd",
        learning_rate=1.0,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_dataset())
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_trainer_gradient_accumulation(tmp_path, monkeypatch):
    stock, patched = _pair("llama")
    expected = _train(stock, tmp_path / "stock")
    divisors = []
    divide = fxtf._divide_by_items
    monkeypatch.setattr(fxtf, "_divide_by_items", lambda loss, n: divisors.append(n) or divide(loss, n))
    got = _train(patched, tmp_path / "patched")
    # The fused path ran for each of the 3 x 2 micro-batches with the Trainer's item count.
    assert len(divisors) == 6 and all(torch.is_tensor(n) for n in divisors)
    assert len(expected) == 3
    assert got == pytest.approx(expected, rel=1e-4)
    # The losses move (the steps trained), and the trained weights agree.
    assert expected[0] != expected[-1]
    for (name, p), q in zip(patched.named_parameters(), stock.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_bfloat16_model():
    """A bfloat16 model: the fused path (float32 inside) against stock's bfloat16 logits, to
    bfloat16's precision; gradients point the same way."""
    stock, patched = _pair("qwen3")
    for model in (stock, patched):
        model.to(torch.bfloat16)
    input_ids, labels = _batch()
    expected, expected_grads = _loss_and_grads(stock, input_ids=input_ids, labels=labels)
    got, grads = _loss_and_grads(patched, input_ids=input_ids, labels=labels)
    assert got.logits is None and got.loss.dtype == torch.float32
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-2, atol=0)
    for name, expected_grad in expected_grads.items():
        a, b = grads[name].float().reshape(-1), expected_grad.float().reshape(-1)
        assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.98, name


def test_autocast_bfloat16():
    """Under CPU autocast the hidden states reach the float32 head in bfloat16; the fused loss
    computes in float32, stock in bfloat16: equal to bfloat16's precision."""
    stock, patched = _pair("llama")
    input_ids, labels = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = stock(input_ids=input_ids, labels=labels)
        got = patched(input_ids=input_ids, labels=labels)
    assert got.logits is None
    torch.testing.assert_close(got.loss, expected.loss.float(), rtol=1e-2, atol=0)
    got.loss.backward()
    assert patched.lm_head.weight.grad is not None and patched.lm_head.weight.grad.dtype == torch.float32


def test_head_not_called_as_a_module_falls_back_to_stock_loss(monkeypatch):
    """If the forward never calls the head module (it uses its weight directly), the real logits
    it built get transformers' loss, not a wrong fused one."""
    stock, patched = _pair("llama")
    unused = torch.nn.Linear(32, VOCAB, bias=False)
    monkeypatch.setattr(fxtf, "_head_linears", lambda head: [unused])
    input_ids, labels = _batch()
    got = patched(input_ids=input_ids, labels=labels, num_items_in_batch=torch.tensor(9))
    expected = stock(input_ids=input_ids, labels=labels, num_items_in_batch=torch.tensor(9))
    assert got.logits is not None
    torch.testing.assert_close(got.loss, expected.loss)


def test_gradient_checkpointing():
    stock, patched = _pair("qwen2")
    for model in (stock, patched):
        model.gradient_checkpointing_enable()
    input_ids, labels = _batch()
    _assert_same_training_step(stock, patched, input_ids=input_ids, labels=labels)


def test_apply_to_families():
    stock_forwards = {name: getattr(transformers, name).forward for name in fxtf.FAMILIES}
    try:
        patched = fxtf.apply_to_families()
        assert [cls.__name__ for cls in patched] == list(fxtf.FAMILIES)
        assert all(fxtf.is_applied(cls) for cls in patched)
    finally:
        for name in fxtf.FAMILIES:
            fxtf.remove(getattr(transformers, name))
    assert all(getattr(transformers, name).forward is stock_forwards[name] for name in fxtf.FAMILIES)


# ----------------------------------------------------------------------------------------
# Every causal LM class: fused and equal to stock, or stock with a warning
# ----------------------------------------------------------------------------------------

# Small sizes for whichever of these keys a class's config has (its defaults are a real model's).
TINY = dict(
    vocab_size=96,
    hidden_size=32,
    d_model=32,
    n_embd=32,
    embedding_size=32,
    intermediate_size=64,
    ffn_dim=64,
    decoder_ffn_dim=64,
    encoder_ffn_dim=64,
    n_inner=64,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=32,
    num_hidden_layers=2,
    n_layer=2,
    num_layers=2,
    decoder_layers=2,
    encoder_layers=2,
    num_attention_heads=4,
    n_head=4,
    num_heads=4,
    decoder_attention_heads=4,
    encoder_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    num_experts=4,
    num_local_experts=4,
    n_routed_experts=4,
    moe_num_experts=4,
    num_experts_per_tok=2,
    q_lora_rank=16,
    kv_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=8,
    qk_head_dim=16,
    rotary_dim=4,
    mamba_chunk_size=8,
    chunk_size=8,
    mamba_d_ssm=32,
    mamba_n_heads=4,
    mamba_d_head=8,
    mamba_d_state=8,
    state_size=8,
    ssm_state_size=8,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=8,
    linear_value_head_dim=8,
)
# Per-layer type lists keep one layer of each distinct type, in order (a hybrid keeps both kinds).
LAYER_LISTS = ("layer_types", "block_types", "layers_block_type")
# The logit transforms and loss terms the fused path must reproduce, switched on (at values that
# change the tiny models' loss) wherever a config has them.
FEATURES = dict(
    output_router_logits=True,
    router_aux_loss_coef=0.5,
    logits_scaling=4.0,
    logit_scale=0.5,
    lm_head_multiplier=0.25,
    final_logit_softcapping=0.05,
    logits_soft_cap=0.05,
    output_logit_soft_cap=0.05,
    unpadded_vocab_size=80,
)
SWEEP_TOKENS = 80  # input ids and labels below every tiny vocabulary, unpadded_vocab_size included
MAX_PARAMETERS = 4_000_000  # counted on the meta device first: some defaults stay huge

# The documented families and the models the fused transforms came from: always fused.
FUSED_CLASSES = fxtf.FAMILIES + ("FalconH1ForCausalLM", "RecurrentGemmaForCausalLM", "InklingForCausalLM")


def _tiny_config(cls, features=True, **overrides):
    """cls's config from its defaults with small sizes, no dropout, special token ids inside the
    vocabulary, and (with features) the FEATURES it has switched on."""
    defaults = cls.config_class().to_dict()
    options = {
        key: value
        for key, value in TINY.items()
        if isinstance(defaults.get(key), int) and not isinstance(defaults.get(key), bool)
    }
    if defaults.get("num_key_value_heads") == defaults.get("num_attention_heads") and "num_key_value_heads" in options:
        # Multi-head (not grouped) attention by default, which some classes require.
        options["num_key_value_heads"] = options["num_attention_heads"]
    for key, value in zip(("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id"), (0, 1, 2, 2), strict=True):
        if isinstance(defaults.get(key), int):
            options[key] = value
    for key in LAYER_LISTS:
        if isinstance(defaults.get(key), list) and defaults[key]:
            options[key] = list(dict.fromkeys(defaults[key]))
            for layers in ("num_hidden_layers", "num_layers"):
                if layers in defaults:
                    options[layers] = len(options[key])
    layers = options.get("num_hidden_layers", 2)
    if isinstance(defaults.get("mlp_layer_types"), list):
        options["mlp_layer_types"] = (defaults["mlp_layer_types"] * layers)[:layers]
    for key, value in defaults.items():
        # Dropout (and router jitter) off: stock and patched then compute the same function.
        if isinstance(value, float) and value > 0 and any(word in key for word in ("dropout", "pdrop", "jitter")):
            options[key] = 0.0
    if features:
        options.update({key: value for key, value in FEATURES.items() if key in defaults})
    options.update(overrides)
    return cls.config_class(**options)


def _build_tiny(name, features=True, **overrides):
    """(model in training mode, None), or (None, why it cannot be built tiny on the CPU)."""
    cls = getattr(transformers, name)
    try:
        config = _tiny_config(cls, features, **overrides)
        with torch.device("meta"):
            parameters = sum(p.numel() for p in cls(config).parameters())
        if parameters > MAX_PARAMETERS:
            return None, f"{parameters} parameters at the smallest sizes tried"
        torch.manual_seed(0)
        return cls(config).train(), None
    except Exception as error:  # noqa: BLE001 - any failure to build is reported as a skip
        return None, f"not buildable tiny: {type(error).__name__}: {str(error).splitlines()[0][:100]}"


def _sweep_batch():
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, SWEEP_TOKENS, (2, 6), generator=generator)
    labels = input_ids.clone()
    labels[0, :2] = -100
    return dict(input_ids=input_ids, labels=labels)


def _stock_and_patched(stock):
    """Stock's and the patched copy's training step on one batch: (stock (output, grads) or the
    error stock raises, patched (output, grads), the FallbackWarnings of the patched step)."""
    inputs = _sweep_batch()
    # Copied first: some models keep non-leaf tensors after a step, which deepcopy refuses.
    patched = copy.deepcopy(stock)
    try:
        expected = _loss_and_grads(stock, **inputs)
    except Exception as error:  # noqa: BLE001 - a model that cannot train tiny is reported
        return f"stock step fails tiny: {type(error).__name__}: {str(error).splitlines()[0][:100]}", None, None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fxtf.apply(patched)
        got = _loss_and_grads(patched, **inputs)
    fallbacks = [str(w.message) for w in caught if issubclass(w.category, fxtf.FallbackWarning)]
    return expected, got, fallbacks


def _assert_same_step(expected, got):
    (expected_output, expected_grads), (output, grads) = expected, got
    torch.testing.assert_close(output.loss, expected_output.loss, rtol=1e-5, atol=0)
    _assert_same_grads(grads, expected_grads)


@pytest.mark.parametrize("name", FUSED_CLASSES)
def test_documented_family_fused_and_equal(name):
    """Each documented family (and the models with a logit scale, softcap, padded vocabulary or
    router auxiliary loss) trains through the fused path with stock's loss and gradients, its
    transform or loss term switched on at a value that changes the loss."""
    if not hasattr(transformers, name):
        pytest.skip(f"transformers {transformers.__version__} has no {name}")
    stock, why = _build_tiny(name)
    assert stock is not None, why
    expected, got, fallbacks = _stock_and_patched(stock)
    assert got is not None, expected
    assert fallbacks == [] and got[0].logits is None, fallbacks
    _assert_same_step(expected, got)
    switched_on = [key for key in FEATURES if key in stock.config.to_dict()]
    if switched_on:
        plain, why = _build_tiny(name, features=False)
        plain_loss = plain(**_sweep_batch()).loss.item()
        assert abs(plain_loss - expected[0].loss.item()) > 1e-3, f"{switched_on} did not change the loss"


def _sweep(names, outcomes, failures):
    """Fills outcomes (class name: what happened) and failures (stock and patched differ)."""
    for name in names:
        began = time.perf_counter()
        stock, why = _build_tiny(name)
        if stock is None:
            outcomes[name] = f"skipped: {why}"
            continue
        expected, got, fallbacks = _stock_and_patched(stock)
        if got is None:
            outcomes[name] = f"skipped: {expected}"
            continue
        try:
            _assert_same_step(expected, got)
        except AssertionError as error:
            failures.append(f"{name}: {str(error).splitlines()[0]}")
        if got[0].logits is None:
            outcomes[name] = "fused"
        elif fallbacks:
            outcomes[name] = f"stock, warned: {fallbacks[0][:110]}"
        else:
            head = stock.get_output_embeddings()
            outcomes[name] = f"stock: head is {type(head).__name__}"
            if fxtf._head_linears(head) is not None:
                failures.append(f"{name}: ran stock without a warning")
        outcomes[name] = f"{time.perf_counter() - began:4.1f} s  {outcomes[name]}"


@pytest.mark.exhaustive
def test_every_causal_lm_class():
    """Every *ForCausalLM class of the installed transformers that builds tiny on the CPU: the
    patched training step gives stock's loss and gradients, either fused (no logits) or through
    the stock forward with a FallbackWarning (or the apply-time warning for a head that is not an
    nn.Linear). The table of outcomes, skips with their reasons, is printed (pytest -s)."""
    names = sorted(n for n in dir(transformers) if n.endswith("ForCausalLM") and n != "AutoModelForCausalLM")
    outcomes, failures = {}, []
    started, cpu_started = time.perf_counter(), time.process_time()
    # One thread: the models are tiny, and threads only contend on a shared machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _sweep(names, outcomes, failures)
    finally:
        torch.set_num_threads(threads)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    print(f"\n{len(names)} *ForCausalLM classes in {wall:.0f} s ({cpu:.0f} s of CPU time):")
    for name, outcome in outcomes.items():
        print(f"  {name:36s} {outcome}")
    assert not failures, "\n".join(failures)
    fused = [name for name, outcome in outcomes.items() if outcome.endswith("s  fused")]
    assert set(FUSED_CLASSES) & set(names) <= set(fused)
    # The sweep really exercises the fused path (guards against a change that skips everything).
    assert len(fused) >= len(names) // 2, outcomes

"""Hugging Face transformers integration (fastxent.transformers): tiny random causal LMs of each
covered family, built in code, patched against stock: the same loss and the same gradient for
every parameter, the transformers semantics the fused forward keeps (shifted labels,
shift_labels, -100 padding, num_items_in_batch, logits_to_keep, softcap, tied and frozen heads,
PEFT), Trainer with gradient accumulation, generate, and remove."""

from __future__ import annotations

import copy

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
    assert expected_grads.keys() == grads.keys()
    for name, expected_grad in expected_grads.items():
        if expected_grad is None:
            assert grads[name] is None, name
            continue
        assert grads[name] is not None, name
        scale = expected_grad.abs().max().item()
        torch.testing.assert_close(
            grads[name], expected_grad, rtol=1e-4, atol=1e-5 * scale + 1e-9, msg=lambda m, name=name: f"{name}: {m}"
        )
    return got, expected


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


def test_unsupported_logit_scale_is_refused():
    config = transformers.CohereConfig(**dict(COMMON, logit_scale=0.5))
    with pytest.raises(ValueError, match="logit_scale"):
        fxtf.apply(transformers.CohereForCausalLM(config))
    with pytest.raises(TypeError):
        fxtf.apply(torch.nn.Linear(2, 2))


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
    assert model(**_inputs()).logits is not None


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

"""FSDP2 (``fully_shard``) with ``fastxent.transformers.apply`` on a tiny Llama, one training
step per variant, against the stock model (run by ``dtensor_worker.py`` on each Gloo rank).

The reference is the stock model without FSDP on this rank's batch, its gradients averaged
over the ranks (what FSDP2's reduce-scatter gives). Each variant records this rank's loss, the
gathered gradients of the head and of every parameter, and how many times the fused
``fastxent.torch.linear_cross_entropy`` ran (0 would mean the stock loss ran instead).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import fastxent.torch as ft
import fastxent.transformers as fxt

VOCAB, SEQ, BATCH = 64, 6, 2


def _tiny_llama(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)  # the same weights on every rank
    return LlamaForCausalLM(config).train()


def _batch(seed: int, rank: int):
    gen = torch.Generator().manual_seed(seed * 10 + rank)  # each rank its own data
    input_ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    labels = input_ids.clone()
    labels[0, :2] = -100  # padding that counts for nothing
    return input_ids, labels


def _full(tensor):
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().double().numpy()


def _shard(model, *, head_unit: bool):
    for layer in model.model.layers:
        fully_shard(layer)
    if head_unit:
        # The head as its own unit (as torchtitan does with the final norm and output layer):
        # its weight is gathered only during its own forward.
        fully_shard(model.lm_head)
    fully_shard(model)
    return model


def fsdp_cases(rec, seed: int) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    base = _tiny_llama(seed)
    input_ids, labels = _batch(seed, rank)

    # The stock model on this rank's batch, gradients averaged over the ranks.
    stock = copy.deepcopy(base)
    loss = stock(input_ids=input_ids, labels=labels).loss
    loss.backward()
    rec.put("fsdp/ref/loss", loss.detach().double().numpy())
    for name, param in stock.named_parameters():
        grad = param.grad.detach().clone()
        dist.all_reduce(grad)
        rec.put(f"fsdp/ref/grad/{name}", (grad / world).double().numpy())

    calls = {"n": 0}
    fused = ft.linear_cross_entropy

    def counting(*args, **kwargs):
        calls["n"] += 1
        return fused(*args, **kwargs)

    variants = {
        "stock-fsdp": lambda m: _shard(m, head_unit=False),
        "apply-before": lambda m: _shard(fxt.apply(m), head_unit=False),
        "apply-after": lambda m: fxt.apply(_shard(m, head_unit=False)),
        "head-unit-before": lambda m: _shard(fxt.apply(m), head_unit=True),
        "head-unit-after": lambda m: fxt.apply(_shard(m, head_unit=True)),
    }
    ft.linear_cross_entropy = counting
    try:
        for variant, build in variants.items():
            calls["n"] = 0
            model = build(copy.deepcopy(base))
            error = None
            try:
                output = model(input_ids=input_ids, labels=labels)
                output.loss.backward()
            except Exception as problem:  # recorded, asserted by the test
                error = f"{type(problem).__name__}: {problem}"
            rec.note(f"fsdp/{variant}/error", error)
            rec.put(f"fsdp/{variant}/fused_calls", np.array(calls["n"]))
            if error is not None:
                continue
            rec.put(f"fsdp/{variant}/loss", output.loss.detach().double().numpy())
            rec.put(f"fsdp/{variant}/logits_none", np.array(output.logits is None))
            for name, param in model.named_parameters():
                rec.put(f"fsdp/{variant}/grad/{name}", _full(param.grad))
    finally:
        ft.linear_cross_entropy = fused

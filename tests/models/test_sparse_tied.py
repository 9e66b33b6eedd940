"""Tied input/output embeddings get the lookup's gradient as sparse rows added into the LM head's
(``heed.models.lm.sparse_tied_embedding``): the same gradient as the dense one on every architecture,
and a gradient that is still sparse (the LM head not in the loss) is made dense before the optimizer."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from archs import CAUSAL, causal_config, micro_tokenizer
from heed.models.lm import sparse_tied_embedding
from heed.train.loop import optimizer_step

TIED = ("llama", "qwen2", "gemma2", "gemma3", "gpt2", "opt", "bloom", "olmo2")


@pytest.fixture(scope="module")
def tok() -> Any:
    return micro_tokenizer()


def tied_model(tok: Any, name: str) -> Any:
    """``name``'s test model with its LM head tied to the input embedding (eval mode: no dropout, so
    two backward passes see the same forward)."""
    import transformers

    config = causal_config(name, tok)
    config.tie_word_embeddings = True
    if hasattr(config, "get_text_config"):
        config.get_text_config().tie_word_embeddings = True
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = getattr(transformers, CAUSAL[name][1])(config)
    return model.eval()


def lm_loss_grads(model: Any, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every parameter's gradient of the next-token loss on ``ids`` (B, T)."""
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", TIED)
def test_sparse_lookup_gradient_equals_the_dense_one(tok: Any, name: str) -> None:
    model = tied_model(tok, name)
    emb = model.get_input_embeddings()
    assert model.get_output_embeddings().weight is emb.weight, f"{name} is not tied"
    ids = torch.randint(3, len(tok), (2, 12), generator=torch.Generator().manual_seed(1))
    dense = lm_loss_grads(model, ids)
    assert sparse_tied_embedding(model) and emb.sparse
    sparse = lm_loss_grads(model, ids)
    assert emb.weight.grad is not None and not emb.weight.grad.is_sparse  # summed into the head's
    assert dense.keys() == sparse.keys()
    for n in dense:
        torch.testing.assert_close(sparse[n], dense[n], rtol=1e-5, atol=1e-7, msg=f"{name}: {n}")
    # the flag reaches the lookup through this architecture's own forward: a loss on the trunk alone
    # leaves the lookup's gradient as it is made, sparse rows
    model.zero_grad(set_to_none=True)
    model.base_model(input_ids=ids).last_hidden_state.square().mean().backward()
    assert emb.weight.grad is not None and emb.weight.grad.is_sparse, name


def test_other_models_are_left_alone(tok: Any) -> None:
    import transformers

    config = causal_config("llama", tok)
    config.tie_word_embeddings = False
    untied = transformers.LlamaForCausalLM(config)
    assert not sparse_tied_embedding(untied) and not untied.get_input_embeddings().sparse
    frozen = tied_model(tok, "qwen2")
    frozen.get_input_embeddings().weight.requires_grad_(False)
    assert not sparse_tied_embedding(frozen)
    scorer = transformers.LlamaForSequenceClassification(causal_config("llama", tok))
    assert not sparse_tied_embedding(scorer)


def test_a_gradient_left_sparse_is_made_dense_before_the_optimizer(tok: Any) -> None:
    """A loss that reads the trunk alone (no LM head): the tied matrix's only gradient is the lookup's
    sparse one; the optimizer step must still run (fused AdamW takes no sparse gradients) and move
    exactly the looked-up rows."""
    model = tied_model(tok, "qwen2")
    assert sparse_tied_embedding(model)
    weight = model.get_input_embeddings().weight
    ids = torch.tensor([[5, 9, 11, 9]])
    model.model(input_ids=ids).last_hidden_state.square().mean().backward()
    assert weight.grad is not None and weight.grad.is_sparse
    before = weight.detach().clone()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    from accelerate import Accelerator

    optimizer_step(Accelerator(cpu=True), params, optimizer, scheduler, 1.0, 0.5, 1, "test")
    moved = (weight.detach() != before).any(-1).nonzero().squeeze(-1).tolist()
    assert moved == [5, 9, 11]

"""The parts of the vLLM engine that run without a GPU: the weights it pushes (a LoRA policy merged
under plain checkpoint names), the per-prompt request seeds, and the one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from heed.config.base import LoraConfig
from heed.errors import ConfigError
from heed.models.loading import load_causal_lm
from heed.models.lora import apply_lora
from heed.rollout.sampler import row_keys
from heed.rollout.vllm_engine import check_vllm, policy_weights, request_seeds


def test_pushed_weights_are_the_merged_policy_under_checkpoint_names(micro_sft_model: Path) -> None:
    base = load_causal_lm(micro_sft_model)
    names = {n for n, _ in base.named_parameters()}
    model = apply_lora(
        load_causal_lm(micro_sft_model), LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    )
    with torch.no_grad():  # a non-zero adapter: B starts at zero in peft
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    ids = torch.tensor([[5, 6, 7, 8]])
    before = model(input_ids=ids).logits.detach().clone()
    pushed = {n: t.clone() for n, t in policy_weights(model)}
    assert set(pushed) == names  # exactly the plain model's parameters, no adapter tensors
    # q_proj of layer 0: W + (alpha / r) · B · A
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    expected = (
        layer.base_layer.weight + (8 / 4) * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    )
    assert torch.allclose(pushed["model.layers.0.self_attn.q_proj.weight"], expected, atol=1e-6)
    assert torch.equal(pushed["model.layers.0.mlp.up_proj.weight"], base.model.layers[0].mlp.up_proj.weight)
    # unmerged again: the policy computes what it computed before the push
    assert torch.allclose(model(input_ids=ids).logits, before, atol=1e-5)


def test_plain_model_weights_pass_through(micro_sft_model: Path) -> None:
    model = load_causal_lm(micro_sft_model)
    pushed = dict(policy_weights(model))
    assert pushed.keys() == dict(model.named_parameters()).keys()


def test_request_seeds_follow_the_answer_keys() -> None:
    keys = row_keys(0, list(range(6)))  # 3 prompts x 2 answers
    seeds = request_seeds(keys, 3, 2)
    assert seeds == [int(keys[0]) & (2**63 - 1), int(keys[2]) & (2**63 - 1), int(keys[4]) & (2**63 - 1)]
    assert all(0 <= s < 2**63 for s in seeds) and len(set(seeds)) == 3
    assert request_seeds(None, 2, 4) == [None, None]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_no_gpu_is_a_one_line_error() -> None:
    with pytest.raises(ConfigError, match="needs a CUDA GPU") as err:
        check_vllm()
    assert "\n" not in str(err.value)

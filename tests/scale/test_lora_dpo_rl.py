"""DPO and RL with LoRA: the reference is the policy's base with the adapter disabled, never a
second model; the PPO value head trains alongside the adapter."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from heed.config import config_from_dict
from heed.config.dpo import DPOConfig
from heed.config.rl import RLConfig
from heed.data.io import write_jsonl
from heed.demo.builtin import resolve_config

torch.set_num_threads(1)
LORA = {"r": 8, "alpha": 16, "target_modules": "all-linear"}


@pytest.fixture
def count_loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every causal LM the trainers load from disk (the trainers import the loader at call time)."""
    import heed.models.loading as loading

    loaded: list[str] = []
    real = loading.load_causal_lm

    def counting(path: Any, *args: Any, **kwargs: Any) -> Any:
        loaded.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(loading, "load_causal_lm", counting)
    return loaded


def test_dpo_with_lora_uses_the_disabled_adapter_as_reference(
    micro_sft_model: Path, tmp_path: Path, count_loads: list[str]
) -> None:
    from peft import PeftModel

    from heed.config.dpo import DPOLossConfig
    from heed.data.pairs import encode_pairs, expand_pairs
    from heed.demo.preferences import make_pairs
    from heed.models.forward import collate_pairs, pair_logps
    from heed.train.dpo import _reference, train_dpo

    write_jsonl(tmp_path / "train.jsonl", make_pairs(96, seed=0))
    write_jsonl(tmp_path / "eval.jsonl", make_pairs(32, seed=1, heldout=True))
    cfg = config_from_dict(
        DPOConfig,
        {
            "model": {"path": str(micro_sft_model), "lora": LORA},
            "data": {
                "train": str(tmp_path / "train.jsonl"),
                "eval": str(tmp_path / "eval.jsonl"),
                "max_length": 80,
            },
            "train": {
                "batch_size": 16,
                "max_steps": 12,
                "precompute_ref": False,
            },  # reference forward every batch
            "optim": {"lr": 3e-3, "warmup_steps": 2},
            "log": {"log_every": 2, "progress": False},
            "sample": {"num_prompts": 2},
            "out": str(tmp_path / "run"),
        },
    )
    summary = train_dpo(cfg)
    assert count_loads == [str(micro_sft_model)]  # the policy only: no reference copy, even for the samples
    assert summary["eval/margin"] > 0 and summary["eval/loss"] < math.log(2)
    assert summary["kl/k1"] > 0  # the samples' KL is measured against the base, not against the policy itself

    # the reference log-probs of the tuned LoRA model equal the plain base model's
    from heed.models.loading import load_causal_lm, load_tokenizer

    tok = load_tokenizer(micro_sft_model)
    base = load_causal_lm(micro_sft_model).eval()
    tuned = PeftModel.from_pretrained(load_causal_lm(micro_sft_model), str(tmp_path / "run" / "final")).eval()
    pairs, counts = expand_pairs(
        __import__("heed.data.records", fromlist=["x"]).load_records(tmp_path / "eval.jsonl", "preferences")[
            :8
        ]
    )
    data = encode_pairs(tok, pairs, False, 80, counts)
    ids, att, mask = collate_pairs(data.chosen, data.rejected, tok.pad_token_id)
    loss_cfg = DPOLossConfig()
    ref_sum, _ = _reference(list(range(len(data))), None, tuned, ids, att, mask, loss_cfg)
    with torch.no_grad():
        want = pair_logps(base, ids, att, mask).logps
        policy = pair_logps(tuned, ids, att, mask).logps
    assert torch.allclose(ref_sum, want, atol=1e-5)
    assert (policy - want).abs().max() > 1e-3  # while the adapter itself has moved


def _rl_cfg(out: Path, **over: Any) -> RLConfig:
    base: dict[str, Any] = {
        "model": {"path": "builtin:micro", "lora": LORA},
        "data": {"prompts": "builtin:micro:prompts_train"},
        "rewards": [{"function": "length_penalty", "args": {"per_word": 0.1}}],
        "rollout": {"prompts_per_step": 8, "k": 4, "max_new_tokens": 16},
        "optim": {"lr": 3e-3},
        "train": {"updates": 4},
        "eval": {"at_start": False},
        "log": {"progress": False},
        "out": str(out),
    }
    base.update(over)
    return resolve_config(config_from_dict(RLConfig, base, "test"))


def test_rl_with_lora_reference_is_the_base_and_value_head_trains(
    tmp_path: Path, count_loads: list[str]
) -> None:
    from heed.demo.builtin import resolve_name
    from heed.train import rl as rl_mod
    from heed.train.rl import VALUE_HEAD_FILE, train_rl

    calls: list[float] = []
    real_ref = rl_mod.reference_logprobs

    def checking(ref_model: Any, part: Any, plan: Any, temperature: float = 1.0):
        out = real_ref(ref_model, part, plan, temperature)
        with torch.no_grad():  # the base model's log-probs, computed from a plain copy loaded for the check
            want = plan.forward(plain, part, temperature).logprobs
        calls.append(float((out - want).abs().max()))
        return out

    from heed.models.loading import load_causal_lm

    plain = load_causal_lm(resolve_name("builtin:micro")).eval()
    count_loads.clear()
    rl_mod.reference_logprobs = checking
    try:
        summary = train_rl(
            _rl_cfg(
                tmp_path / "run",
                algorithm="ppo",
                update={"epochs": 2, "minibatch_size": 16},
                ppo={"critic_lr": 3e-3},
            )
        )
    finally:
        rl_mod.reference_logprobs = real_ref
    assert count_loads == [resolve_name("builtin:micro")]  # the policy only
    assert calls and max(calls) < 1e-5, calls  # reference = base, at every update and in the evaluation
    assert summary["kl/k1"] > 0  # the adapter moved the policy away from it
    final = tmp_path / "run" / "final"
    assert (final / "adapter_config.json").exists()
    head = torch.load(final / VALUE_HEAD_FILE)
    assert head["summary.weight"].abs().sum() > 0  # zero-initialised, trained alongside the adapter

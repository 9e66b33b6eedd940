"""LoRA through peft: SFT learns with only the adapter changing, merge gives a plain model with the
same logits, DPO/RL use the base with the adapter disabled as their reference, bad targets are one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from heed.config import config_from_dict
from heed.config.base import LoraConfig
from heed.config.sft import SFTConfig
from heed.errors import ConfigError
from heed.report.metrics import read_metrics

torch.set_num_threads(1)
LORA = {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"]}


def _task(tmp_path: Path, corpus_files: dict, n: int = 200) -> Path:
    # a task the model has never seen: answer every question by naming its topic
    data = tmp_path / "task.jsonl"
    rows = [json.loads(line) for line in corpus_files["chat"].read_text().splitlines()[:n]]
    data.write_text(
        "".join(
            json.dumps({"prompt": r["messages"][0]["content"], "completion": f"this is about {r['topic']}."})
            + "\n"
            for r in rows
        )
    )
    return data


def _sft_cfg(model: Path, data: Path, out: Path, **model_extra: object) -> SFTConfig:
    return config_from_dict(
        SFTConfig,
        {
            "model": {"path": str(model), **model_extra},
            "data": {"train": str(data), "max_length": 96, "eval_split": 0.1},
            "train": {"batch_size": 16, "max_steps": 30, "seed": 3},
            "optim": {"lr": 1e-2, "warmup_steps": 2},
            "log": {"log_every": 1, "progress": False},
            "out": str(out),
        },
    )


def test_sft_with_lora_learns_changes_only_the_adapter_and_merges(
    tmp_path: Path, micro_sft_model: Path, corpus_files: dict
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from heed.cli import main
    from heed.models.loading import load_causal_lm
    from heed.train.sft import train_sft

    data = _task(tmp_path, corpus_files)
    run = tmp_path / "run"
    train_sft(_sft_cfg(micro_sft_model, data, run, lora=LORA, gradient_checkpointing=True))
    rows = [r for r in read_metrics(run) if r["split"] == "train"]
    losses = [r["loss"] for r in rows]
    # measured: ~5.4 at the start, ~4.7 after 30 steps (batch-to-batch noise is ~0.15)
    assert sum(losses[-5:]) / 5 < sum(losses[:3]) / 3 - 0.4, losses
    final = run / "final"
    assert (final / "adapter_config.json").exists() and not (final / "config.json").exists()

    # only adapter tensors are saved, and the base weights under the adapter are the original ones
    base = load_causal_lm(micro_sft_model)
    tuned = PeftModel.from_pretrained(load_causal_lm(micro_sft_model), str(final))
    base_sd = base.state_dict()
    for name, p in tuned.get_base_model().named_parameters():
        if "lora_" in name:
            continue
        plain = name.replace(".base_layer", "")
        assert torch.equal(p, base_sd[plain]), name
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in tuned.named_parameters())  # B started at 0

    # heed merge: plain transformers loads it and gives the adapter model's logits
    merged_dir = tmp_path / "merged"
    main(["merge", "--adapter", str(final), "--out", str(merged_dir)])
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45]])
    with torch.no_grad():
        want = tuned.eval()(input_ids=ids).logits
        got = merged.eval()(input_ids=ids).logits
        orig = base.eval()(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    assert (got - orig).abs().max() > 1e-2  # the merge carried the learned update
    assert (merged_dir / "tokenizer.json").exists()
    # every Heed loader (heed generate, eval, a next round) takes the adapter folder as the merged model
    with torch.no_grad():
        assert torch.allclose(load_causal_lm(final).eval()(input_ids=ids).logits, want, atol=1e-4)


def test_bad_target_modules_are_one_line(micro_sft_model: Path) -> None:
    from heed.models.loading import load_causal_lm
    from heed.models.lora import apply_lora

    model = load_causal_lm(micro_sft_model)
    with pytest.raises(ConfigError) as err:
        apply_lora(model, LoraConfig(target_modules=["q_proj", "c_attn"]))
    msg = str(err.value)
    assert "\n" not in msg and "c_attn" in msg and "q_proj" in msg and "down_proj" in msg


def test_lora_on_a_scratch_model_is_a_config_error(corpus_files: dict) -> None:
    with pytest.raises(ConfigError, match=r"model\.lora"):
        config_from_dict(SFTConfig, {"model": {"init": "scratch", "lora": {}}, "data": {"train": "x.jsonl"}})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
@pytest.mark.parametrize("quantize", ["4bit", "8bit"])
def test_qlora_without_a_gpu_is_one_line(
    tmp_path: Path, micro_sft_model: Path, corpus_files: dict, quantize: str
) -> None:
    from heed.train.sft import train_sft

    cfg = _sft_cfg(
        micro_sft_model,
        _task(tmp_path, corpus_files, n=20),
        tmp_path / "q",
        lora={**LORA, "quantize": quantize},
    )
    with pytest.raises(ConfigError) as err:
        train_sft(cfg)
    msg = str(err.value)
    assert (
        "\n" not in msg
        and f"model.lora.quantize: {quantize}" in msg
        and "GPU" in msg
        and "quantize: none" in msg
    )
    assert not (tmp_path / "q" / "final").exists()


def test_qlora_is_refused_for_reward_models() -> None:
    from heed.config.reward import RMConfig

    with pytest.raises(ConfigError, match="heed rm train does not quantize"):
        config_from_dict(
            RMConfig,
            {"model": {"path": "m", "lora": {**LORA, "quantize": "4bit"}}, "data": {"train": "x.jsonl"}},
        )

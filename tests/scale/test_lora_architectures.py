"""LoRA with the default settings (``target_modules: all-linear``) on every causal architecture of
``tests/archs.py``: every linear and Conv1D layer gets an adapter except the output / score head, one
SFT step and one reward-model step move only adapter (and score-head) weights, and the saved adapter
loads and merges into a plain model with the same outputs. Bad targets name the real layers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from archs import CAUSAL, causal_model_dir
from heed.config.base import LoraConfig
from heed.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = torch.tensor(
    [[7, 30, 41, 52, 63, 74, 85, 96, 107, 118, 12, 23], [9, 31, 42, 53, 64, 75, 86, 97, 0, 0, 0, 0]]
)
MASK = (torch.arange(IDS.shape[1]) < torch.tensor([[12], [8]])).long()


@pytest.fixture(scope="module")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lora-arch-models")


def linear_layers(model: torch.nn.Module) -> set[str]:
    from transformers.pytorch_utils import Conv1D

    return {n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))}


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def one_step(model: torch.nn.Module, loss: torch.Tensor) -> None:
    """Plain SGD, no weight decay: a parameter moves only if it has a gradient."""
    params = [p for p in model.parameters() if p.requires_grad]
    loss.backward()
    torch.optim.SGD(params, lr=0.5).step()


def moved(before: dict[str, torch.Tensor], model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}


@pytest.mark.parametrize("name", list(CAUSAL))
def test_default_lora_sft_step_moves_only_the_adapter_and_merges(
    name: str, models_root: Path, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from heed.models.loading import load_causal_lm
    from heed.models.lora import apply_lora, merge_adapter

    base_dir = causal_model_dir(name, models_root)
    base = load_causal_lm(base_dir)
    linears = linear_layers(base)
    head = next(n for n, m in base.named_modules() if m is base.get_output_embeddings())
    model = apply_lora(base, LoraConfig())  # the defaults: all-linear
    adapted = {n.removeprefix("base_model.model.") for n, m in model.named_modules() if hasattr(m, "lora_A")}
    # every linear / Conv1D layer but the output layer (peft also adapts MoE experts' parameters)
    assert linears - {head} <= adapted and head not in adapted, sorted(linears - {head} - adapted)
    if name == "gpt2":
        assert {"c_attn", "c_proj", "c_fc"} <= {n.rsplit(".", 1)[-1] for n in adapted}  # Conv1D layers

    model.train()
    before = snapshot(model)
    one_step(model, model(input_ids=IDS, attention_mask=MASK, labels=IDS.masked_fill(MASK == 0, -100)).loss)
    changed = moved(before, model)
    assert changed and all(".lora_" in n for n in changed), sorted(n for n in changed if ".lora_" not in n)
    assert all(f"base_model.model.{n}.lora_B.default.weight" in changed for n in linears - {head})

    # the adapter saved alone loads onto a fresh base, and heed merge gives a plain model, same logits
    model.eval()
    with torch.no_grad():
        want = model(input_ids=IDS, attention_mask=MASK).logits
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(load_causal_lm(base_dir), str(tmp_path / "adapter")).eval()
    merged = AutoModelForCausalLM.from_pretrained(
        merge_adapter(tmp_path / "adapter", tmp_path / "merged")
    ).eval()
    with torch.no_grad():
        for other in (reloaded, merged):
            got = other(input_ids=IDS, attention_mask=MASK).logits
            torch.testing.assert_close(got[MASK.bool()], want[MASK.bool()], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", list(CAUSAL))
def test_default_lora_reward_step_moves_adapter_and_score_head(
    name: str, models_root: Path, tmp_path: Path
) -> None:
    from heed.models.loading import save_pretrained
    from heed.models.lora import apply_lora
    from heed.models.reward import build_reward_model, forward_rewards, load_reward_model

    model, tok, _ = build_reward_model(causal_model_dir(name, models_root), seed=0)
    linears = linear_layers(model)
    model = apply_lora(model, LoraConfig(), task="seq_cls")
    adapted = {n.removeprefix("base_model.model.") for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert linears - {"score"} <= adapted and "score" not in adapted, sorted(linears - {"score"} - adapted)

    model.train()
    before = snapshot(model)
    r = forward_rewards(model, IDS, MASK)  # (2,): the first answer should win
    one_step(model, torch.nn.functional.softplus(-(r[0] - r[1])))
    changed = moved(before, model)
    assert any(".lora_B." in n for n in changed) and any("score" in n for n in changed)
    assert all(".lora_" in n or "modules_to_save" in n for n in changed), sorted(changed)

    # what heed rm train saves with LoRA: the merged plain reward model, same scores
    model.eval()
    with torch.no_grad():
        want = forward_rewards(model, IDS, MASK)
    save_pretrained(model.merge_and_unload(), tok, tmp_path / "final")
    rm = load_reward_model(tmp_path / "final")
    assert not any("lora" in n for n, _ in rm.model.named_parameters())
    torch.testing.assert_close(forward_rewards(rm.model, IDS, MASK), want, atol=1e-4, rtol=1e-4)


def test_bad_targets_name_the_real_linear_and_conv1d_layers(models_root: Path) -> None:
    from heed.models.loading import load_causal_lm
    from heed.models.lora import apply_lora, linear_names

    gpt2 = load_causal_lm(causal_model_dir("gpt2", models_root))
    assert linear_names(gpt2) == ["c_attn", "c_fc", "c_proj", "lm_head"]
    for targets, fragment in [
        (["q_proj", "v_proj"], "q_proj, v_proj not in GPT2LMHeadModel"),
        (["mlp"], "mlp (GPT2MLP) in GPT2LMHeadModel is not a layer LoRA can adapt"),
        (r".*\.q_proj", "matches no linear layer of GPT2LMHeadModel"),
    ]:
        with pytest.raises(ConfigError) as err:
            apply_lora(gpt2, LoraConfig(target_modules=targets))
        msg = str(err.value)
        assert "\n" not in msg and fragment in msg, msg
        assert "its linear/Conv1D layers are: c_attn, c_fc, c_proj, lm_head" in msg, msg
    # a dotted suffix is what peft matches, so it is accepted
    model = apply_lora(gpt2, LoraConfig(target_modules=["attn.c_attn"]))
    assert {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")} == {"c_attn"}


@pytest.mark.parametrize("name", ["phi3", "gpt2", "qwen3_moe"])
def test_wrapping_warns_nothing(name: str) -> None:
    """peft's own calls into transformers (``is_gradient_checkpointing``) and its per-architecture
    patterns a tiny model lacks (``alpha_pattern``) used to warn on every LoRA run; none reaches the user."""
    import warnings

    from archs import build_causal, micro_tokenizer
    from heed.models.lora import apply_lora

    model = build_causal(name, micro_tokenizer())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_lora(model, LoraConfig(r=4))
    assert [str(w.message) for w in caught] == []

"""The lean decoding step (``heed.rollout.lean``) against the model's own forward and the slow reference.

Every architecture it accepts must give the same token ids as a full forward per token and log-probs
within 1e-5 (left padding, a shared prefill, sliding windows, rows dropped as they stop); everything
else must be refused with a reason, and then the sampler runs the model's forward.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import transformers

from archs import build_causal, causal_config, micro_tokenizer
from heed.rollout import lean
from heed.rollout.generate import SamplingParams
from heed.rollout.sampler import decode, row_keys

from .test_decode import STOP_SHARE, assert_same, prompts, reference_decode

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok() -> Any:
    return micro_tokenizer()


def with_config(tok: Any, name: str, **changes: Any) -> Any:
    """``build_causal(name)`` with config fields changed before the model is built."""
    config = causal_config(name, tok)
    for key, value in changes.items():
        setattr(config, key, value)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = getattr(transformers, type(config).__name__.replace("Config", "ForCausalLM"))(config)
    return model.eval()


def accepted_models(tok: Any) -> dict[str, Any]:
    models = {n: build_causal(n, tok) for n in ("llama", "qwen2", "qwen3", "mistral")}
    # biases on every projection (Qwen2 has q/k/v biases only)
    models["llama-biases"] = with_config(tok, "llama", attention_bias=True, mlp_bias=True)
    models["mistral-gqa-1"] = with_config(tok, "mistral", num_key_value_heads=1)
    return models


def count_lean_steps(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    run = lean.LeanStep.__call__

    def counted(self: Any, *args: Any) -> torch.Tensor:
        calls.append(1)
        return run(self, *args)

    monkeypatch.setattr(lean.LeanStep, "__call__", counted)
    return calls


@pytest.mark.parametrize("packed", [True, False], ids=["packed-weights", "own-weights"])
@pytest.mark.parametrize("do_sample", [True, False])
def test_lean_step_decodes_like_a_full_forward_per_token(
    tok: Any, monkeypatch: pytest.MonkeyPatch, do_sample: bool, packed: bool
) -> None:
    """Both weight layouts: fused copies packed for oneDNN (float32 on a CPU) and the layers' own
    matrices (other devices and dtypes, builds without oneDNN)."""
    if packed and not lean._onednn_linear():
        pytest.skip("this PyTorch build has no oneDNN linear")
    if not packed:
        monkeypatch.setattr(lean, "_onednn_linear", lambda: False)
    calls = count_lean_steps(monkeypatch)
    for name, model in accepted_models(tok).items():
        assert lean.lean_support(model) is None, name
        assert lean.packs_weights(model.lm_head.weight) is packed
        v = model.config.vocab_size
        ids, mask = prompts(v, seed=4)
        keys = row_keys(4, list(range(ids.shape[0])))
        params = SamplingParams(max_new_tokens=12, temperature=0.8, do_sample=do_sample)
        stop = list(range(3, 3 + v // STOP_SHARE))
        if not do_sample:  # greedy answers rarely hit a fixed set: stop at two tokens they hold
            free = reference_decode(model, ids, mask, params, [], keys)[0]
            stop = [free[2][4], free[5][7]]
        before = len(calls)
        ours = decode(model, ids, mask, params, stop, keys=keys)
        assert len(calls) > before, f"{name}: the lean step did not run"
        ref = reference_decode(model, ids, mask, params, stop, keys)
        assert_same(ours, ref, name)
        assert len({len(a) for a in ref[0]}) > 1, name  # rows stopped at different steps
        assert_same(decode(model, ids, mask, params, stop, keys=keys, lean=False), ref, f"{name} forward")


def sampling_case(model: Any, seed: int, new: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]:
    """Prompts (ids, mask), per-row keys and sampling settings (temperature 0.8) for ``model``."""
    ids, mask = prompts(model.config.vocab_size, seed=seed)
    return (
        ids,
        mask,
        row_keys(seed, list(range(ids.shape[0]))),
        SamplingParams(max_new_tokens=new, temperature=0.8),
    )


def test_sliding_window_is_applied(tok: Any) -> None:
    """Answers that run past Mistral's 8-token window: dropping the window would change the tokens."""
    model = build_causal("mistral", tok)
    ids, mask, keys, params = sampling_case(model, seed=5, new=16)
    ours = decode(model, ids, mask, params, [], keys=keys)
    assert_same(ours, reference_decode(model, ids, mask, params, [], keys), "mistral window")
    model.config.sliding_window = None  # the same weights, a model without the window
    unwindowed = decode(model, ids, mask, params, [], keys=keys, lean=False)
    assert unwindowed[0] != ours[0]


def test_a_step_after_an_update_reads_the_new_weights(tok: Any) -> None:
    model = build_causal("qwen2", tok)
    ids, mask, keys, params = sampling_case(model, seed=6, new=10)
    before = decode(model, ids, mask, params, [], keys=keys)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    after = decode(model, ids, mask, params, [], keys=keys)
    assert after[0] != before[0]
    assert_same(after, decode(model, ids, mask, params, [], keys=keys, lean=False), "after the update")


def test_bfloat16_model_decodes_like_its_forward(tok: Any) -> None:
    """Half-precision weights: the float32 upcast of RMSNorm as the model does it (greedy, so the
    tokens are compared at bf16's own rounding)."""
    model = build_causal("llama", tok).to(torch.bfloat16)
    ids, mask = prompts(model.config.vocab_size, seed=7)
    params = SamplingParams(max_new_tokens=8, do_sample=False)
    ours = decode(model, ids, mask, params, [])
    theirs = decode(model, ids, mask, params, [], lean=False)
    assert ours[0] == theirs[0]
    for a, b in zip(ours[1], theirs[1], strict=True):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=0.05)


def test_other_models_are_refused_with_a_reason(tok: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each refusal names what the lean step does not do, and the sampler then decodes with the model's
    forward (the same answers as the reference)."""
    calls = count_lean_steps(monkeypatch)
    assert "gpt2" in lean.lean_unsupported(build_causal("gpt2", tok))
    assert "granite" in lean.lean_unsupported(build_causal("granite", tok))  # multipliers: not plain Llama

    class Halved(transformers.LlamaForCausalLM):
        def forward(self, *args: Any, **kwargs: Any) -> Any:
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 0.5
            return out

    assert "not transformers' own class" in lean.lean_support(Halved(build_causal("llama", tok).config))
    patched = build_causal("llama", tok)  # a forward replaced on one module: only the probe can tell
    mlp = patched.model.layers[0].mlp
    mlp.forward = lambda x, run=mlp.forward: 2 * run(x)
    assert lean.lean_unsupported(patched) is None
    assert "differs from the lean step" in lean.lean_support(patched)

    hooked = build_causal("llama", tok)
    hooked.model.layers[0].mlp.register_forward_hook(lambda *args: None)
    assert "hooks" in lean.lean_unsupported(hooked)

    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(
        build_causal("llama", tok), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    )
    assert "Linear" in lean.lean_unsupported(lora)

    training = with_config(tok, "llama", attention_dropout=0.1).train()
    assert "dropout" in lean.lean_unsupported(training)

    dynamic = with_config(
        tok, "llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}
    )
    assert "dynamic" in lean.lean_unsupported(dynamic)

    calls.clear()  # the probe above ran one lean step
    for model in (hooked, lora, patched):
        ids, mask, keys, params = sampling_case(model, seed=8, new=8)
        with torch.no_grad():
            ours = decode(model, ids, mask, params, [], keys=keys)
        assert_same(ours, reference_decode(model, ids, mask, params, [], keys), type(model).__name__)
    assert not calls

"""Heed's decoding loop against a plain reference: the same keyed draws from a full forward per token.

The reference below is the sampler's arithmetic written out the slow way (no KV cache, no padding, one
row at a time, the CDF as one float64 prefix sum over V): every speed-up of ``decode`` (buffered and
fixed-shape caches, dropped rows, the two-level CDF, the compiled step) must give the same token ids
and log-probs within 1e-5.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch

from archs import build_causal, micro_tokenizer
from heed.algos.ops import inverse_cdf
from heed.rollout.generate import SamplingParams
from heed.rollout.sampler import (
    decode,
    keyed_uniform_table,
    keyed_uniforms,
    row_keys,
    sample_next,
)

pytestmark = pytest.mark.usefixtures("one_thread")

STOP_SHARE = 8  # a random model stops a row with probability ~1/8 per step: rows end at different steps


@pytest.fixture(scope="module")
def tok() -> Any:
    return micro_tokenizer()


def prompts(vocab: int, b: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts of 5 to 14 random tokens (longer than the test models' window of 8)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(5, 15, (b,), generator=g)
    width = int(lengths.max())
    ids = torch.randint(3, vocab, (b, width), generator=g)
    mask = torch.arange(width)[None, :] >= (width - lengths)[:, None]
    ids = ids.masked_fill(~mask, 0)
    ids[1] = ids[0]  # rows 0 and 1 are two samples of one prompt (a shared prefill)
    mask[1] = mask[0]
    return ids, mask


def reference_decode(
    model: Any,
    ids: torch.Tensor,
    mask: torch.Tensor,
    params: SamplingParams,
    stop: list[int],
    keys: torch.Tensor,
) -> tuple[list[list[int]], list[list[float]]]:
    """One row at a time, a full forward over prompt + answer so far for every token."""
    results, logps = [], []
    for r in range(ids.shape[0]):
        row = ids[r][mask[r]].tolist()
        answer: list[int] = []
        lps: list[float] = []
        for step in range(params.max_new_tokens):
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([row + answer])).logits[0, -1].float()
            scaled = logits / params.temperature
            if params.do_sample:
                cdf = scaled.softmax(-1).cumsum(-1, dtype=torch.float64)  # (V,)
                u = keyed_uniforms(keys[r : r + 1], step)[0]
                t = int(torch.searchsorted(cdf, (u * cdf[-1]).reshape(1), right=True).clamp_max(len(cdf) - 1))
            else:
                t = int(scaled.argmax())
            answer.append(t)
            lps.append(float(scaled.log_softmax(-1)[t]))
            if t in stop:
                break
        results.append(answer)
        logps.append(lps)
    return results, logps


def assert_same(ours: tuple[list, list], ref: tuple[list, list], what: str) -> None:
    assert ours[0] == ref[0], what
    for a, b in zip(ours[1], ref[1], strict=True):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5), what


def test_inverse_cdf_equals_one_float64_prefix_sum() -> None:
    g = torch.Generator().manual_seed(0)
    for v in (100, 4096, 32000, 50257):  # one-level and two-level (a padded last block for 50257)
        probs = (torch.randn(64, v, generator=g) * 3).softmax(-1)
        u = torch.rand(64, generator=g, dtype=torch.float64)
        u[:2] = torch.tensor([1e-12, 1 - 2**-52], dtype=torch.float64)  # both ends of the CDF
        cdf = probs.cumsum(-1, dtype=torch.float64)
        want = (
            torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1).clamp_max(v - 1)
        )
        assert torch.equal(inverse_cdf(probs, u), want), v
        # a row's token does not depend on the rows beside it
        assert torch.equal(inverse_cdf(probs[5:9], u[5:9]), want[5:9]), v


def test_sample_next_skips_zero_probability_tokens_and_reads_log_probs_off_the_softmax() -> None:
    logits = torch.tensor([[0.0, 1.0, float("-inf"), 2.0, float("-inf")]]).repeat(3, 1)
    u = torch.tensor([0.01, 0.5, 1 - 2**-52], dtype=torch.float64)
    tok, lp = sample_next(logits, 1.0, 0, 1.0, True, u)
    assert tok.tolist() == [0, 3, 3]  # the last u lands on the CDF's end: the -inf token 4 is never drawn
    assert torch.allclose(lp, logits.log_softmax(-1).gather(-1, tok[:, None]).squeeze(-1), atol=1e-6)


def test_keyed_uniform_table_is_keyed_uniforms_per_step() -> None:
    keys = row_keys(3, list(range(17)))
    table = keyed_uniform_table(keys, 9)
    assert torch.equal(table, torch.stack([keyed_uniforms(keys, s) for s in range(9)], dim=1))


@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral", "gpt2", "bloom", "gemma2"])
@pytest.mark.parametrize("do_sample", [True, False])
def test_decode_matches_a_full_forward_per_token(tok: Any, name: str, do_sample: bool) -> None:
    """Left padding, a shared prefill, sliding windows (mistral, gemma2: 8 tokens), ALiBi (bloom), rows
    dropped as they stop: the same tokens as the reference, log-probs within 1e-5."""
    model = build_causal(name, tok)
    v = model.config.vocab_size
    ids, mask = prompts(v)
    keys = row_keys(1, list(range(ids.shape[0])))
    params = SamplingParams(max_new_tokens=12, temperature=0.8, do_sample=do_sample)
    stop = list(range(3, 3 + v // STOP_SHARE))
    if not do_sample:  # greedy answers of a random model rarely hit a fixed set: stop at two tokens they hold
        free = reference_decode(model, ids, mask, params, [], keys)[0]
        stop = [free[2][4], free[5][7]]
    ours = decode(model, ids, mask, params, stop, keys=keys)
    ref = reference_decode(model, ids, mask, params, stop, keys)
    assert_same(ours, ref, name)
    assert len({len(a) for a in ref[0]}) > 1  # rows did stop at different steps
    # rows that finish stay in the batch until half have finished: the same answers
    assert_same(decode(model, ids, mask, params, stop, compact_at=0.5, keys=keys), ref, f"{name} compact_at")


def static_models(tok: Any) -> dict[str, Any]:
    """Models the fixed-shape step runs: llama (sdpa and eager attention), qwen2, qwen3, mistral
    without a window."""
    models = {n: build_causal(n, tok) for n in ("llama", "qwen2", "qwen3")}
    eager = build_causal("llama", tok, seed=1)
    eager.config._attn_implementation = "eager"
    models["llama-eager"] = eager
    mistral = build_causal("mistral", tok)
    mistral.config.sliding_window = None
    models["mistral-no-window"] = mistral
    return models


@pytest.mark.parametrize("do_sample", [True, False])
def test_fixed_shape_step_matches_the_eager_loop(
    tok: Any, monkeypatch: pytest.MonkeyPatch, do_sample: bool
) -> None:
    """``compile=True`` with ``torch.compile`` made the identity: the fixed-shape step itself (whole
    cache, 4D mask, rows dropped) against the reference."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    for name, model in static_models(tok).items():
        v = model.config.vocab_size
        ids, mask = prompts(v, seed=2)
        stop = list(range(3, 3 + v // STOP_SHARE))
        keys = row_keys(2, list(range(ids.shape[0])))
        params = SamplingParams(max_new_tokens=12, temperature=0.8, do_sample=do_sample, compile=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback warning: the fixed-shape step did run
            ours = decode(model, ids, mask, params, stop, keys=keys)
        assert_same(ours, reference_decode(model, ids, mask, params, stop, keys), name)


def test_compile_failure_warns_once_and_decodes_eagerly(tok: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(fn: Any, **kwargs: Any) -> Any:
        def run(*args: Any) -> Any:
            raise RuntimeError("no C++ compiler\nsecond line")

        return run

    monkeypatch.setattr(torch, "compile", broken)
    model = build_causal("llama", tok)
    ids, mask = prompts(model.config.vocab_size, seed=3)
    keys = row_keys(4, list(range(ids.shape[0])))
    params = SamplingParams(max_new_tokens=10, compile=True)
    with pytest.warns(
        UserWarning, match=r"^rollout.compile: torch.compile failed \(RuntimeError: no C\+\+ compiler\)"
    ):
        ours = decode(model, ids, mask, params, [], keys=keys)
    assert_same(ours, reference_decode(model, ids, mask, params, [], keys), "fallback")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the next rollout of this model: no second warning
        again = decode(model, ids, mask, params, [], keys=keys)
    assert again[0] == ours[0]


def test_compile_of_an_unsupported_model_warns_and_decodes_eagerly(tok: Any) -> None:
    model = build_causal("gpt2", tok)
    ids, mask = prompts(model.config.vocab_size, seed=4)
    keys = row_keys(5, list(range(ids.shape[0])))
    params = SamplingParams(max_new_tokens=8, compile=True)
    with pytest.warns(
        UserWarning, match=r"rollout.compile: not compiling the decoding step \(model type 'gpt2'"
    ):
        ours = decode(model, ids, mask, params, [], keys=keys)
    assert_same(ours, reference_decode(model, ids, mask, params, [], keys), "gpt2")


@pytest.mark.slow
def test_torch_compile_decodes_like_the_eager_loop(tok: Any) -> None:
    """A real ``torch.compile`` (inductor; minutes on a small CPU): greedy tokens equal, log-probs
    within 1e-5, and the compiled step is reused by the next call."""
    model = build_causal("llama", tok)
    ids, mask = prompts(model.config.vocab_size, seed=5)
    eager = decode(model, ids, mask, SamplingParams(max_new_tokens=8, do_sample=False), [])
    params = SamplingParams(max_new_tokens=8, do_sample=False, compile=True)
    assert_same(decode(model, ids, mask, params, []), eager, "compiled")
    step = model._heed_compiled_step
    assert_same(decode(model, ids, mask, params, []), eager, "compiled again")
    assert model._heed_compiled_step is step


def test_rollout_compile_reaches_the_sampler() -> None:
    from heed.config import config_from_dict
    from heed.config.rl import RLConfig
    from heed.train.rl import _sampling

    base = {
        "model": {"path": "m"},
        "data": {"prompts": "p.jsonl"},
        "rewards": [{"function": "length_penalty"}],
    }
    assert not _sampling(config_from_dict(RLConfig, base, "test")).compile  # off by default
    cfg = config_from_dict(RLConfig, {**base, "rollout": {"compile": True}}, "test")
    assert _sampling(cfg).compile and _sampling(cfg, eval_mode=True).compile

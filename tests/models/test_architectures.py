"""Heed's log-probs equal a plain ``transformers`` forward on every causal architecture of
``tests/archs.py``, on sequences longer than the sliding window (8), gradients included.

The reference is written here from scratch: each sequence alone through ``model(input_ids)``,
``log_softmax(logits / T)`` gathered at the next token. Heed's paths: the row-by-row forward
(left-padded prompts, right-padded answers), the shared-prompt forward (K answers packed with one
prompt under a block mask), packed SFT documents (positions restarting per document), the value
head (a linear map of the hidden state the LM head reads), and the token log-probs of both sampling
engines (``heed`` and ``hf``) at the sampling temperature.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from archs import CAUSAL, WINDOW, build_causal, micro_tokenizer
from heed.data.collate import pad_positions
from heed.models.forward import can_share_prompt, policy_forward, shared_prompt_forward
from heed.models.lm import forward_support, sequence_logprobs
from heed.models.value import ValueHead, hidden_size
from heed.rollout.generate import SamplingParams, generate

pytestmark = pytest.mark.usefixtures("one_thread")

TEMPERATURE = 0.7
K = 3
PROMPT_LENS = [5, 9, 3]
ANSWER_LENS = [[6, 11, 3], [9, 2, 7], [12, 5, 8]]  # packed groups of 25-37 tokens, answers up to 12
TOL = 1e-5  # log-probs and values, fp32
GRAD_TOL = 1e-5  # gradients, relative to the largest gradient entry (see _grad_diff)


def _sequences(vocab: int) -> tuple[list[list[int]], list[list[list[int]]]]:
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in PROMPT_LENS]
    answers = [[torch.randint(3, vocab, (n,), generator=g).tolist() for n in row] for row in ANSWER_LENS]
    return prompts, answers


def _plain(model: Any, seq: list[int], start: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for one sequence alone: log-probs (n,) of tokens ``seq[start:]`` and the hidden state
    the LM head reads before each of them (n, H), captured by a hook on the LM head."""
    seen: list[torch.Tensor] = []
    hook = model.get_output_embeddings().register_forward_hook(lambda _m, a, _o: seen.append(a[0]))
    ids = torch.tensor([seq])
    logits = model(input_ids=ids).logits[0]  # (L, V)
    hook.remove()
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)  # (L, V)
    targets = ids[0, start:]
    lp = logp[start - 1 : -1].gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return lp, seen[0][0, start - 1 : -1]


def _grads(model: Any, head: ValueHead, scalar: torch.Tensor, keep: bool = False) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    head.zero_grad(set_to_none=True)
    scalar.backward(retain_graph=keep)
    params = [*model.parameters(), *head.parameters()]
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]


def _grad_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """max |g_heed − g_ref| / max |g_ref| over every parameter entry."""
    scale = max(float(x.abs().max()) for x in a)
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True)) / scale


def measure(name: str, model: Any = None) -> dict[str, tuple[float, float]]:
    """Per Heed path: (max |Δ log-prob| (or value), relative max |Δ gradient|) against the plain
    forward, for architecture ``name`` (or ``model``; fp32, eval mode, temperature 0.7)."""
    torch.manual_seed(0)
    tok = micro_tokenizer()
    model = model if model is not None else build_causal(name, tok)
    vocab = model.get_output_embeddings().weight.shape[0]
    prompts, answers = _sequences(vocab)
    head = ValueHead(hidden_size(model))
    torch.nn.init.normal_(head.summary.weight, std=0.3)
    out: dict[str, tuple[float, float]] = {}

    # the reference, row r = prompt i, answer j (prompt-major), with weights for a scalar to differentiate
    ref_lp, ref_v = [], []
    for i, p in enumerate(prompts):
        for a in answers[i]:
            lp, h = _plain(model, p + a, len(p), TEMPERATURE)
            ref_lp.append(lp)
            ref_v.append(head(h))
    w = [torch.randn(len(x), generator=torch.Generator().manual_seed(r)) for r, x in enumerate(ref_lp)]
    ref_lp_grads = _grads(
        model, head, sum((wi * x).sum() for wi, x in zip(w, ref_lp, strict=True)), keep=True
    )
    ref_v_grads = _grads(model, head, sum((wi * x).sum() for wi, x in zip(w, ref_v, strict=True)))

    # rows [left-padded prompt | right-padded answer]
    n = len(ref_lp)
    pw, cw = max(PROMPT_LENS), max(max(r) for r in ANSWER_LENS)
    ids = torch.full((n, pw + cw), tok.pad_token_id)
    att = torch.zeros((n, pw + cw), dtype=torch.long)
    for r in range(n):
        p, a = prompts[r // K], answers[r // K][r % K]
        ids[r, pw - len(p) : pw], ids[r, pw : pw + len(a)] = torch.tensor(p), torch.tensor(a)
        att[r, pw - len(p) : pw + len(a)] = 1
    tgt = att.bool().clone()
    tgt[:, :pw] = False
    weights = torch.zeros((n, pw + cw))
    for r in range(n):
        weights[r, pw : pw + len(w[r])] = w[r]

    def compare(key: str, run: Any) -> None:
        res = run()
        got_lp = [res.logprobs[r, pw : pw + len(ref_lp[r])] for r in range(n)]
        got_v = [res.values[r, pw : pw + len(ref_v[r])] for r in range(n)]
        d_lp = max(float((a - b).detach().abs().max()) for a, b in zip(got_lp, ref_lp, strict=True))
        d_v = max(float((a - b).detach().abs().max()) for a, b in zip(got_v, ref_v, strict=True))
        g_lp = _grads(model, head, (weights * res.logprobs).sum())
        res = run()
        g_v = _grads(model, head, (weights * res.values).sum())
        out[key] = (d_lp, _grad_diff(ref_lp_grads, g_lp))
        out[f"{key} value"] = (d_v, _grad_diff(ref_v_grads, g_v))

    compare("rows", lambda: policy_forward(model, ids, att, tgt, TEMPERATURE, value_head=head))
    compare(
        "shared", lambda: shared_prompt_forward(model, ids, att, tgt, pw, K, TEMPERATURE, value_head=head)
    )

    # packed SFT: the K sequences of prompt i in one row, positions restarting at each
    docs = [[p + a for a in answers[i]] for i, p in enumerate(prompts)]
    rows = [[t for d in ds for t in d] for ds in docs]
    positions = [[q for d in ds for q in range(len(d))] for ds in docs]
    width = max(len(x) for x in rows)
    pids = torch.full((len(rows), width), tok.pad_token_id)
    ptgt = torch.zeros((len(rows), width), dtype=torch.bool)
    pweights = torch.zeros((len(rows), width))
    for i, row in enumerate(rows):
        pids[i, : len(row)] = torch.tensor(row)
        ptgt[i, : len(row)] = torch.tensor(
            [q > 0 for q in positions[i]]
        )  # a document's first token is not predicted
    pos = pad_positions(positions)
    plain_docs, pw_docs = [], []
    for i, ds in enumerate(docs):
        at = 0
        for d in ds:
            lp, _ = _plain(model, d, 1, 1.0)
            plain_docs.append(lp)
            wd = torch.randn(len(lp), generator=torch.Generator().manual_seed(100 + len(plain_docs)))
            pw_docs.append(wd)
            pweights[i, at + 1 : at + len(d)] = wd
            at += len(d)
    g_ref = _grads(model, head, sum((a * b).sum() for a, b in zip(pw_docs, plain_docs, strict=True)))
    lp_packed, _ = sequence_logprobs(model, pids, torch.ones_like(pids), ptgt, position_ids=pos)
    got, k = [], 0
    for i, ds in enumerate(docs):
        at = 0
        for d in ds:
            got.append(lp_packed[i, at + 1 : at + len(d)])
            at += len(d)
            k += 1
    d_packed = max(float((a - b).detach().abs().max()) for a, b in zip(got, plain_docs, strict=True))
    out["packed"] = (d_packed, _grad_diff(g_ref, _grads(model, head, (pweights * lp_packed).sum())))
    model.zero_grad(set_to_none=True)

    # the sampling engines' token log-probs at the sampling temperature (no gradient: sampling is
    # under no_grad); answers of 12 tokens run past the window
    for engine in ("heed", "hf"):
        torch.manual_seed(1)
        gen = generate(
            model,
            tok,
            prompts,
            SamplingParams(max_new_tokens=12, temperature=TEMPERATURE),
            num_samples=2,
            engine=engine,
        )
        assert gen.logprobs is not None
        diff = 0.0
        for r in range(len(gen.texts)):
            p = prompts[r // 2]
            c = gen.completion_ids[r][gen.completion_mask[r]].tolist()
            with torch.no_grad():
                lp, _ = _plain(model, p + c, len(p), TEMPERATURE)
            diff = max(diff, float((gen.logprobs[r, : len(c)] - lp).abs().max()))
        out[f"engine {engine}"] = (diff, float("nan"))
    return out


@pytest.mark.parametrize("name", list(CAUSAL))
def test_logprobs_match_the_plain_forward(name: str) -> None:
    result = measure(name)
    for path, (d, g) in result.items():
        assert d <= TOL, f"{name} {path}: log-prob/value differs by {d:.2e}"
        assert g != g or g <= GRAD_TOL, f"{name} {path}: gradient differs by {g:.2e} (relative)"


def test_fallbacks_are_decided_by_what_the_model_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bloom's ALiBi biases come from a 2-D mask: no block mask (packing and shared prompts go row by
    row), said once however often it is asked. Mistral's sliding window is built into the block mask;
    Granite's logit scaling and Gemma's soft-cap are applied by the fast head, so no model here needs
    its full logits."""
    import warnings

    from heed.models import lm

    monkeypatch.setattr(lm, "_SAID", set())
    tok = micro_tokenizer()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(2):
            assert not can_share_prompt(build_causal("bloom", tok))
    said = [str(w.message) for w in seen if "block attention mask" in str(w.message)]
    assert len(said) == 1 and said[0].startswith(
        "BloomForCausalLM: its forward does not take a block attention mask"
    )
    for name in ("mistral", "gemma2", "gemma3", "granite", "opt"):
        support = forward_support(build_causal(name, tok))
        assert support.own_logits is None and support.no_block_mask is None, (name, support)
    # the sequences are longer than the window: answers of up to 12 tokens after prompts of 3 to 9
    assert max(max(r) for r in ANSWER_LENS) > WINDOW


def test_unknown_logit_post_processing_uses_the_models_own_logits(monkeypatch: pytest.MonkeyPatch) -> None:
    """A model that changes its logits in a way no config field names (here: halved in ``forward``)
    is caught by the probe; every path then reads the model's own logits and still matches."""
    from transformers import LlamaForCausalLM

    from heed.models import lm

    class HalvedLogits(LlamaForCausalLM):
        def forward(self, *args: Any, **kwargs: Any) -> Any:
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 0.5
            return out

    monkeypatch.setattr(lm, "_SAID", set())
    tok = micro_tokenizer()
    model = HalvedLogits(build_causal("llama", tok).config).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    with pytest.warns(UserWarning, match="HalvedLogits: its LM head and the config's logit scaling"):
        assert forward_support(model).own_logits is not None
    for path, (d, g) in measure("llama", model).items():
        assert d <= TOL, f"{path}: {d:.2e}"
        assert g != g or g <= GRAD_TOL, f"{path}: gradient {g:.2e}"


# --- dropout: off in every policy, reference and value pass of DPO and RL --------------------------


@pytest.fixture(scope="module")
def dropout_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """GPT-2 and OPT with their default configs' dropout 0.1 (OPT keeps it as a float on its layers)."""
    from archs import causal_model_dir

    root = tmp_path_factory.mktemp("dropout")
    models = {name: causal_model_dir(name, root) for name in ("gpt2", "opt")}
    from heed.models.loading import read_model_config

    assert read_model_config(models["gpt2"])["resid_pdrop"] == 0.1
    assert read_model_config(models["opt"])["dropout"] == 0.1
    return models


def test_disable_dropout_reaches_float_rates() -> None:
    """``nn.Dropout`` modules, float rates on modules and config fields all go to 0, and training
    mode then computes what eval mode does."""
    from heed.models.lm import disable_dropout

    model = build_causal("opt", micro_tokenizer())
    layer = model.model.decoder.layers[0]
    assert layer.dropout == 0.1 and model.config.dropout == 0.1  # a float read in forward, not a module
    assert disable_dropout(model)
    assert layer.dropout == 0.0 and model.config.dropout == 0.0
    assert all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))


@pytest.mark.parametrize("name", ["gpt2", "opt"])
def test_first_dpo_loss_is_log_2(name: str, dropout_models: dict[str, Any], tmp_path: Path) -> None:
    """Policy == reference at step 1, so every implicit reward is 0 and the loss is exactly log 2
    (with dropout 0.1 left on it was 0.880 / 0.662)."""
    import json
    import math

    from heed.config import config_from_dict
    from heed.config.dpo import DPOConfig
    from heed.data.io import write_jsonl
    from heed.demo.preferences import make_pairs
    from heed.train.dpo import train_dpo

    write_jsonl(tmp_path / "train.jsonl", make_pairs(16, seed=0))
    cfg = {
        "model": {"path": str(dropout_models[name])},
        "data": {"train": str(tmp_path / "train.jsonl"), "max_length": 64},
        "train": {"batch_size": 16, "max_steps": 1},
        "log": {"log_every": 1, "eval_every": 0, "progress": False},
        "sample": {"num_prompts": 0},
        "out": str(tmp_path / "run"),
    }
    train_dpo(config_from_dict(DPOConfig, cfg))
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in rows if r["split"] == "train" and r["step"] == 1)
    assert abs(first["loss"] - math.log(2)) < 1e-5, first["loss"]


@pytest.mark.parametrize("name", ["gpt2", "opt"])
def test_first_ppo_ratio_is_1(name: str, dropout_models: dict[str, Any], tmp_path: Path) -> None:
    """One PPO update of one minibatch: the update's first forward sees the rollout's policy, so the
    ratio is 1 and the approximate KL 0 (with OPT's float dropout left on: ratio 0.951, approx_kl 0.10).
    The critic is the model itself, a separate copy, whose dropout is off too."""
    import json

    from heed.config import config_from_dict
    from heed.config.rl import RLConfig
    from heed.train.rl import train_rl

    cfg = {
        "model": {"path": str(dropout_models[name])},
        "data": {"prompts": "builtin:micro:prompts_train"},
        "rewards": [{"function": "length_penalty", "args": {"per_word": 0.1}}],
        "algorithm": "ppo",
        "update": {"epochs": 1},
        "ppo": {"critic": "separate"},
        # recomputed log-probs (PPO's values alone need no LM head), compared with the sampler's
        "rollout": {"prompts_per_step": 4, "k": 2, "max_new_tokens": 12, "reuse_logprobs": False},
        "train": {"updates": 1},
        "log": {"progress": False},
        "out": str(tmp_path / "run"),
    }
    from heed.demo.builtin import resolve_config

    train_rl(resolve_config(config_from_dict(RLConfig, cfg, "test")))
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in rows if r["split"] == "train")
    assert abs(first["ratio"] - 1) < 1e-5 and abs(first["approx_kl/k1"]) < 1e-6, first
    assert first["rollout/logprob_diff"] < 1e-5  # the sampler's log-probs: the same policy

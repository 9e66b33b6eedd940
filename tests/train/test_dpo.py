"""heed.train.dpo: pairs from rankings, encoding and truncation, the concatenated forward, the loss
terms, and the trainer (learning, resume, cached and on-the-fly reference)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from heed.config import config_from_dict
from heed.config.dpo import DPOConfig, DPOLossConfig
from heed.data.io import write_jsonl
from heed.data.pairs import PairCounts, PreferencePair, encode_pairs, expand_pairs, warn_counts
from heed.data.records import PreferenceGroup, load_records
from heed.errors import ConfigError, DataError
from heed.models.forward import PairLogps, collate_pairs, pair_logps
from heed.train.dpo import preference_losses, train_dpo
from heed.train.reference import REF_CACHE


def group(ranks: list[float], where: str = "f.jsonl:1") -> PreferenceGroup:
    return PreferenceGroup(
        prompt="p", responses=[f"r{i}" for i in range(len(ranks))], ranks=ranks, where=where
    )


# --- groups -> pairs ---------------------------------------------------------------------------
def as_idx(pairs: list[PreferencePair]) -> list[tuple[int, int]]:
    return [(int(p.chosen[1:]), int(p.rejected[1:])) for p in pairs]


def test_expand_all_best_vs_rest_best_vs_worst() -> None:
    g = group([1, 2, 2, 3])  # r0 best, r1 ~ r2 tied, r3 worst
    # all: the C(4,2) = 6 pairs minus the tie (1, 2) -> 5
    pairs, counts = expand_pairs([g], "all")
    assert sorted(as_idx(pairs)) == [(0, 1), (0, 2), (0, 3), (1, 3), (2, 3)]
    assert (counts.pairs, counts.ties_skipped, counts.not_selected) == (5, 1, 0)
    # best_vs_rest: r0 against the three others; (1,3) and (2,3) left out
    pairs, counts = expand_pairs([g], "best_vs_rest")
    assert sorted(as_idx(pairs)) == [(0, 1), (0, 2), (0, 3)]
    assert (counts.ties_skipped, counts.not_selected) == (1, 2)
    # best_vs_worst: only (0, 3)
    pairs, counts = expand_pairs([g], "best_vs_worst")
    assert as_idx(pairs) == [(0, 3)]
    assert (counts.ties_skipped, counts.not_selected) == (1, 4)


def test_expand_tied_best_and_pair_order() -> None:
    # two answers share the best rank: both are "best"; a later-listed better answer becomes chosen
    pairs, counts = expand_pairs([group([2, 1, 1])], "best_vs_worst")
    assert sorted(as_idx(pairs)) == [(1, 0), (2, 0)]
    assert counts.ties_skipped == 1
    pair = expand_pairs([group([2, 1])], "all")[0][0]
    assert (pair.chosen, pair.rejected) == ("r1", "r0")


def test_same_answer_ranked_differently_is_an_error() -> None:
    g = PreferenceGroup(prompt="p", responses=["a", "b", "a"], ranks=[1, 2, 3], where="prefs.jsonl:7")
    with pytest.raises(DataError, match=r"prefs.jsonl:7: responses\[0\] and responses\[2\]"):
        expand_pairs([g])


def test_bad_records_are_clear_errors(tmp_path: Path) -> None:
    cases = {
        '{"prompt": "q", "chosen": "same", "rejected": "same"}': "identical to chosen",
        '{"prompt": "q", "chosen": "", "rejected": "b"}': "empty response",
        '{"prompt": "q", "responses": ["a", "b"], "ranks": [1, 1]}': "all responses are tied",
    }
    for line, message in cases.items():
        f = tmp_path / "bad.jsonl"
        f.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n' + line + "\n")
        with pytest.raises(DataError, match=rf"bad.jsonl:2: .*{message}"):
            load_records(f, "preferences")


# --- encoding and truncation ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def micro(micro_sft_model: Path):
    from heed.models.loading import load_causal_lm, load_tokenizer

    return load_causal_lm(micro_sft_model), load_tokenizer(micro_sft_model)


def test_encode_truncates_and_drops_with_counts(micro) -> None:
    _, tok = micro
    short = PreferencePair("Tell me about tea.", "Tea is lovely.", "Tea is bad.")
    long_answer = " ".join(["Tea is wonderful and full of joy."] * 20)
    long = PreferencePair("Tell me about tea.", long_answer, "Tea is bad.")
    same_start = PreferencePair("Tell me about tea.", long_answer, long_answer + " More.")
    no_room = PreferencePair(" ".join(["Tell me about tea."] * 30), "Tea is lovely.", "Tea is bad.")
    counts = PairCounts()
    data = encode_pairs(tok, [short, long, same_start, no_room], chat=True, max_length=48, counts=counts)
    assert data.pairs == [short, long]
    # long: its chosen answer is cut; same_start: both answers cut (and then identical); no_room: both cut
    assert (counts.truncated, counts.dropped_identical, counts.dropped_no_answer) == (5, 1, 1)
    assert all(len(ids) <= 48 for ids, _ in data.chosen + data.rejected)
    # the response mask marks exactly the answer: decoding it gives the answer text (+ end of turn)
    ids, mask = data.chosen[0]
    answer = tok.decode([t for t, m in zip(ids, mask, strict=True) if m], skip_special_tokens=True)
    assert answer.strip() == "Tea is lovely."
    with pytest.warns(UserWarning) as rec:
        warn_counts("prefs.jsonl", counts, 48)
    text = " | ".join(str(w.message) for w in rec)
    assert "5 answers were longer than data.max_length=48" in text
    assert (
        "1 pairs dropped: the prompt fills" in text
        and "1 pairs dropped: chosen and rejected are identical" in text
    )


# --- log-probs: one concatenated forward, response tokens only ---------------------------------
def test_concatenated_forward_matches_separate_and_full_softmax(micro) -> None:
    model, tok = micro
    pairs = [
        PreferencePair(
            "What about chess?", "Chess is a great way to spend a happy afternoon.", "Chess is dull."
        ),
        PreferencePair(
            "Tell me about snow.", "Snow is lovely.", "Snow is cold, wet and grey all winter long."
        ),
    ]
    data = encode_pairs(tok, pairs, chat=True, max_length=128, counts=PairCounts())
    ids, att, mask = collate_pairs(data.chosen, data.rejected, tok.pad_token_id)
    with torch.no_grad():
        both = pair_logps(model, ids, att, mask).logps  # (4,) [c0, c1, r0, r1]
        # reference computation: full log-softmax over every position, summed over answer tokens
        for row, seq in enumerate(data.chosen + data.rejected):
            one = torch.tensor([seq[0]])
            logits = model(input_ids=one).logits[0]  # (T, V)
            logp = torch.log_softmax(logits[:-1].float(), -1).gather(-1, one[0, 1:, None])[:, 0]  # (T-1,)
            expected = logp[torch.tensor(seq[1][1:])].sum()
            torch.testing.assert_close(both[row], expected, atol=1e-4, rtol=1e-5)


def test_shared_prompt_forward_matches_row_by_row(micro) -> None:
    """[prompt | chosen | rejected] packed with a block mask gives each answer token's log-prob, and the
    same gradient, as running the two rows separately; the prompts here differ in length."""
    from heed.models.forward import _shared_layout

    model, tok = micro
    pairs = [
        PreferencePair(
            "What about chess?", "Chess is a great way to spend a happy afternoon.", "Chess is dull."
        ),
        PreferencePair(
            "Tell me everything you know about snow, please.",
            "Snow is lovely.",
            "Snow is cold, wet and grey all winter long.",
        ),
    ]
    data = encode_pairs(tok, pairs, chat=True, max_length=128, counts=PairCounts())
    ids, att, mask = collate_pairs(data.chosen, data.rejected, tok.pad_token_id)
    assert _shared_layout(ids, att, mask) is not None
    shared = pair_logps(model, ids, att, mask, share=True)
    plain = pair_logps(model, ids, att, mask, share=False)
    torch.testing.assert_close(shared.token_logps, plain.token_logps, atol=1e-5, rtol=1e-5)
    assert (shared.token_logps[~mask] == 0).all()
    grads = []
    for lp in (shared, plain):
        model.zero_grad()
        (lp.logps * torch.tensor([1.0, 2.0, -1.0, 0.5])).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)
    model.zero_grad()
    # a pair whose two prompts differ cannot share: the batch goes row by row
    other = encode_pairs(
        tok,
        [PreferencePair("What about tea?", "Tea is fine.", "Tea is bad.")],
        chat=True,
        max_length=128,
        counts=PairCounts(),
    )
    ids2, att2, mask2 = collate_pairs([data.chosen[0]], [other.rejected[0]], tok.pad_token_id)
    assert _shared_layout(ids2, att2, mask2) is None


# --- the loss terms -------------------------------------------------------------------------------
def logps(chosen: list[list[float]], rejected: list[list[float]]) -> PairLogps:
    rows = chosen + rejected
    width = max(len(r) for r in rows)
    lp = torch.zeros(len(rows), width)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        lp[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = True
    return PairLogps(lp, mask)


def test_preference_losses_by_hand() -> None:
    # one pair: chosen tokens (-1, -2) -> sum -3, avg -1.5; rejected (-4,) -> sum -4, avg -4
    pol = logps([[-1.0, -2.0]], [[-4.0]])
    ref = torch.tensor([-3.5, -3.0])  # [chosen, rejected]
    ref_avg = torch.tensor([-1.75, -3.0])
    # sigmoid: h = (-3 + 3.5) - (-4 + 3) = 1.5; loss = softplus(-β h) = log(1 + e^{-0.15}) at β = 0.1
    loss, stats = preference_losses(DPOLossConfig(beta=0.1), pol, ref, ref_avg)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.15)), abs=1e-6)
    assert stats["chosen_reward"].item() == pytest.approx(0.05) and stats[
        "rejected_reward"
    ].item() == pytest.approx(-0.1)
    assert stats["accuracy"].item() == 1.0 and stats["margin"].item() == pytest.approx(0.15)
    # ipo on length-averaged log-ratios: h = (-1.5 + 1.75) - (-4 + 3) = 1.25; (h - 1/(2·0.5))² = 0.0625
    loss, _ = preference_losses(DPOLossConfig(type="ipo", beta=0.5), pol, ref, ref_avg)
    assert loss.item() == pytest.approx(0.0625)
    # simpo needs no reference: −log σ(β(avg_c − avg_r) − γ) = softplus(−(2·2.5 − 1)) = log(1 + e^{−4})
    loss, _ = preference_losses(DPOLossConfig(type="simpo", beta=2.0, simpo_gamma=1.0), pol, None)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-4.0)), abs=1e-6)
    # RPO: + sft_coef · NLL per chosen token = 0.5 · 1.5 on top of the sigmoid loss
    loss, stats = preference_losses(DPOLossConfig(beta=0.1, sft_coef=0.5), pol, ref, ref_avg)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.15)) + 0.75, abs=1e-6)
    assert stats["sft_loss"].item() == pytest.approx(1.5)


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"model\.path"):
        config_from_dict(DPOConfig, {"data": {"train": "x.jsonl"}})
    with pytest.raises(ConfigError, match="label_smoothing"):
        DPOLossConfig(type="hinge", label_smoothing=0.1)
    with pytest.raises(ConfigError, match=r"data\.pairs"):
        config_from_dict(DPOConfig, {"model": {"path": "m"}, "data": {"train": "x", "pairs": "some"}})


# --- the trainer ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def prefs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from heed.demo.preferences import make_pairs, make_ranked_groups

    root = tmp_path_factory.mktemp("prefs")
    train = make_pairs(160, seed=0) + make_ranked_groups(40, k=3, seed=0)
    write_jsonl(root / "train.jsonl", train)
    write_jsonl(root / "eval.jsonl", make_pairs(64, seed=1, heldout=True))
    return {"train": root / "train.jsonl", "eval": root / "eval.jsonl"}


def dpo_config(model: Path, prefs: dict[str, Path], out: Path, **over) -> DPOConfig:
    cfg = {
        "model": {"path": str(model)},
        "data": {"train": str(prefs["train"]), "eval": str(prefs["eval"]), "max_length": 80},
        "train": {"batch_size": 16, "max_steps": 12, "eval_batch_size": 64},
        "optim": {"lr": 2e-4, "warmup_steps": 2},
        "log": {"log_every": 2, "eval_every": 6, "progress": False},
        "sample": {"num_prompts": 0},
        "out": str(out),
    }
    for key, value in over.items():
        section, name = key.split("__")
        cfg.setdefault(section, {})[name] = value
    return config_from_dict(DPOConfig, cfg)


def eval_rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "eval" and "eval/reward_accuracy" in r]


def test_dpo_learns_held_out_preferences(
    micro_sft_model: Path, prefs: dict[str, Path], tmp_path: Path
) -> None:
    run = tmp_path / "run"
    summary = train_dpo(dpo_config(micro_sft_model, prefs, run, sample__num_prompts=4))
    # at step 0 the policy is the reference: every implicit reward is 0, the loss is log 2.
    # After 12 steps the held-out margin is positive and most held-out pairs are ordered right.
    assert summary["eval/margin"] > 0.05
    assert summary["eval/reward_accuracy"] >= 0.7
    assert summary["eval/loss"] < math.log(2) - 0.01
    evals = eval_rows(run)
    assert [r["step"] for r in evals] == [6, 12] and evals[1]["eval/margin"] > evals[0]["eval/margin"]
    # 160 pairs + 40 groups of 3 (all pairs: up to 3 each, fewer when tied)
    assert summary["train_pairs"] == 160 + 3 * 40 - summary["data/train/ties_skipped"]
    for name in (
        "config.yaml",
        "summary.json",
        "samples.jsonl",
        "alarms.jsonl",
        REF_CACHE,
        "final/config.json",
    ):
        assert (run / name).exists(), name
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert {s["policy"] for s in samples} == {"sft", "dpo"} and len(samples) == 8
    assert math.isfinite(summary["kl/k1"]) and "kl/k3" in summary


def test_resume_and_on_the_fly_reference_give_the_same_run(
    micro_sft_model: Path, prefs: dict[str, Path], tmp_path: Path
) -> None:
    over = {"train__max_steps": 6, "log__save_every": 3, "log__eval_every": 0}
    full = train_dpo(dpo_config(micro_sft_model, prefs, tmp_path / "a", **over))
    assert [p.name for p in (tmp_path / "a" / "checkpoints").iterdir()] == ["step-3"]
    # a run killed after step 3: resuming replays steps 4-6 from the checkpoint and the cached reference
    cache = tmp_path / "a" / REF_CACHE
    stamp = cache.stat().st_mtime_ns
    resumed = train_dpo(dpo_config(micro_sft_model, prefs, tmp_path / "a", **over), resume=True)
    assert resumed["loss"] == pytest.approx(full["loss"], abs=1e-6)
    assert resumed["eval/loss"] == pytest.approx(full["eval/loss"], abs=1e-6)
    assert cache.stat().st_mtime_ns == stamp  # reused, not recomputed
    steps = [
        json.loads(line)["step"]
        for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["split"] == "train"
    ]
    assert steps == [2, 4, 6]  # rows after the checkpoint were replaced, not duplicated
    # a reference model run per batch, in micro-batches of 4 pairs, gives the same losses as the
    # precomputed table with whole batches (each pair counts 1/batch_size of the step's loss)
    live = train_dpo(
        dpo_config(
            micro_sft_model,
            prefs,
            tmp_path / "b",
            train__precompute_ref=False,
            train__micro_batch_size=4,
            train__max_steps=6,
            log__eval_every=0,
        )
    )
    assert live["loss"] == pytest.approx(full["loss"], abs=1e-4)
    assert not (tmp_path / "b" / REF_CACHE).exists()


def test_simpo_and_ranked_modes_run(micro_sft_model: Path, prefs: dict[str, Path], tmp_path: Path) -> None:
    summary = train_dpo(
        dpo_config(
            micro_sft_model,
            prefs,
            tmp_path / "s",
            loss__type="simpo",
            loss__beta=2.0,
            data__pairs="best_vs_worst",
            train__max_steps=3,
            log__eval_every=0,
        )
    )
    assert not (tmp_path / "s" / REF_CACHE).exists()  # reference-free
    assert (
        summary["data/train/pairs"] >= 160 + 40
    )  # >= one best-vs-worst pair per group (two when best or worst tie)
    assert math.isfinite(summary["eval/loss"])


@pytest.mark.filterwarnings("ignore:.*answers were longer")
def test_no_pairs_left_is_an_error(micro_sft_model: Path, tmp_path: Path) -> None:
    f = tmp_path / "long_prompts.jsonl"
    write_jsonl(f, [{"prompt": "Tell me about tea. " * 40, "chosen": "Yes.", "rejected": "No."}] * 4)
    cfg = dpo_config(micro_sft_model, {"train": f, "eval": f}, tmp_path / "r", data__max_length=16)
    with (
        pytest.raises(DataError, match="every pair was dropped"),
        pytest.warns(UserWarning, match="4 pairs dropped"),
    ):
        train_dpo(cfg)


def test_cli_reports_config_errors(capsys: pytest.CaptureFixture[str]) -> None:
    from heed.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["dpo", "--set", "data.train=prefs.jsonl", "--set", "loss.type=dpo"])
    assert exit_info.value.code == 2
    assert "loss.type" in capsys.readouterr().err

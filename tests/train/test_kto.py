"""heed.train.kto: the weight advice, the loss statistics, the fixed batches, and the trainer
(learning, exact resume, live reference = cached one, LoRA, CLI errors)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from heed.config import config_from_dict
from heed.config.kto import KTOConfig, KTOLossConfig
from heed.data.io import write_jsonl
from heed.train.kto import (
    class_means,
    eval_batches,
    fixed_batches,
    kto_terms,
    plan_batches,
    reward_auc,
    train_kto,
    weight_advice,
)
from heed.train.reference import REF_CACHE

pytestmark = pytest.mark.usefixtures("one_thread")


def test_weight_advice_follows_the_paper_range() -> None:
    # λ_D·n_D / (λ_U·n_U) must lie in [1, 4/3]
    assert weight_advice(100, 100, 1.0, 1.0) is None  # 1
    assert weight_advice(100, 300, 4.0, 1.0) is None  # 4·100 / 300 = 4/3
    assert weight_advice(100, 0, 1.0, 1.0) is None  # one class only: nothing to balance
    # 100 up, 300 down, weights 1: ratio 1/3. λ_D in [300/100, 4/3·3] = [3, 4];
    # λ_U in [100/300 / (4/3), 100/300] = [0.25, 0.33]
    line = weight_advice(100, 300, 1.0, 1.0)
    assert line is not None and "\n" not in line
    assert "= 0.33, outside" in line
    assert (
        "loss.desirable_weight in [3.00, 4.00]" in line and "loss.undesirable_weight in [0.25, 0.33]" in line
    )
    # 300 up, 100 down: ratio 3 is too much on the thumbs up: λ_D in [1/3, 4/9], λ_U in [2.25, 3]
    line = weight_advice(300, 100, 1.0, 1.0)
    assert line is not None and "[0.33, 0.44]" in line and "[2.25, 3.00]" in line


def test_kto_terms_and_statistics_by_hand() -> None:
    cfg = KTOLossConfig(beta=0.5, desirable_weight=2.0, undesirable_weight=1.0)
    policy = torch.tensor([-1.0, -3.0, -2.0])
    ref = torch.tensor([-2.0, -2.0, -2.0])  # r = (1, −1, 0)
    labels = torch.tensor([True, False, False])
    # z0 = 0.4: up:   2·(1 − σ(0.5·(1 − 0.4)))  = 2·(1 − σ(0.3))
    #           down: 1 − σ(0.5·(0.4 + 1)) = 1 − σ(0.7);   1 − σ(0.5·0.4) = 1 − σ(0.2)
    losses, sums = kto_terms(cfg, policy, ref, labels, 0.4)
    sig = torch.sigmoid
    expected = torch.stack(
        [2 * (1 - sig(torch.tensor(0.3))), 1 - sig(torch.tensor(0.7)), 1 - sig(torch.tensor(0.2))]
    )
    torch.testing.assert_close(losses, expected)
    means = class_means({k: v.item() for k, v in sums.items()}, "kto")
    # rewards β·r: up 0.5; down (−0.5 + 0) / 2 = −0.25; margin 0.75; log-probs up −1, down −2.5
    assert means == pytest.approx(
        {
            "kto/reward_desirable": 0.5,
            "kto/reward_undesirable": -0.25,
            "kto/margin": 0.75,
            "kto/logps_desirable": -1.0,
            "kto/logps_undesirable": -2.5,
        }
    )
    assert "kto/margin" not in class_means(
        {"n_desirable": 2.0, "reward_desirable": 1.0, "logps_desirable": -3.0}, "kto"
    )
    # AUC: up rewards (3, 1), down (1, 0): pairs 3>1, 3>0, 1=1 (½), 1>0 -> 3.5 / 4
    assert reward_auc(torch.tensor([3.0, 1.0, 1.0, 0.0]), torch.tensor([True, True, False, False])) == 0.875
    assert reward_auc(torch.tensor([1.0]), torch.tensor([True])) is None


def test_fixed_batches_cover_every_example_once() -> None:
    lengths = [5, 9, 3, 7, 1, 8, 2, 6, 4]
    batches = fixed_batches(lengths, 4, seed=0)
    # 9 examples in batches of 4: 4, 4, 1 -> the single one joins the batch before it
    assert sorted(len(b) for b in batches) == [4, 5]
    assert sorted(i for b in batches for i in b) == list(range(9))
    assert eval_batches(9, 4) == [[0, 1, 2, 3], [4, 5, 6, 7, 8]] and eval_batches(6, 4) == [
        [0, 1, 2, 3],
        [4, 5],
    ]
    one, again = plan_batches(batches, 0, epoch=3), plan_batches(batches, 0, epoch=3)
    assert one == again and sorted(map(sorted, one)) == sorted(map(sorted, batches))


# --- the trainer ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def thumbs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Thumbs from the built-in world's hidden utility: pairs become a thumbs up (chosen) and a thumbs
    down (rejected); the eval file holds thumbs records on held-out prompts."""
    from heed.demo.preferences import make_pairs

    root = tmp_path_factory.mktemp("thumbs")
    write_jsonl(root / "train.jsonl", make_pairs(160, seed=0))
    held = make_pairs(48, seed=1, heldout=True)
    write_jsonl(
        root / "eval.jsonl",
        [
            {"prompt": p["prompt"], "completion": p[k], "label": k == "chosen"}
            for p in held
            for k in ("chosen", "rejected")
        ],
    )
    return {"train": root / "train.jsonl", "eval": root / "eval.jsonl"}


def kto_config(model: Path, data: dict[str, Path], out: Path, **over) -> KTOConfig:
    cfg = {
        "model": {"path": str(model)},
        "data": {"train": str(data["train"]), "eval": str(data["eval"]), "max_length": 80},
        "loss": {"beta": 0.5},
        "train": {"batch_size": 16, "max_steps": 12, "eval_batch_size": 64},
        "optim": {"lr": 5e-4, "warmup_steps": 2},
        "log": {"log_every": 1, "eval_every": 6, "progress": False},
        "sample": {"num_prompts": 0},
        "out": str(out),
    }
    for key, value in over.items():
        section, name = key.split("__")
        cfg.setdefault(section, {})[name] = value
    return config_from_dict(KTOConfig, cfg)


def rows(run: Path, split: str) -> list[dict]:
    return [
        r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["split"] == split
    ]


def test_kto_learns_thumbs(micro_sft_model: Path, thumbs: dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    summary = train_kto(kto_config(micro_sft_model, thumbs, run, sample__num_prompts=4))
    train = rows(run, "train")
    # step 1 runs with policy = reference: r = 0 and KL = 0, so every loss is λ·(1 − σ(0)) = λ/2 = 0.5
    assert train[0]["loss"] == pytest.approx(0.5, abs=1e-5) and abs(train[0]["kto/kl"]) < 1e-4
    # learning: the loss falls, and on held-out prompts thumbs-up answers get a higher implicit reward
    first, late = train[0]["loss"], sum(r["loss"] for r in train[-4:]) / 4
    assert late < first - 0.02
    evals = rows(run, "eval")
    assert [r["step"] for r in evals if "eval/margin" in r] == [6, 12]
    assert summary["eval/reward_desirable"] > summary["eval/reward_undesirable"]
    assert summary["eval/margin"] > evals[0]["eval/margin"] > 0
    assert summary["eval/reward_auc"] > 0.7
    assert summary["eval/loss"] < 0.5
    # 160 pairs -> 160 thumbs up + 160 down; 48 held-out prompts x 2 answers
    assert (summary["data/train/groups"], summary["train_examples"], summary["eval_examples"]) == (
        160,
        320,
        96,
    )
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
    assert {s["policy"] for s in samples} == {"sft", "kto"} and len(samples) == 8
    assert math.isfinite(summary["kl/k1"])


def test_resume_is_exact_and_the_live_reference_matches_the_cache(
    micro_sft_model: Path, thumbs: dict[str, Path], tmp_path: Path
) -> None:
    over = {"train__max_steps": 6, "log__save_every": 3, "log__eval_every": 0}
    full = train_kto(kto_config(micro_sft_model, thumbs, tmp_path / "a", **over))
    before = rows(tmp_path / "a", "train")
    losses = [r["loss"] for r in before]
    # a run killed after step 3: resuming replays steps 4-6 from the checkpoint and the cached reference
    cache = tmp_path / "a" / REF_CACHE
    stamp = cache.stat().st_mtime_ns
    resumed = train_kto(kto_config(micro_sft_model, thumbs, tmp_path / "a", **over), resume=True)
    assert cache.stat().st_mtime_ns == stamp  # reused, not recomputed
    after = rows(tmp_path / "a", "train")
    assert after[:3] == before[:3] and [r["step"] for r in after] == [1, 2, 3, 4, 5, 6]  # steps 4-6 replaced
    assert [r["loss"] for r in after] == losses  # bit for bit
    assert (resumed["loss"], resumed["eval/loss"], resumed["eval/kl"]) == (
        full["loss"],
        full["eval/loss"],
        full["eval/kl"],
    )
    # the reference model run per batch, in micro-batches of 4, gives the precomputed run's losses
    live = train_kto(
        kto_config(
            micro_sft_model,
            thumbs,
            tmp_path / "b",
            train__precompute_ref=False,
            train__micro_batch_size=4,
            **over,
        )
    )
    assert [r["loss"] for r in rows(tmp_path / "b", "train")] == pytest.approx(losses, abs=1e-4)
    assert live["eval/margin"] == pytest.approx(full["eval/margin"], abs=1e-4)
    assert not (tmp_path / "b" / REF_CACHE).exists()


def test_lora_reference_is_the_base(micro_sft_model: Path, thumbs: dict[str, Path], tmp_path: Path) -> None:
    cfg = kto_config(
        micro_sft_model,
        thumbs,
        tmp_path / "lora",
        model__lora={"r": 4, "alpha": 8},
        loss__desirable_weight=1.2,
        train__max_steps=3,
        train__precompute_ref=False,
        log__eval_every=0,
    )
    summary = train_kto(cfg)
    first = rows(tmp_path / "lora", "train")[0]
    # the new adapter starts at zero: the policy is its base, the reference; losses λ/2 per example:
    # the mean is 0.5 · (1.2 · f + 1 · (1 − f)) with f the batch's share of thumbs up
    f = first["kto/desirable_frac"]
    assert first["loss"] == pytest.approx(0.5 * (1.2 * f + (1 - f)), abs=1e-5)
    assert summary["eval/margin"] != 0.0  # the adapter moved the policy away from its base


def test_cli_errors_are_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from heed.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["kto", "--set", "model.path=m", "--set", "data.train=t.jsonl", "--set", "train.batch_size=1"])
    assert exit_info.value.code == 2
    assert "train.batch_size" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "completion": "a", "label": "up"}\n')
    with pytest.raises(SystemExit) as exit_info:
        main(["kto", "--set", "model.path=m", "--set", f"data.train={bad}", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert f"{bad}:1: label: expected true (thumbs up) or false (thumbs down), got 'up'" in err


def test_shipped_config_runs_on_the_built_in_world() -> None:
    from heed.config import load_config

    cfg = load_config(KTOConfig, Path(__file__).parents[2] / "configs" / "kto.yaml")
    assert (cfg.model.path, cfg.data.train, cfg.data.eval) == (
        "builtin",
        "builtin:thumbs",
        "builtin:thumbs_eval",
    )
    # its weights sit in the paper's range for the built-in thumbs (620 up, 1427 down)
    assert weight_advice(620, 1427, cfg.loss.desirable_weight, cfg.loss.undesirable_weight) is None

"""Reward models on every backbone of ``tests/archs.py``: each encoder and each causal architecture
trains with ``heed.train.reward`` (its eval-mode ranking loss on the training groups falls), its
``final/`` loads with ``AutoModelForSequenceClassification``, and ``heed rm score`` gives what a plain
``transformers`` forward gives (encoders: ``model(**tokenizer(prompt, response))``, token types
included). Granite, which has no ``*ForSequenceClassification`` in transformers, gets Heed's generic
head; an architecture transformers does not know is a one-line error before anything is built.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from archs import CAUSAL, ENCODERS, WORDPIECE, causal_model_dir, encoder_model_dir
from heed.config import config_from_dict
from heed.config.reward import RMConfig
from heed.data.io import write_jsonl
from heed.demo.preferences import make_ranked_groups
from heed.errors import ModelLoadError

pytestmark = pytest.mark.usefixtures("one_thread")

# answers of different lengths, so one scoring batch is right-padded
PROMPTS = ["How should I get started with tea?", "Describe rain in a few words.", "Cats?"]
RESPONSES = [
    "Tea is wonderful and full of joy. People who try tea are often delighted.",
    "Rain often leads to frustration.",
    "Cats are fine.",
]


@pytest.fixture(scope="module")
def groups(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    """Eight ranked groups of three answers (24 responses, 24 pairs)."""
    rows = make_ranked_groups(8, k=3, seed=0)
    path = tmp_path_factory.mktemp("rm-archs") / "groups.jsonl"
    write_jsonl(path, rows)
    return path, rows


@pytest.fixture(scope="module")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("rm-arch-models")


def rm_config(path: Path, data: Path, out: Path, chat: str, steps: int, lr: float) -> RMConfig:
    return config_from_dict(
        RMConfig,
        {
            "model": {"path": str(path)},
            "data": {"train": str(data), "eval_split": 0, "chat": chat},
            "train": {"batch_size": 8, "max_steps": steps, "eval_batch_size": 7},
            "optim": {"lr": lr, "warmup_steps": 0},
            "log": {"progress": False, "log_every": 1},
            "out": str(out),
        },
    )


def heed_cli(*args: Any) -> int:
    """Run one ``heed`` command in this process (the CLI entry point); its exit code."""
    from heed.cli import main

    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def ranking_nll(rm: Any, rows: list[dict[str, Any]]) -> float:
    """Mean over the groups' ordered pairs of −log σ(r_w − r_l), scored in eval mode by ``rm``."""
    total, n = 0.0, 0
    for row in rows:
        r = rm.score([row["prompt"]] * len(row["responses"]), row["responses"])
        for i, a in enumerate(row["ranks"]):
            for j, b in enumerate(row["ranks"]):
                if a < b:
                    total += math.log1p(math.exp(-(r[i] - r[j])))
                    n += 1
    return total / n


def train_and_load(path: Path, groups: tuple[Path, list], out: Path, chat: str, steps: int, lr: float) -> Any:
    """Train a reward model on ``path``; check that learning happened; return the loaded ``final/``."""
    from heed.models.reward import build_reward_model, load_reward_model, reward_model_from
    from heed.train.reward import train_reward

    data, rows = groups
    start, tok, _ = build_reward_model(path, seed=0)  # what the trainer starts from (seed 0)
    start.config.heed_chat = chat == "true"
    before = ranking_nll(reward_model_from(start.eval(), tok), rows)
    summary = train_reward(rm_config(path, data, out, chat, steps, lr))
    rm = load_reward_model(out / "final")
    after = ranking_nll(rm, rows)
    assert after < before - 0.005, (before, after)
    # evaluation ran without dropout: the saved statistics are the mean / std of eval-mode scores
    responses = [(row["prompt"], r) for row in rows for r in row["responses"]]
    scores = torch.tensor(rm.score([p for p, _ in responses], [r for _, r in responses]))
    stats = json.loads((out / "final" / "reward_stats.json").read_text())
    assert stats["count"] == len(responses) and stats["split"] == "train"
    assert abs(stats["mean"] - scores.mean().item()) < 1e-5
    assert abs(stats["std"] - scores.std(unbiased=False).item()) < 1e-5
    assert summary["reward_mean"] == stats["mean"]
    return rm


@pytest.mark.parametrize("name", list(ENCODERS))
def test_encoder_reward_model_scores_like_transformers_with_token_types(
    name: str, groups: tuple[Path, list], models_root: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = encoder_model_dir(name, models_root)
    rm = train_and_load(path, groups, tmp_path / "run", chat="false", steps=8, lr=1e-2)
    assert rm.backbone == "encoder" and not rm.chat
    final = tmp_path / "run" / "final"
    hf = AutoModelForSequenceClassification.from_pretrained(final).eval()
    tok = AutoTokenizer.from_pretrained(final)
    ours = rm.score(PROMPTS, RESPONSES, batch_size=3)  # one right-padded batch
    dropped = []
    for p, r, s in zip(PROMPTS, RESPONSES, ours, strict=True):
        enc = tok(p, r, return_tensors="pt")
        with torch.no_grad():
            assert abs(hf(**enc).logits[0, 0].item() - s) < 1e-5, (p, r)
            no_types = {k: v for k, v in enc.items() if k != "token_type_ids"}
            dropped.append(abs(hf(**no_types).logits[0, 0].item() - s))
    if name in WORDPIECE:
        assert "token_type_ids" in tok(PROMPTS[0], RESPONSES[0])
    if name in ("bert", "deberta_v2", "electra"):
        # token types really change these models' scores, so the 1e-5 check above sees them
        assert max(dropped) > 1e-3, dropped


def test_frozen_encoder_features_read_token_types(models_root: Path) -> None:
    """The cheap variant's cached features are the position-0 states of a forward with token types."""
    from heed.models.reward import FrozenFeatures, build_reward_model, pad_right, pad_types, reward_model_from

    model, tok, backbone = build_reward_model(encoder_model_dir("bert", models_root), head="mlp", seed=0)
    model.eval()
    rm = reward_model_from(model, tok)
    rm.chat = False
    seqs, types, _ = rm.tokenize(PROMPTS, RESPONSES)
    assert types is not None and any(1 in t for t in types)
    ids, att = pad_right(seqs, tok.pad_token_id)
    tt = pad_types(types)
    frozen = FrozenFeatures(model, backbone)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=att, token_type_ids=tt).logits[:, 0]
        torch.testing.assert_close(frozen.head(frozen.features(ids, att, tt)), full, atol=1e-5, rtol=1e-5)
        states = model.bert(input_ids=ids, attention_mask=att, token_type_ids=tt).last_hidden_state
        torch.testing.assert_close(frozen.features(ids, att, tt), states[:, 0])


@pytest.mark.parametrize("name", list(CAUSAL))
def test_causal_reward_model_trains_and_scores(
    name: str, groups: tuple[Path, list], models_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = causal_model_dir(name, models_root)
    rm = train_and_load(path, groups, tmp_path / "run", chat="auto", steps=5, lr=3e-3)
    final = tmp_path / "run" / "final"
    assert rm.backbone == "decoder" and rm.chat  # the micro tokenizer has a chat template

    # heed rm score on the CLI: scoring sets dropout off even when the caller left the model training
    rm.model.train()
    ours = rm.score(PROMPTS, RESPONSES, batch_size=3)
    assert rm.model.training
    assert (
        heed_cli(
            "rm", "score", "--model", final, "--prompt", PROMPTS[0], "-r", RESPONSES[0], "-r", RESPONSES[1]
        )
        == 0
    )
    printed = [float(x) for x in capsys.readouterr().out.split()]
    expected = rm.score(PROMPTS[:1] * 2, RESPONSES[:2])
    assert len(printed) == 2 and all(abs(a - b) < 1e-5 for a, b in zip(printed, expected, strict=True))

    # plain transformers, one unpadded sequence at a time, eval mode
    hf = AutoModelForSequenceClassification.from_pretrained(final).eval()
    tok = AutoTokenizer.from_pretrained(final)
    for p, r, s in zip(PROMPTS, RESPONSES, ours, strict=True):
        text = tok.apply_chat_template(
            [{"role": "user", "content": p}, {"role": "assistant", "content": r}], tokenize=False
        )
        with torch.no_grad():
            plain = hf(**tok(text, return_tensors="pt", add_special_tokens=False)).logits[0, 0].item()
        assert abs(plain - s) < 1e-5, (p, r, plain, s)


def test_granite_final_loads_in_a_fresh_python_with_transformers_alone(
    groups: tuple[Path, list], models_root: Path, tmp_path: Path
) -> None:
    """transformers has no GraniteForSequenceClassification: final/ carries Heed's generic class as
    remote code, so a Python that never imported Heed loads it with trust_remote_code=True."""
    from heed.models.reward import GENERIC_CODE_FILE, load_reward_model
    from heed.train.reward import train_reward

    data, _ = groups
    out = tmp_path / "run"
    train_reward(rm_config(causal_model_dir("granite", models_root), data, out, "false", steps=2, lr=3e-3))
    final = out / "final"
    config = json.loads((final / "config.json").read_text())
    assert config["architectures"] == ["GraniteForSequenceClassification"]
    assert (final / GENERIC_CODE_FILE).is_file()
    ours = load_reward_model(final).score(PROMPTS[:1], RESPONSES[:1])[0]
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForSequenceClassification, AutoTokenizer\n"
        "m = AutoModelForSequenceClassification.from_pretrained(sys.argv[1], trust_remote_code=True).eval()\n"
        "t = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "ids = t(sys.argv[2] + sys.argv[3] + t.eos_token, add_special_tokens=False, return_tensors='pt')\n"
        "print(type(m).__name__, m(**ids).logits[0, 0].item())\n"
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)  # no Heed on the path
    res = subprocess.run(
        [sys.executable, "-c", script, str(final), PROMPTS[0], RESPONSES[0]],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    cls, value = res.stdout.split()[-2:]
    assert cls == "GraniteForSequenceClassification" and abs(float(value) - ours) < 1e-5


def test_unknown_architecture_is_one_line_before_anything_is_built(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from heed.models.reward import build_reward_model

    folder = tmp_path / "mystery"
    folder.mkdir()  # no weights, no tokenizer: an error about those would mean Heed went too far
    (folder / "config.json").write_text(
        json.dumps({"model_type": "heedfoo", "architectures": ["HeedFooForCausalLM"]})
    )
    with pytest.raises(ModelLoadError) as err:
        build_reward_model(folder)
    msg = str(err.value)
    assert "\n" not in msg and "HeedFooForCausalLM" in msg and "'heedfoo'" in msg and "does not know" in msg
    # transformers knows Marian but has no sequence classifier for it, and it is encoder-decoder
    marian = tmp_path / "marian"
    marian.mkdir()
    (marian / "config.json").write_text(
        json.dumps({"model_type": "marian", "architectures": ["MarianMTModel"]})
    )
    with pytest.raises(
        ModelLoadError, match=r"no sequence-classification class for MarianMTModel .*encoder-decoder"
    ):
        build_reward_model(marian)
    data = tmp_path / "g.jsonl"
    write_jsonl(data, make_ranked_groups(4, k=2, seed=0))
    assert (
        heed_cli(
            "rm",
            "train",
            "--set",
            f"model.path={folder}",
            "--set",
            f"data.train={data}",
            "--out",
            tmp_path / "r",
        )
        == 2
    )
    assert capsys.readouterr().err.strip().count("\n") == 0

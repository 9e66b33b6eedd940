"""What a failing run leaves behind: damaged checkpoints fall back, a full disk keeps the last
checkpoint, overwrite loses nothing until the new run has started, torn logs are repaired on resume,
and runs that would learn nothing (no weight, no reward) stop with a clear error."""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch

from heed.config import config_from_dict
from heed.config.base import set_dotted
from heed.config.dpo import DPOConfig
from heed.config.reward import RMConfig
from heed.config.rl import RLConfig
from heed.config.sft import SFTConfig
from heed.errors import DataError, HeedError, RunInterrupted, StorageError
from heed.report.metrics import read_metrics, repair_jsonl
from heed.rewards.combine import NoneRewardWatch, RewardError
from heed.train import common
from heed.train.common import check_batch_weight, checkpoint_problem, list_checkpoints
from heed.train.sft import train_sft

pytestmark = pytest.mark.usefixtures("one_thread")


def sft_cfg(model: Path, data: Path, out: Path, **over: Any) -> SFTConfig:
    raw: dict[str, Any] = {
        "model": {"path": str(model)},
        "data": {"train": str(data), "max_length": 48, "eval_split": 0.02},
        "train": {"batch_size": 8, "max_steps": 6, "seed": 1},
        "optim": {"lr": 3e-3},
        "log": {"log_every": 1, "progress": False, "save_every": 2},
        "out": str(out),
    }
    for key, value in over.items():
        set_dotted(raw, key, value)
    return config_from_dict(SFTConfig, raw)


def train_steps(run: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run) if r["split"] == "train"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory, micro_sft_model: Path, corpus_files: dict) -> dict:
    """An uninterrupted 6-step SFT run with checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("straight") / "run"
    summary = train_sft(sft_cfg(micro_sft_model, corpus_files["chat"], run))
    assert [p.name for p in list_checkpoints(run)] == ["step-2", "step-4"]
    return {"run": run, "summary": summary}


# --- damaged checkpoints ---------------------------------------------------------------------------
@pytest.mark.parametrize("damaged", ["trainer_state.pt", "model.safetensors"])
def test_a_damaged_last_checkpoint_falls_back_to_the_one_before(
    damaged: str, straight: dict, tmp_path: Path, micro_sft_model: Path, corpus_files: dict
) -> None:
    run = tmp_path / "run"
    shutil.copytree(straight["run"], run)
    shutil.rmtree(run / "final")  # as if killed after step 5
    f = run / "checkpoints" / "step-4" / damaged
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # truncated, as a full disk or a kill leaves it
    assert "unreadable" in (checkpoint_problem(f.parent) or "")

    with pytest.warns(UserWarning, match=f"step-4: {damaged} is unreadable.*resuming from step-2 instead"):
        resumed = train_sft(sft_cfg(micro_sft_model, corpus_files["chat"], run), resume=True)
    # steps 3-6 replayed from step-2 retrace the uninterrupted run exactly
    assert resumed["train/loss"] == pytest.approx(straight["summary"]["train/loss"], abs=1e-6)
    assert train_steps(run) == [1, 2, 3, 4, 5, 6]
    assert (run / "checkpoints" / ".damaged-step-4").is_dir()
    assert checkpoint_problem(run / "checkpoints" / "step-4") is None  # written again, whole


def test_load_trainer_state_names_a_damaged_file(tmp_path: Path) -> None:
    (tmp_path / common.STATE_FILE).write_bytes(b"PK\x03\x04 torn")
    with pytest.raises(HeedError, match=r"trainer_state.pt: cannot be read .*delete"):
        common.load_trainer_state(tmp_path, None)


# --- full disk -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),  # torch.save's
    ],
    ids=["ENOSPC", "torch-unexpected-pos"],
)
def test_full_disk_removes_the_partial_checkpoint_and_keeps_the_last(
    error: Exception,
    straight: dict,
    tmp_path: Path,
    micro_sft_model: Path,
    corpus_files: dict,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_save = torch.save
    saves = []

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        saves.append(f)
        if len(saves) == 2:  # the second checkpoint (step 4): half a file, then the disk is full
            Path(f).write_bytes(b"\0" * 4096)
            raise error
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(common.torch, "save", save)
    run = tmp_path / "run"
    cfg = sft_cfg(micro_sft_model, corpus_files["chat"], run)
    with pytest.raises(StorageError, match=r"no space left on .*checkpoints while writing checkpoint step-4"):
        train_sft(cfg)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2"]  # no .step-4.tmp
    assert checkpoint_problem(run / "checkpoints" / "step-2") is None and not (run / "final").exists()

    monkeypatch.setattr(common.torch, "save", real_save)  # space freed: resume finishes the same run
    resumed = train_sft(cfg, resume=True)
    assert resumed["train/loss"] == pytest.approx(straight["summary"]["train/loss"], abs=1e-6)
    assert train_steps(run) == [1, 2, 3, 4, 5, 6]


def test_a_really_full_disk(tmp_path: Path, micro_sft_model: Path, corpus_files: dict) -> None:
    """The same on a 3 MiB tmpfs (one checkpoint of the micro model is ~2 MiB): the second fails."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)]
    if subprocess.run(mount, capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        run = disk / "run"
        cfg = sft_cfg(
            micro_sft_model, corpus_files["chat"], run, **{"log.save_every": 1, "log.keep_checkpoints": 1}
        )
        with pytest.raises(StorageError, match="no space left on") as err:
            train_sft(cfg)
        assert "step-1, is intact" in str(err.value)
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-1"]
        assert checkpoint_problem(run / "checkpoints" / "step-1") is None
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)  # lazy: the failed run may still hold a file


# --- overwrite and resume rules --------------------------------------------------------------------
def _snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def test_overwrite_keeps_the_old_run_until_the_new_one_has_started(
    straight: dict, tmp_path: Path, micro_sft_model: Path, corpus_files: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    shutil.copytree(straight["run"], run)
    before = _snapshot(run)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"\n')

    # 1. malformed data: the old run is untouched
    with pytest.raises(DataError, match=f"{bad}:2"):
        train_sft(sft_cfg(micro_sft_model, bad, run, overwrite=True))
    assert _snapshot(run) == before

    # 2. Ctrl-C before the new run's first checkpoint: the old run is put back
    from heed.train import sft

    def interrupt(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(sft, "lm_token_losses", interrupt)
        with pytest.raises(RunInterrupted, match="previous run there was put back"):
            train_sft(sft_cfg(micro_sft_model, corpus_files["chat"], run, overwrite=True))
    assert _snapshot(run) == before

    # 3. a new run that starts: the old one is gone once the new one has its first checkpoint
    summary = train_sft(
        sft_cfg(micro_sft_model, corpus_files["chat"], run, overwrite=True, **{"train.max_steps": 3})
    )
    assert summary["steps"] == 3 and train_steps(run) == [1, 2, 3]
    assert [p.name for p in list_checkpoints(run)] == ["step-2"]
    assert not (run / common.PREVIOUS_RUN).exists()


def test_resume_needs_a_checkpoint_unless_there_is_no_run_yet(
    tmp_path: Path, micro_sft_model: Path, corpus_files: dict
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 1.0}\n')
    with pytest.raises(HeedError, match="no checkpoint to continue from"):
        train_sft(sft_cfg(micro_sft_model, corpus_files["chat"], run), resume=True)
    assert (run / "metrics.jsonl").read_text().count("\n") == 1 and not (run / "final").exists()

    fresh = tmp_path / "fresh"  # --resume on a folder without a run starts one (scripts may always pass it)
    with pytest.warns(UserWarning, match="no run to resume yet; starting one"):
        train_sft(
            sft_cfg(micro_sft_model, corpus_files["chat"], fresh, **{"train.max_steps": 2}), resume=True
        )
    assert train_steps(fresh) == [1, 2]


# --- JSONL logs ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "content, repaired",
    [
        (b'{"step": 1}\n{"step": 2}\n', b'{"step": 1}\n{"step": 2}\n'),  # whole: unchanged
        (b'{"step": 1}\n{"step": 2, "lo', b'{"step": 1}\n'),  # torn tail cut
        (b'{"step": 1}\n{"step": 2}', b'{"step": 1}\n{"step": 2}\n'),  # whole row, newline missing
        (b'{"ste', b""),  # the only line torn
        (b'{"step": 1}\n{"x": "\xc3', b'{"step": 1}\n'),  # torn inside a UTF-8 character
    ],
)
def test_repair_jsonl(tmp_path: Path, content: bytes, repaired: bytes) -> None:
    f = tmp_path / "log.jsonl"
    f.write_bytes(content)
    assert repair_jsonl(f) == (content != repaired)
    assert f.read_bytes() == repaired


def _rl_cfg(out: Path, **over: Any) -> RLConfig:
    raw: dict[str, Any] = {
        "model": {"path": "builtin:micro"},
        "data": {"prompts": "builtin:micro:prompts_train", "eval_prompts": "builtin:micro:prompts_eval"},
        "rewards": [{"function": "length_penalty", "args": {"per_word": 0.1}}],
        "rollout": {"prompts_per_step": 2, "k": 2, "max_new_tokens": 8},
        "eval": {"num_prompts": 2, "samples": 2, "at_start": True},
        "train": {"updates": 3},
        "log": {"progress": False, "save_every": 1, "eval_every": 1},
        "out": str(out),
    }
    for key, value in over.items():
        set_dotted(raw, key, value)
    from heed.demo.builtin import resolve_config

    return resolve_config(config_from_dict(RLConfig, raw, "test"))


def test_rl_resume_repairs_torn_logs_and_counts_the_whole_run(tmp_path: Path) -> None:
    from heed.train.rl import train_rl

    run = tmp_path / "rl"
    train_rl(_rl_cfg(run))
    # as if killed during update 3: its checkpoint is step-2, and every log ends in a torn line
    (run / "final").rename(tmp_path / "final")
    (run / "summary.json").unlink()
    for name in ("metrics.jsonl", "samples.jsonl", "alarms.jsonl"):
        with (run / name).open("a") as fh:
            fh.write('{"step": 3, "prompt": "torn')
    before = torch.load(run / "checkpoints" / "step-2" / common.STATE_FILE, weights_only=False)["extra"][
        "totals"
    ]
    assert before["samples"] == 2 * 4

    with pytest.warns(UserWarning, match="torn last line"):
        summary = train_rl(_rl_cfg(run), resume=True)
    assert train_steps(run) == [1, 2, 3]
    for name in ("metrics.jsonl", "samples.jsonl", "alarms.jsonl"):
        [json.loads(line) for line in (run / name).read_text().splitlines()]  # every line whole
    # the summary counts the whole run, not the resumed update only
    assert summary["samples"] == 3 * 4
    assert summary["train_seconds"] > before["train_seconds"]
    assert summary["samples_per_s"] == pytest.approx(summary["samples"] / summary["train_seconds"])


# --- runs that would learn nothing -----------------------------------------------------------------
def test_a_reward_that_is_always_none_stops_the_run(tmp_path: Path) -> None:
    from heed.train.rl import train_rl

    silent = tmp_path / "silent.py"
    silent.write_text("def reward(prompts, completions, **cols):\n    return [None] * len(completions)\n")
    cfg = _rl_cfg(
        tmp_path / "rl",
        rewards=[{"function": f"{silent}:reward", "name": "silent"}],
        **{"train.updates": 5, "train.max_none_updates": 2, "log.save_every": 0, "eval.at_start": False},
    )
    with pytest.raises(
        RewardError, match=r"steps 1-2: reward 'silent' returned None for every answer of 2 updates"
    ):
        train_rl(cfg)


def test_none_watch_counts_consecutive_all_none_batches() -> None:
    watch = NoneRewardWatch(3)
    watch.update([None, None], {"a": [None, None]}, 1)
    watch.update([None, None], {"a": [None, None]}, 2)
    watch.update([None, 1.0], {"a": [None, 1.0]}, 3)  # one scored answer: the streak starts again
    watch.update([None, None], {"a": [1.0, None], "b": [None, 2.0]}, 4)
    watch.update([None, None], {"a": [None, None], "b": [1.0, 1.0]}, 5)
    with pytest.raises(
        RewardError, match=r"steps 4-6: reward 'a' returned None for every answer of 3 updates"
    ):
        watch.update([None, None], {"a": [None, None], "b": [1.0, 1.0]}, 6)
    NoneRewardWatch(0).update([None], {"a": [None]}, 1)  # 0: never stops


def test_check_batch_weight() -> None:
    assert check_batch_weight([0.5, 0.0, 1.5], ["f:1", "f:2", "f:3"], 1) == 2.0
    with pytest.raises(
        DataError,
        match=r"step 7: the `weight` of this batch's 4 records sums to 0 \(f:1, f:2, f:3 and 1 more\)",
    ):
        check_batch_weight([1.0, -1.0, 0.0, 0.0], ["f:1", "f:2", "f:3", "f:4"], 7)


def _zero_weight_pairs(path: Path, n: int = 8) -> Path:
    rows = [
        {
            "prompt": f"Tell me about tea {i}.",
            "chosen": "Tea is a warm drink.",
            "rejected": "No.",
            "weight": 0,
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("trainer", ["rm", "dpo"])
def test_a_batch_without_weight_is_refused(trainer: str, tmp_path: Path, micro_sft_model: Path) -> None:
    data = _zero_weight_pairs(tmp_path / "pairs.jsonl")
    common_raw: dict[str, Any] = {
        "model": {"path": str(micro_sft_model)},
        "data": {"train": str(data), "eval_split": 0},
        "train": {"batch_size": 4, "max_steps": 2},
        "log": {"progress": False},
        "out": str(tmp_path / trainer),
    }
    if trainer == "rm":
        from heed.train.reward import train_reward

        run = lambda: train_reward(config_from_dict(RMConfig, common_raw))  # noqa: E731
    else:
        from heed.train.dpo import train_dpo

        run = lambda: train_dpo(config_from_dict(DPOConfig, common_raw))  # noqa: E731
    with pytest.raises(DataError, match=rf"step 1: .*weight.* sums to 0 \({data}:\d+"):
        run()


def test_a_damaged_reference_cache_is_recomputed(tmp_path: Path, micro_sft_model: Path) -> None:
    from heed.train.dpo import train_dpo
    from heed.train.reference import REF_CACHE

    data = tmp_path / "pairs.jsonl"
    rows = [
        {"prompt": f"Tell me about tea {i}.", "chosen": f"Tea {i} is a warm drink.", "rejected": "No."}
        for i in range(8)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw: dict[str, Any] = {
        "model": {"path": str(micro_sft_model)},
        "data": {"train": str(data), "eval_split": 0},
        "train": {"batch_size": 4, "max_steps": 3},
        "log": {"progress": False, "save_every": 2, "log_every": 1},
        "out": str(tmp_path / "dpo"),
    }
    full = train_dpo(config_from_dict(DPOConfig, raw))
    cache = tmp_path / "dpo" / REF_CACHE
    cache.write_bytes(cache.read_bytes()[:100])
    with pytest.warns(UserWarning, match=f"{REF_CACHE}: unreadable .*recomputing it"):
        resumed = train_dpo(config_from_dict(DPOConfig, raw), resume=True)
    assert resumed["loss"] == pytest.approx(full["loss"], abs=1e-6)
    assert torch.load(cache, weights_only=True)["train"].shape[0] == 8  # written again, whole


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.lr=.inf", "optim.lr"),
        ("kl.beta=.inf", "kl.beta"),
        ("kl.beta=.nan", "kl.beta"),
        ("optim.betas=[0.9, .inf]", "optim.betas.1"),
        ("rewards=[{function: length_penalty, weight: -.inf}]", "rewards.0.weight"),
    ],
)
def test_configs_refuse_non_finite_numbers(override: str, key: str) -> None:
    from heed.config import load_config

    base = ["model.path=builtin:micro", "data.prompts=p.jsonl", "rewards=[{function: length_penalty}]"]
    with pytest.raises(HeedError, match=rf"config key '{key}': Input should be a finite number"):
        load_config(RLConfig, None, [*base, override])

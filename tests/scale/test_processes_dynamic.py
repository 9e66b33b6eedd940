"""DAPO's dynamic sampling on 2 processes (torchrun, gloo): each process fills its own share of
informative groups, and both then train on the same number of groups (the smaller count), so the
update's collectives stay in step."""

from __future__ import annotations

import json
from pathlib import Path

from scale.test_processes import _launch, _rl_config, two_processes  # noqa: F401  (fixture)

SHORT = "def reward(prompts, completions, **cols):\n    return [float(len(c.split()) <= 3) for c in completions]\n"


def test_dynamic_sampling_on_two_processes(
    two_processes: None,  # noqa: F811
    tmp_path: Path,
    micro_sft_model: Path,
    corpus_files: dict,
) -> None:
    reward = tmp_path / "short.py"
    reward.write_text(SHORT)
    run = tmp_path / "two"
    cfg = _rl_config(
        tmp_path,
        micro_sft_model,
        corpus_files["prompts_train"],
        run,
        algorithm="grpo",
        rewards=[{"function": f"{reward}:reward", "name": "short"}],
        **{"rollout.dynamic_sampling": True, "rollout.dynamic_sampling_rounds": 1, "train.updates": 2},
    )
    res = _launch(["-m", "heed", "rl", "--config", str(cfg)])
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [
        r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"
    ]
    assert len(rows) == 2
    for r in rows:
        kept = r["dynamic/kept_groups"]
        # both processes keep the same count (the smaller): an even total, at most the 8 prompts
        assert kept % 2 == 0 and 0 < kept <= 8, r
        assert r["dynamic/dropped_groups"] > 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["processes"] == 2

import json
import math

import pytest

from heed.report.metrics import MetricsLogger, read_metrics, series


def test_metrics_jsonl_rows_and_torn_line(tmp_path):
    log = MetricsLogger(tmp_path)
    log.log(0, {"loss": 2.0, "reward/mean": float("nan")})
    log.log(1, {"loss": 1.5, "kl/k1": math.inf})
    log.log(1, {"gold/positivity": 0.4}, split="eval")
    with (tmp_path / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 2, "lo')  # a run killed mid-write
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 1, 1]
    assert rows[0]["reward/mean"] is None and rows[1]["kl/k1"] == 1e308
    assert list(series(rows, "loss")) == [(0, 2.0), (1, 1.5)]
    assert list(series(rows, "gold/positivity", split="eval")) == [(1, 0.4)]


def test_truncate_after_for_resume(tmp_path):
    log = MetricsLogger(tmp_path)
    for step in range(5):
        log.log(step, {"loss": 1.0 / (step + 1)})
    log.truncate_after(2)
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2]
    assert all(json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines())


def test_tensorboard_events_hold_the_scalars(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install tensorboard)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = MetricsLogger(tmp_path, tensorboard=True)
    for step in range(3):
        log.log(step, {"loss": 3.0 - step, "reward/mean": 0.5 * step})
    log.log(2, {"gold/positivity": 0.75}, split="eval")
    log.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/reward/mean", "eval/gold/positivity"} <= tags
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(0, 3.0), (1, 2.0), (2, 1.0)]
    assert [e.value for e in acc.Scalars("eval/gold/positivity")] == [0.75]

import pytest

from heed.config import load_config
from heed.errors import ConfigError
from heed.report.monitors import (
    ALARM_KINDS,
    Alarm,
    Monitor,
    MonitorConfig,
    append_alarms,
    read_alarms,
    replay,
    resume_monitor,
)


def run(monitor: Monitor, history: list[dict], batches: dict | None = None) -> list[Alarm]:
    out = []
    for step, metrics in enumerate(history):
        completions, rewards = (batches or {}).get(step, (None, None))
        out += monitor.update(step, metrics, completions, rewards)
    return out


def kinds(alarms: list[Alarm]) -> list[tuple[str, int]]:
    return [(a.kind, a.step) for a in alarms]


# -- KL budget, and the no-repeat / re-fire rule ------------------------------------------------


def test_kl_budget_fires_once_and_again_after_clearing():
    m = Monitor(MonitorConfig(kl_budget=10.0, smooth=1))
    alarms = run(m, [{"kl/k1": v} for v in [1, 2, 11, 12, 3, 11]])
    # over at step 2 (fires), still over at 3 (silent), under at 4 (clears), over at 5 (fires again)
    assert kinds(alarms) == [("kl_budget", 2), ("kl_budget", 5)]
    assert alarms[0].value == 11 and alarms[0].threshold == 10.0
    assert "step 2" in str(alarms[0]) and "budget" in alarms[0].message


def test_kl_under_budget_and_spike_smoothed_away():
    assert run(Monitor(MonitorConfig(kl_budget=10.0, smooth=1)), [{"kl/k1": v} for v in [1, 5, 9.9]]) == []
    # smooth=3: trailing means 6, (6+12)/2=9, (6+12+9)/3=9 -> one 12-nat spike does not fire
    spiky = [{"kl/k1": v} for v in [6, 12, 9]]
    assert run(Monitor(MonitorConfig(kl_budget=10.0, smooth=3)), spiky) == []
    assert kinds(run(Monitor(MonitorConfig(kl_budget=10.0, smooth=1)), spiky)) == [("kl_budget", 1)]


def test_missing_key_neither_fires_nor_clears():
    m = Monitor(MonitorConfig(kl_budget=10.0, smooth=1))
    alarms = run(m, [{"kl/k1": 11}, {"loss": 1.0}, {"kl/k1": 12}])
    assert kinds(alarms) == [("kl_budget", 0)]
    assert "kl_budget" in m.active


def test_disabled_and_null_threshold():
    assert run(Monitor(MonitorConfig(enabled=False)), [{"kl/k1": 100}]) == []
    assert run(Monitor(MonitorConfig(kl_budget=None)), [{"kl/k1": 100}]) == []


# -- entropy ---------------------------------------------------------------------------------------


def test_entropy_collapse():
    cfg = MonitorConfig(min_entropy_ratio=0.3, smooth=1)
    # ratios to the first value 2.0: 0.75, 0.5, 0.25 -> below 0.3 at step 3
    alarms = run(Monitor(cfg), [{"entropy": v} for v in [2.0, 1.5, 1.0, 0.5]])
    assert kinds(alarms) == [("entropy_collapse", 3)]
    assert alarms[0].value == pytest.approx(0.25)
    # 0.7 / 2.0 = 0.35 stays above the floor
    assert run(Monitor(cfg), [{"entropy": v} for v in [2.0, 1.5, 1.0, 0.7]]) == []


# -- proxy vs gold -------------------------------------------------------------------------------


def test_overoptimisation_fires_when_gold_falls_as_proxy_rises():
    cfg = MonitorConfig(gold_key="gold/x", gold_drop=0.05, smooth=1)
    gold = [0.3, 0.5, 0.6, 0.56, 0.5]
    proxy = [0.1, 0.3, 0.5, 0.7, 0.9]
    alarms = run(Monitor(cfg), [{"gold/x": g, "reward/mean": p} for g, p in zip(gold, proxy, strict=True)])
    # best gold 0.6 at step 2; step 3 drop 0.04 < 0.05; step 4 drop 0.1 with proxy 0.9 > 0.5 -> fires
    assert kinds(alarms) == [("overoptimisation", 4)]
    assert alarms[0].value == pytest.approx(0.1)
    assert "best 0.6 (step 2)" in alarms[0].message


def test_overoptimisation_silent_when_both_fall_or_no_gold_key():
    gold = [0.3, 0.5, 0.6, 0.56, 0.5]
    proxy_falls = [0.1, 0.3, 0.5, 0.4, 0.3]  # everything got worse: not reward hacking
    history = [{"gold/x": g, "reward/mean": p} for g, p in zip(gold, proxy_falls, strict=True)]
    assert run(Monitor(MonitorConfig(gold_key="gold/x", smooth=1)), history) == []
    rising = [{"gold/x": g, "reward/mean": p} for g, p in zip(gold, [0.1, 0.3, 0.5, 0.7, 0.9], strict=True)]
    assert run(Monitor(MonitorConfig(gold_key=None, smooth=1)), rising) == []


# -- length ----------------------------------------------------------------------------------------


def test_length_trend():
    cfg = MonitorConfig(window=5, length_corr_threshold=0.6, length_growth=0.2, smooth=1)
    rewards = [0.1, 0.2, 0.3, 0.4, 0.5]
    grows = [10, 11, 12, 13, 14]  # r = 1, growth (14 - 10) / 10 = 0.4
    hist = [{"reward/mean": r, "length/mean": n} for r, n in zip(rewards, grows, strict=True)]
    alarms = run(Monitor(cfg), hist)
    assert kinds(alarms) == [("length_trend", 4)]
    assert alarms[0].value == pytest.approx(1.0)
    barely = [10, 10.1, 10.2, 10.3, 10.4]  # r = 1 but growth 0.04 < 0.2
    hist = [{"reward/mean": r, "length/mean": n} for r, n in zip(rewards, barely, strict=True)]
    assert run(Monitor(cfg), hist) == []
    wobble = [10, 12, 10, 12, 10]  # r = 0: length does not follow reward
    hist = [{"reward/mean": r, "length/mean": n} for r, n in zip(rewards, wobble, strict=True)]
    assert run(Monitor(cfg), hist) == []


def _answers_of_length(lengths):
    return [" ".join(f"w{i}x{j}" for j in range(n)) for i, n in enumerate(lengths)]


def test_length_bias_in_one_batch():
    cfg = MonitorConfig(length_corr_threshold=0.6, min_batch=8)
    texts = _answers_of_length(range(1, 9))
    alarms = Monitor(cfg).update(0, {}, texts, [float(n) for n in range(1, 9)])
    assert kinds(alarms) == [("length_bias", 0)]
    assert alarms[0].value == pytest.approx(1.0)
    # lengths 1..8 vs rewards 1,0,1,0,0,1,0,1: sum (x - 4.5)(y - 0.5) = 0 -> r = 0
    assert Monitor(cfg).update(0, {}, texts, [1, 0, 1, 0, 0, 1, 0, 1]) == []
    # a batch under min_batch is not judged
    assert Monitor(cfg).update(0, {}, texts[:4], [1, 2, 3, 4]) == []


# -- diversity -------------------------------------------------------------------------------------


def test_mode_collapse_fires_both_diversity_alarms():
    cfg = MonitorConfig(min_distinct_2=0.2, max_duplicate_frac=0.5)
    same = ["the cat sat on the mat"] * 8
    # 5 bigrams per answer, 5 distinct in 40 -> distinct-2 0.125; 7 of 8 repeat -> 0.875
    alarms = Monitor(cfg).update(3, {}, same, None)
    assert sorted(kinds(alarms)) == [("low_distinct", 3), ("repeated_answers", 3)]
    by_kind = {a.kind: a for a in alarms}
    assert by_kind["low_distinct"].value == pytest.approx(0.125)
    assert by_kind["repeated_answers"].value == pytest.approx(0.875)


def test_low_distinct_without_duplicates_and_duplicates_without_low_distinct():
    cfg = MonitorConfig(min_distinct_2=0.2, max_duplicate_frac=0.5)
    # "good x6 tail_i": 7 bigrams each, 56 in all; distinct (good good) + 8 (good tail_i) = 9 -> 0.16
    samey = [" ".join(["good"] * 7 + [f"t{i}"]) for i in range(8)]
    alarms = Monitor(cfg).update(0, {}, samey, None)
    assert kinds(alarms) == [("low_distinct", 0)]
    assert alarms[0].value == pytest.approx(9 / 56)
    # 6 copies of "alpha beta" + 2 answers of 10 fresh words: dup 5/8; bigrams 6 + 9 + 9 = 24,
    # distinct 1 + 18 = 19 -> distinct-2 0.79
    copies = ["alpha beta"] * 6 + [" ".join(f"u{i}v{j}" for j in range(10)) for i in range(2)]
    alarms = Monitor(cfg).update(0, {}, copies, None)
    assert kinds(alarms) == [("repeated_answers", 0)]
    assert alarms[0].value == pytest.approx(5 / 8)
    diverse = [f"answer {i} says w{i} and v{i}" for i in range(8)]
    assert Monitor(cfg).update(0, {}, diverse, None) == []


def test_logged_diversity_is_used_without_a_batch():
    cfg = MonitorConfig(min_distinct_2=0.2, max_duplicate_frac=0.5, smooth=1)
    alarms = run(Monitor(cfg), [{"diversity/distinct_2": 0.5}, {"diversity/distinct_2": 0.1}])
    assert kinds(alarms) == [("low_distinct", 1)]


# -- replay and files ------------------------------------------------------------------------------


def test_replay_uses_eval_gold_and_sample_batches():
    cfg = MonitorConfig(gold_key="gold/x", gold_drop=0.05, smooth=1, kl_budget=5.0)
    rows = []
    proxy = [0.1, 0.3, 0.5, 0.7, 0.9]
    gold = [0.3, 0.5, 0.6, 0.56, 0.5]
    for step in range(5):
        rows.append({"step": step, "split": "train", "reward/mean": proxy[step], "kl/k1": step * 2.0})
        rows.append({"step": step, "split": "eval", "gold/x": gold[step], "reward/mean": -1.0})
    samples = [{"step": 4, "prompt": "p", "completion": "same answer", "reward": 1.0}] * 8
    alarms = replay(rows, cfg, samples)
    # kl 6 > 5 at step 3; gold 0.5 vs best 0.6 at step 4 while proxy (train, not eval's -1) rose;
    # the 8 identical samples at step 4 repeat each other (7/8) and have distinct-2 1/8
    assert sorted(kinds(alarms)) == [
        ("kl_budget", 3),
        ("low_distinct", 4),
        ("overoptimisation", 4),
        ("repeated_answers", 4),
    ]


def test_alarms_file_roundtrip(tmp_path):
    assert read_alarms(tmp_path) is None
    append_alarms(tmp_path, [])
    assert read_alarms(tmp_path) == []  # the file exists: the monitors ran and found nothing
    a = Alarm("kl_budget", 7, "KL <b>high</b>", 12.5, 10.0)
    append_alarms(tmp_path, [a])
    with (tmp_path / "alarms.jsonl").open("a") as fh:
        fh.write('{"torn": ')
    assert read_alarms(tmp_path) == [a]


def test_monitor_config_loads_with_overrides_and_rejects_unknown_keys(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("kl_budget: 4\ngold_key: gold/positivity\n")
    cfg = load_config(MonitorConfig, path, ["window=10"])
    assert (cfg.kl_budget, cfg.gold_key, cfg.window) == (4.0, "gold/positivity", 10)
    with pytest.raises(ConfigError, match="kl_budjet"):
        load_config(MonitorConfig, None, ["kl_budjet=3"])
    assert all(f.description for f in MonitorConfig.model_fields.values())
    assert len(set(ALARM_KINDS)) == 7


def test_every_config_field_is_read_and_docstring_examples_hold():
    import doctest
    import inspect

    import heed.report.monitors as monitors

    source = inspect.getsource(monitors.Monitor)
    for name in MonitorConfig.model_fields:
        assert f"cfg.{name}" in source or f"config.{name}" in source, f"MonitorConfig.{name} is never read"
    assert doctest.testmod(monitors).failed == 0


def test_resumed_monitor_keeps_baselines_and_active_alarms():
    cfg = MonitorConfig(kl_budget=10.0, min_entropy_ratio=0.5, smooth=1)
    rows = [
        {"step": 0, "split": "train", "kl/k1": 1.0, "entropy": 2.0},
        {"step": 1, "split": "train", "kl/k1": 11.0, "entropy": 1.5},
    ]
    m = resume_monitor(rows, cfg)
    assert [a.kind for a in m.alarms] == ["kl_budget"] and m.active == {"kl_budget"}
    # after the resume: KL still over (already reported), entropy 0.9 / 2.0 (the first value
    # before the resume, not 1.5) = 0.45 < 0.5 -> only the entropy alarm is new
    assert kinds(m.update(2, {"kl/k1": 12.0, "entropy": 0.9})) == [("entropy_collapse", 2)]


def test_none_rewards_are_left_out_of_length_bias():
    cfg = MonitorConfig(length_corr_threshold=0.6, min_batch=8)
    texts = _answers_of_length(range(1, 11))
    rewards = [float(n) for n in range(1, 11)]
    rewards[3] = None
    alarms = Monitor(cfg).update(0, {}, texts, rewards)
    assert kinds(alarms) == [("length_bias", 0)] and "over 9 answers" in alarms[0].message

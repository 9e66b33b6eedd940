"""The ``monitor:`` section of RL and DPO configs: thresholds of the reward-hacking monitors.

The monitors themselves live in :mod:`heed.report.monitors`; the config sits here, with the other
configs, so that ``heed.config`` imports nothing from the layers above it.
"""

from __future__ import annotations

from pydantic import Field

from heed.config.base import HeedConfig


class MonitorConfig(HeedConfig):
    """Thresholds of the reward-hacking monitors (the ``monitor:`` section of RL and DPO configs)."""

    enabled: bool = Field(True, description="Run the monitors and write alarms.jsonl.")
    kl_key: str = Field(
        "kl/k1", description="Metric holding the KL to the reference policy (nats per answer)."
    )
    kl_budget: float | None = Field(10.0, gt=0, description="Alarm when the KL exceeds this; null disables.")
    proxy_key: str = Field("reward/mean", description="Metric holding the proxy (trained) reward.")
    length_key: str = Field("length/mean", description="Metric holding the mean answer length.")
    entropy_key: str = Field("entropy", description="Metric holding the policy entropy per token.")
    length_corr_threshold: float | None = Field(
        0.6,
        gt=0,
        le=1,
        description="Alarm when reward and length correlate at least this much; null disables.",
    )
    length_growth: float = Field(
        0.2,
        ge=0,
        description="length_trend also needs the mean length to grow by this fraction over the window.",
    )
    min_batch: int = Field(8, ge=2, description="Smallest batch on which the per-batch checks run.")
    min_distinct_2: float | None = Field(
        0.2, ge=0, le=1, description="Alarm when distinct-2 of a batch falls below this; null disables."
    )
    max_duplicate_frac: float | None = Field(
        0.5, ge=0, le=1, description="Alarm when this share of a batch repeats other answers; null disables."
    )
    min_entropy_ratio: float | None = Field(
        0.3,
        gt=0,
        le=1,
        description="Alarm when entropy falls below this times its first value; null disables.",
    )
    gold_key: str | None = Field(
        None, description="Gold metric (e.g. gold/positivity) checked against the proxy; null disables."
    )
    gold_drop: float = Field(
        0.05, gt=0, description="How far the gold metric must fall from its best to alarm."
    )
    window: int = Field(20, ge=3, description="Steps of history used by the trend checks (length_trend).")
    smooth: int = Field(3, ge=1, description="Trailing mean over this many logged values before thresholds.")

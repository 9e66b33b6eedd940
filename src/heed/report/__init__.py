"""Monitoring and reporting: the metrics log, reward-hacking monitors, diversity figures, report.html.

Light to import: matplotlib and yaml are loaded only when a report is written.
"""

from heed.report.diversity import distinct_n, diversity_metrics, duplicate_fraction, mean_words
from heed.report.metrics import MetricsLogger, read_metrics
from heed.report.monitors import (
    Alarm,
    Monitor,
    MonitorConfig,
    append_alarms,
    read_alarms,
    replay,
    resume_monitor,
)
from heed.report.render import write_report

__all__ = [
    "Alarm",
    "MetricsLogger",
    "Monitor",
    "MonitorConfig",
    "append_alarms",
    "distinct_n",
    "diversity_metrics",
    "duplicate_fraction",
    "mean_words",
    "read_alarms",
    "read_metrics",
    "replay",
    "resume_monitor",
    "write_report",
]

"""User-facing errors: one line that names the culprit (file:line, config key, path)."""

from __future__ import annotations


class HeedError(Exception):
    """An error caused by the user's input. The command line prints it as one line and exits 2."""


class DataError(HeedError):
    """A bad record or data file: the message starts with ``file:line: field:``."""


class ConfigError(HeedError):
    """A bad configuration key or value: the message names the key and what is allowed."""


class ModelLoadError(HeedError):
    """A model or tokenizer folder that cannot be loaded."""


class TrainingDivergedError(HeedError):
    """NaN/inf in a loss or reward: the message names the step and the source."""

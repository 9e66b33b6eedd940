"""Every config field must be read somewhere outside ``heed.config`` (a knob nobody reads is a lie)."""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

import heed
import heed.config
from heed.config.base import HeedConfig

SRC = Path(heed.__file__).parent


def _all_config_classes() -> list[type[HeedConfig]]:
    for mod in pkgutil.iter_modules(heed.config.__path__):
        importlib.import_module(f"heed.config.{mod.name}")
    for extra in ("heed.report.monitors",):
        importlib.import_module(extra)
    seen, stack = [], list(HeedConfig.__subclasses__())
    while stack:
        cls = stack.pop()
        if cls not in seen:
            seen.append(cls)
            stack.extend(cls.__subclasses__())
    return seen


def test_every_config_field_is_read() -> None:
    files = list(SRC.rglob("*.py"))
    code = "\n".join(
        p.read_text(encoding="utf-8") for p in files if "config" not in p.relative_to(SRC).parts[:1]
    )
    # inside heed.config only attribute reads count (derived values computed at load), not definitions
    config_code = "\n".join(
        p.read_text(encoding="utf-8") for p in files if "config" in p.relative_to(SRC).parts[:1]
    )
    unread = []
    for cls in _all_config_classes():
        for name in cls.model_fields:
            if not re.search(rf"\.{name}\b|[\"']{name}[\"']", code) and not re.search(
                rf"\.{name}\b", config_code
            ):
                unread.append(f"{cls.__module__}.{cls.__name__}.{name}")
    assert not unread, f"config fields never read outside heed.config: {unread}"


def test_every_config_field_has_a_description() -> None:
    missing = [
        f"{cls.__name__}.{name}"
        for cls in _all_config_classes()
        for name, field in cls.model_fields.items()
        if not field.description
    ]
    assert not missing, f"config fields without a description: {missing}"

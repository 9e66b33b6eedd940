"""Shared fixtures: the built-in models, built once per machine and cached in $HEED_CACHE; headless
chromium for the browser tests; one intra-op thread for modules of tiny-model tests."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = os.environ.get("HEED_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="session")
def micro_sft_model() -> Path:
    """A very small SFT model (seconds to build): for tests that need a working pipeline, not quality."""
    from heed.demo.assets import MICRO, builtin_sft_model

    return builtin_sft_model(MICRO)


@pytest.fixture(scope="session")
def tiny_sft_model() -> Path:
    """The built-in tiny SFT model (the demo's default): for tests that must show learning."""
    from heed.demo.assets import builtin_sft_model

    return builtin_sft_model()


@pytest.fixture(scope="session")
def corpus_files(micro_sft_model: Path) -> dict[str, Path]:
    """Corpus files beside the micro model: text, chat, prompts_train, prompts_eval."""
    data = micro_sft_model.parent.parent / "data"
    return {p.stem: p for p in data.glob("*.jsonl")}


@pytest.fixture
def browser() -> Iterator[Any]:
    """Debian's chromium driven by Playwright (headless; skips when either is missing)."""
    exe = CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium")
    if exe is None:
        pytest.skip(f"chromium not found at {CHROMIUM} (apt-get install chromium, or set HEED_CHROMIUM)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models on a shared 2-core machine run many times faster on one intra-op thread (two busy
    processes spinning two OpenMP threads each mostly wait on each other). Use per module with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

"""Models and built-in assets loaded from several threads of one process (the annotation server, the
documented-commands test): transformers' loading alone is not thread-safe (a model's tied LM head can
be left on the meta device), so Heed loads one model at a time per process."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from heed.demo.assets import cached_build
from heed.models.loading import load_causal_lm


def in_threads(n: int, work: Any) -> list[Any]:
    results: list[Any] = [None] * n
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = work(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return results


def test_models_loaded_at_once_from_threads_are_whole(micro_sft_model: Path) -> None:
    def load(_: int) -> list[str]:
        meta = []
        for _ in range(2):
            model = load_causal_lm(micro_sft_model)
            meta += [name for name, p in model.named_parameters() if p.is_meta]
            assert model.config.tie_word_embeddings  # the case that broke: a tied LM head
        return meta

    assert in_threads(4, load) == [[], [], [], []]


def test_an_asset_built_from_two_threads_at_once_is_built_whole(tmp_path: Path) -> None:
    def build(folder: Path) -> None:
        (folder / "part.txt").write_text("a")
        time.sleep(0.2)  # both threads are inside build at once
        (folder / "done.txt").write_text("b")

    paths = in_threads(2, lambda _: cached_build("asset", "done.txt", build, tmp_path))
    assert paths == [tmp_path / "asset"] * 2
    assert sorted(p.name for p in (tmp_path / "asset").iterdir()) == ["done.txt", "part.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["asset"]  # the loser's copy was dropped

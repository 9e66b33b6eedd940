"""Every ``heed ...`` command the pages show runs, as written, through the real command line.

Pages: README.md, docs/*.md and the comments of configs/**/*.yaml. Commands are the lines of
fenced code blocks that start with ``heed `` (``$ heed`` too; a trailing ``\\`` continues a line,
``a && b`` is two commands, ``export K=V`` sets K for the page's later commands), and, in the
configs, comment lines ``#   heed ...``. A page's commands run in order, in one fresh folder that
holds a copy of configs/, so a command may use what an earlier one on the same page wrote
(``runs/sft/final``). Pages run side by side (``HEED_DOC_WORKERS``, default 2); a config whose
comment only repeats commands of the docs pages is not run twice.

What the test changes, all listed here:

- ``SMALL``: settings appended to each subcommand (``--set train.max_steps=2`` ...) so a page runs
  in seconds; they come last on the line, so they win over the page's own values.
- ``MICRO``: the built-in model names (``builtin``, ``builtin:base``, ``builtin:reward_model``) and
  corpus names, in the commands and in the copied configs, become their ``builtin:micro`` builds
  (same recipe, a much smaller model and corpus, seconds to build instead of minutes).
- ``USER_FILES``: files a page says the reader brings (their chats, prompts, labelled records, a
  ``DatasetDict`` folder named ``ultrafeedback``), written into the folder from the built-in data; ``STAND_INS``: absolute paths on the reader's
  machine, replaced by a built-in equivalent.
- ``SKIP``: commands that cannot run here, each with its reason.

Inline code spans (```heed rm score --normalize```) are checked too: each names an existing
command and only options that command has.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
    *sorted((ROOT / "configs").rglob("*.yaml")),
]

# settings appended per subcommand (longest prefix wins): tiny runs, no progress bars
SMALL: dict[str, list[str]] = {
    "pretrain": [
        "model.size=micro",
        "train.max_steps=2",
        "train.batch_size=4",
        "data.max_length=64",
        "data.eval_split=0.01",
        "log.progress=false",
    ],
    "sft": [
        "train.max_steps=2",
        "train.batch_size=4",
        "data.max_length=64",
        "data.eval_split=0.02",
        "log.progress=false",
    ],
    "rm train": [
        "train.max_steps=2",
        "train.batch_size=4",
        "data.max_length=64",
        "data.eval_split=0.01",
        "log.progress=false",
    ],
    "dpo": [
        "train.max_steps=2",
        "train.batch_size=4",
        "train.precompute_ref=false",
        "data.pairs=best_vs_worst",  # one pair per ranked group: a fifth of the tokenizing
        "data.max_length=64",
        "data.eval_split=0.01",
        "sample.num_prompts=2",
        "sample.max_new_tokens=8",
        "log.save_every=1",  # a checkpoint for the page's --resume line to continue from
        "log.progress=false",
    ],
    "kto": [
        "train.max_steps=2",
        "train.batch_size=4",
        "train.precompute_ref=false",
        "data.max_length=64",
        "sample.num_prompts=2",
        "sample.max_new_tokens=8",
        "log.save_every=1",
        "log.progress=false",
    ],
    "rl": [
        "train.updates=2",  # with save_every=1: a checkpoint (at 1) for the page's --resume line
        "rollout.prompts_per_step=2",
        "rollout.k=2",
        "rollout.max_new_tokens=8",
        "update.minibatch_size=null",
        "eval.num_prompts=2",
        "log.save_every=1",
        "log.progress=false",
    ],
    "online-dpo": [
        "train.updates=1",
        "train.prompts_per_step=2",
        "iterative.prompts_per_round=2",
        "rollout.max_new_tokens=8",
        "eval.num_prompts=2",
        "log.progress=false",
    ],
    "rs": [
        "train.rounds=1",
        "train.prompts_per_round=2",
        "rollout.num_samples=2",
        "rollout.max_new_tokens=8",
        "eval.num_prompts=2",
        "log.progress=false",
    ],
    "eval": ["rollout.max_new_tokens=8", "eval.num_prompts=2"],
    "control": ["total_steps=1024", "eval_episodes=2", "progress=false"],
    "control bandit": [
        "num_texts=120",
        "steps=2",
        "batch_size=16",
        "eval_every=1",
        "progress=false",
        "threads=1",
    ],
}
SMALL_OPTIONS: dict[str, list[str]] = {  # commands without --set
    "generate": ["--max-new-tokens", "8"],
    "control": ["--steps", "1024"],  # after a page's own --steps
}
MICRO = {
    "builtin": "builtin:micro",
    "builtin:base": "builtin:micro:base",
    "builtin:reward_model": "builtin:micro:reward_model",
    "builtin:chat": "builtin:micro:chat",  # the micro corpus: 1500 records instead of 8000
    "builtin:text": "builtin:micro:text",
}
STAND_INS = {"/models/Qwen2.5-0.5B-Instruct": "builtin:micro"}  # "a model you downloaded earlier"
# name -> (built-in data, how many records, how to turn one into the reader's record)
USER_FILES = {
    "chat.jsonl": ("builtin:micro:chat", 64, None),
    "prompts.jsonl": ("builtin:prompts_eval", 4, None),
    "prefs.jsonl": ("builtin:pairs", 64, None),
    "rankings.jsonl": ("builtin:rankings", 64, None),
    "feedback.jsonl": ("builtin:micro:thumbs", 64, None),
    "records.jsonl": (
        "builtin:rankings",
        6,
        lambda r: {"prompt": r["prompt"], "responses": r["responses"][:2]},
    ),
}
GUIDELINES = "# Guidelines\n\nPrefer the kinder answer; between two equally kind ones, the shorter.\n"
SKIP = {
    "heed annotate serve": "serves the annotation app until stopped (tests/feedback drive the app itself)",
    "heed annotate watch": "watches a project until stopped (tests/feedback cover it)",
}


@dataclass
class Command:
    page: Path
    line: int
    text: str
    env: dict[str, str] = field(default_factory=dict)

    @property
    def words(self) -> str:
        """The command without its comment, as the shell splits it."""
        return shlex.join(shlex.split(self.text, comments=True))

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


FENCE = re.compile(r"^\s*(```|~~~)")


def page_commands(page: Path) -> list[Command]:
    """The runnable ``heed`` lines of one page, in order, with the page's ``export``s so far."""
    lines = page.read_text(encoding="utf-8").splitlines()
    out: list[Command] = []
    env: dict[str, str] = {}
    in_fence = page.suffix == ".yaml"  # a config's comments are all "code"
    i = 0
    while i < len(lines):
        raw = lines[i]
        start = i + 1
        if page.suffix == ".md" and FENCE.match(raw):
            in_fence = not in_fence
        elif in_fence:
            text = raw.strip()
            if page.suffix == ".yaml":
                text = text[1:].strip() if text.startswith("#") else ""
            text = text.removeprefix("$ ")
            while text.endswith("\\") and i + 1 < len(lines):
                i += 1
                text = text[:-1].rstrip() + " " + lines[i].strip().lstrip("#").strip()
            if m := re.fullmatch(r"export (\w+)=(\S+)(\s+#.*)?", text):
                env[m.group(1)] = m.group(2)
            elif text.startswith("heed "):
                words = shlex.split(text, comments=True)
                while words:  # `a && b` is two commands (an `&&` inside quotes is not)
                    part = words[: words.index("&&")] if "&&" in words else words
                    words = words[len(part) + 1 :]
                    out.append(Command(page, start, shlex.join(part) if "&&" in text else text, dict(env)))
        i += 1
    return out


def subcommand(args: list[str]) -> str:
    """``rm train`` for ``heed rm train --config ...``: the words before the first option."""
    words = []
    for a in args[1:]:
        if a.startswith("-"):
            break
        words.append(a)
    for n in range(len(words), 0, -1):
        if " ".join(words[:n]) in SMALL or " ".join(words[:n]) in SMALL_OPTIONS:
            return " ".join(words[:n])
    return " ".join(words[:1])


def to_micro(value: str) -> str:
    if value in STAND_INS:
        return STAND_INS[value]
    key, eq, v = value.partition("=")
    if eq and v in MICRO | STAND_INS:
        return f"{key}={(MICRO | STAND_INS)[v]}"
    return MICRO.get(value, value)


def argv_of(cmd: Command) -> list[str]:
    """The command's words with the test's changes (MICRO, STAND_INS, SMALL) applied."""
    args = [to_micro(a) for a in shlex.split(cmd.text, comments=True)]
    sub = subcommand(args)
    for s in SMALL.get(sub, []):
        args += ["--set", s]
    return args + SMALL_OPTIONS.get(sub, [])


def micro_configs(dest: Path) -> None:
    """configs/ copied to ``dest``, with the built-in model names turned into their micro builds."""
    shutil.copytree(ROOT / "configs", dest)
    names = "|".join(re.escape(k) for k in sorted(MICRO, key=len, reverse=True))
    pattern = re.compile(rf"(:\s+['\"]?)({names})(?=['\"]?\s*(#|$))", re.M)
    for f in dest.rglob("*.yaml"):
        f.write_text(pattern.sub(lambda m: m.group(1) + MICRO[m.group(2)], f.read_text()))


def write_user_files(folder: Path) -> None:
    from heed.demo.builtin import resolve_name

    for name, (source, n, convert) in USER_FILES.items():
        rows = [json.loads(x) for x in Path(resolve_name(source)).read_text().splitlines()[:n]]
        rows = [convert(r) for r in rows] if convert else rows
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "guide.md").write_text(GUIDELINES)
    # a DatasetDict folder with UltraFeedback's split names, as `DatasetDict.save_to_disk` writes it
    import datasets

    pairs = [json.loads(x) for x in Path(resolve_name("builtin:pairs")).read_text().splitlines()[:24]]
    columns = ("prompt", "chosen", "rejected")
    splits = {"train_prefs": pairs[:16], "test_prefs": pairs[16:]}
    datasets.DatasetDict(
        {k: datasets.Dataset.from_dict({c: [r[c] for r in v] for c in columns}) for k, v in splits.items()}
    ).save_to_disk(str(folder / "ultrafeedback"))


class CommandFailed(Exception):
    pass


def run(cmd: Command, folder: Path) -> tuple[float, float]:
    """Run one command in ``folder`` through ``python -m heed``; returns (wall, CPU) seconds."""
    args = argv_of(cmd)
    env = {
        **os.environ,
        **cmd.env,
        "OMP_NUM_THREADS": "1",
        "HEED_DEBUG": "1",  # a failure shows its traceback
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    log = folder / f".heed-{cmd.line}.log"
    t0 = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "heed", *args[1:]],
            cwd=folder,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        while True:  # wait4: this child's own CPU time, while other pages run beside it
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.time() - t0 > TIMEOUT_S:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise CommandFailed(
            f"{cmd.where}: `{cmd.text}` (run as `{shlex.join(args)}`) exited {proc.returncode}:\n"
            + log.read_text()[-5000:]
        )
    return time.time() - t0, usage.ru_utime + usage.ru_stime


def commands_to_run(page: Path) -> list[Command]:
    """The page's commands but the skipped ones; none for a config whose comment only repeats
    commands that a docs page runs (in that page's folder, with whatever came before them)."""
    commands = [c for c in page_commands(page) if not any(c.text.startswith(s) for s in SKIP)]
    on_docs_pages = {c.words for p in PAGES if p.suffix == ".md" for c in page_commands(p)}
    if page.suffix == ".yaml" and all(c.words in on_docs_pages for c in commands):
        return []
    return commands


def run_page(page: Path, folder: Path) -> list[tuple[str, float, float]]:
    """A page's commands in order in ``folder`` (configs and the reader's files in place)."""
    micro_configs(folder / "configs")
    write_user_files(folder)
    return [(cmd.where, *run(cmd, folder)) for cmd in commands_to_run(page)]


TIMEOUT_S = 600
WORKERS = int(os.environ.get("HEED_DOC_WORKERS", "2"))  # pages run side by side
RUN_PAGES = [p for p in PAGES if commands_to_run(p)]


@pytest.fixture(scope="module")
def page_results(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """Starts every selected page at once on a pool of WORKERS threads (longest pages first); each
    test waits for its own page."""
    selected = [
        item.callspec.params["page"]
        for item in request.session.items
        if getattr(item, "originalname", "") == "test_page_commands_run"
    ]
    selected.sort(key=lambda p: -len(commands_to_run(p)))
    with ThreadPoolExecutor(WORKERS) as pool:
        futures = {
            page: pool.submit(run_page, page, tmp_path_factory.mktemp(page.stem.replace(".", "_")))
            for page in selected
        }
        yield futures
        for f in futures.values():
            f.cancel()


@pytest.mark.parametrize("page", RUN_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_page_commands_run(page: Path, page_results: dict) -> None:
    try:
        timings = page_results[page].result()
    except CommandFailed as exc:
        pytest.fail(str(exc), pytrace=False)
    print("\n" + "\n".join(f"{wall:6.1f}s wall {cpu:6.1f}s cpu  {w}" for w, wall, cpu in timings))


def test_extraction_finds_the_commands() -> None:
    """The extractor itself: continuation lines, ``&&``, comments, exports, the micro rewrite."""
    cmds = [c for p in PAGES for c in page_commands(p)]
    banana = [c for c in cmds if c.page.name == "banana.yaml"]
    assert [c.text for c in banana] == [
        "heed rl --config configs/banana.yaml --out runs/rloo-banana",
        "heed rl --config configs/banana.yaml --set algorithm=ppo --set update.epochs=2 "
        "--set update.minibatch_size=32 --out runs/ppo-banana",
    ]
    annotate = [c for c in cmds if c.page.name == "annotate.md"]
    assert annotate and all(c.env == {"HEED_ANNOTATE_DB": "labels.db"} for c in annotate)
    control = [c.text for c in cmds if c.page.name == "README.md" and "control" in c.text]
    assert control == [
        "heed control --env CartPole-v1 --out runs/cartpole",
        "heed control --eval runs/cartpole",
    ]
    argv = argv_of(Command(ROOT / "README.md", 1, "heed dpo --set model.path=builtin --out x  # note"))
    assert argv[:5] == ["heed", "dpo", "--set", "model.path=builtin:micro", "--out"] and "# note" not in argv
    assert "train.max_steps=2" in argv
    assert sum(len(page_commands(p)) for p in PAGES) >= 40


def _click_command(words: list[str]):  # type: ignore[no-untyped-def]
    """The click command for ``words`` (``["rm", "score"]``) and how many words named it."""
    import typer.main

    from heed.cli import app

    node = typer.main.get_command(app)
    used = 0
    for w in words:
        sub = getattr(node, "commands", {}).get(w)
        if sub is None:
            break
        node, used = sub, used + 1
    return node, used


def _inline_spans() -> list[tuple[str, str]]:
    spans = []
    for page in PAGES:
        if page.suffix != ".md":
            continue
        in_fence = False
        for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            if FENCE.match(line):
                in_fence = not in_fence
            elif not in_fence:
                spans += [(f"{page.name}:{n}", s) for s in re.findall(r"`(heed [^`]*)`", line)]
    return spans


def inline_problems(span: str) -> list[str]:
    """What is wrong with an inline ``heed ...`` span: commands or options that do not exist.
    ``a \\| b`` lists alternatives for the last word; ``[--opt]`` is an optional part."""
    first, *alternatives = [a.strip() for a in span.replace("\\|", "|").split("|")]
    words = first.replace("[", " ").replace("]", " ").split()[1:]
    node, used = _click_command(words)
    if used < len(words) and hasattr(node, "commands") and not words[used].startswith("-"):
        used += 1  # a word after a group must be one of its commands: checked below
    problems = []
    for path in [words[: used or 1]] + [words[: used - 1] + alt.split() for alt in alternatives]:
        if _click_command(path)[1] != len(path):
            problems.append(f"no command `heed {' '.join(path)}`")
    options = {o for p in getattr(node, "params", []) for o in getattr(p, "opts", [])}
    for w in words[used:]:
        if w.startswith("--") and w.split("=")[0] not in options:
            problems.append(f"`heed {' '.join(words[:used])}` has no option {w}")
    return problems


def test_inline_commands_name_real_commands_and_options() -> None:
    """`heed rm train \\| score`, `heed demo [--quick]`: every command and option named exists."""
    assert inline_problems("heed rm scor") == ["no command `heed rm scor`"]
    assert inline_problems("heed rm train \\| grade") == ["no command `heed rm grade`"]
    assert inline_problems("heed demo [--quick] [--fast]") == ["`heed demo` has no option --fast"]
    spans = _inline_spans()
    assert len(spans) > 20
    bad = [f"{where}: `{span}`: {p}" for where, span in spans for p in inline_problems(span)]
    assert not bad, "\n".join(bad)

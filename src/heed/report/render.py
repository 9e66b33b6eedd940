"""``report.html``: one self-contained page that tells a run's (or a demo's) story at a glance.

Top to bottom: headline cards (gold / reward before -> after per policy, alarms, time), the
side-by-side table of SFT vs each tuned policy, the alarms, learning curves, before/after
answers to the same prompts, reward model and annotator agreement, stage times, configs.

The page has no scripts and no external URLs: plots are base64 PNGs and a Content-Security-
Policy forbids everything but inline styles and ``data:`` images. All text that comes from
runs (model answers, prompts, config values, alarm messages) is HTML-escaped.
"""

from __future__ import annotations

import base64
import datetime as _dt
import fnmatch
import html
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from heed.report.runs import Collection, Run, load_collection

# Metric keys the report understands, grouped into sections in this order (docs/report.md).
# A pattern ending in ``*`` matches a prefix; every other numeric key lands in "Other metrics".
SECTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Reward and gold metrics", ("gold/*", "reward/mean", "reward/std", "reward/*", "eval/*", "episode/*")),
    ("KL and entropy", ("kl/k1", "kl/k3", "kl/*", "entropy")),
    ("Answers: length and diversity", ("length/mean", "length/*", "diversity/*")),
    (
        "Optimisation",
        (
            "loss",
            "policy_loss",
            "value_loss",
            "clipfrac",
            "approx_kl/k1",
            "approx_kl/k3",
            "approx_kl/*",
            "explained_variance",
            "grad_norm",
            "lr",
        ),
    ),
    ("Reward model and DPO implicit reward", ("rm/*", "dpo/*")),
)

# Which plots an alarm kind is marked on.
ALARM_PANELS = {
    "kl_budget": ("kl/*",),
    "entropy_collapse": ("entropy",),
    "overoptimisation": ("gold/*", "reward/mean"),
    "length_bias": ("length/*", "reward/mean"),
    "length_trend": ("length/*", "reward/mean"),
    "low_distinct": ("diversity/*",),
    "repeated_answers": ("diversity/*",),
}

# Columns of the policy comparison table, in order (patterns as in SECTIONS).
COMPARE = (
    "reward/mean",
    "gold/*",
    "eval/*",
    "*success*",
    "kl/k1",
    "kl/k3",
    "entropy",
    "length/mean",
    "diversity/distinct_2",
    "diversity/duplicate_frac",
)

LOWER_IS_BETTER = ("*loss*", "kl/*", "approx_kl/*", "diversity/duplicate_frac", "clipfrac")
HIGHER_IS_BETTER = (
    "gold/*",
    "reward/*",
    "eval/*",
    "episode/return",
    "*success*",
    "*accuracy*",
    "dpo/margin",
    "diversity/distinct_*",
)

MAX_PLOTS = 48
MAX_PROMPTS = 8


def esc(value: Any) -> str:
    """HTML-escape anything (quotes included): every string from a run is untrusted."""
    return html.escape(str(value), quote=True)


def _match(key: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def fmt(value: float | None) -> str:
    """A number for a human: 3 significant digits, thousands with separators, None as a dash."""
    if value is None:
        return "—"
    v = float(value)
    if v != v:
        return "nan"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if v == int(v) and abs(v) < 1000:
        return f"{int(v)}"
    return f"{v:.3g}"


def _direction(key: str) -> int:
    """+1 if a rise is good, -1 if a fall is good, 0 if neither is clear."""
    if _match(key, LOWER_IS_BETTER):
        return -1
    if _match(key, HIGHER_IS_BETTER):
        return 1
    return 0


def _delta_html(key: str, before: float | None, after: float | None) -> str:
    if before is None or after is None:
        return ""
    d = after - before
    good = _direction(key) * d
    cls = "up" if good > 0 else "down" if good < 0 else "flat"
    return f'<span class="delta {cls}">{"+" if d >= 0 else ""}{fmt(d)}</span>'


# -- sections ------------------------------------------------------------------------------------


def _color(runs: Sequence[Run]) -> dict[str, str]:
    from heed.report.plots import PALETTE

    return {r.name: PALETTE[i % len(PALETTE)] for i, r in enumerate(runs)}


def _headline_keys(run: Run) -> list[str]:
    """A run's candidate headline metrics: its task success rates and gold metrics (the cards show
    the two that moved most); else its first held-out metric, else its training metric."""
    keys = run.metric_keys()
    success = sorted(k for k in keys if k.startswith("eval/") and "success" in k)
    golds = sorted(k for k in keys if k.startswith("gold/"))
    if success or golds:
        return success + golds
    evals = sorted(k for k in keys if k.startswith("eval/") or "success" in k)
    if evals:
        return evals[:1]
    for key in ("reward/mean", "episode/return", "rm/accuracy", "dpo/accuracy", "loss"):
        if key in keys:
            return [key]
    return []


def _cards(coll: Collection) -> str:
    cards = []
    base = coll.baseline
    tuned = [r for r in coll.runs if r is not base and not r.is_best_of] or list(coll.runs)
    # Policies first, reward models after them.
    tuned.sort(key=lambda r: _headline_keys(r)[:1] == ["rm/accuracy"])
    for run in tuned:
        shown = []
        for key in _headline_keys(run):
            after = run.final(key)
            if key == "rm/accuracy":
                before, vs = None, ""
            elif (
                base is not None
                and run is not base
                and base.final(key) is not None
                and not _match(key, ("*loss*", "*perplexity*"))
            ):  # losses of different runs use different data
                before, vs = base.final(key), f"vs {base.name}"
            else:
                before, vs = run.first(key), "first → last logged"
            if after is not None:
                shown.append((key, before, after, vs))
        # the two headline metrics that moved most (a banana task's success, a tone task's gold)
        shown.sort(key=lambda x: -abs(x[2] - x[1]) if x[1] is not None else 0.0)
        shown = shown[:1] + [
            x for x in shown[1:2] if x[1] is None or abs(x[2] - x[1]) > 1e-9
        ]  # no flat second card
        for key, before, after, vs in shown:
            good = _direction(key) * ((after - before) if before is not None else 0)
            cls = "good" if good > 0 else "bad" if good < 0 else ""
            big = f"{fmt(before)} → {fmt(after)}" if before is not None else fmt(after)
            notes = [f"{_delta_html(key, before, after)} {esc(vs)}"]
            peak = _peak(run, key)
            if peak is not None and _direction(key) > 0:
                notes.append(f"peaked at {esc(fmt(peak[1]))} (step {peak[0]}), then fell")
                cls = "warn" if cls == "good" else cls
            if run.alarms:
                notes.append(f'<span class="alarm">⚠ {esc(_alarm_brief(run))}</span>')
                cls = "warn" if cls == "good" else cls
            cards.append(
                f'<div class="card {cls}"><div class="card-title">{esc(run.name.upper())} · {esc(key)}</div>'
                f'<div class="card-big">{esc(big)}</div>'
                f'<div class="card-sub">{"<br>".join(notes)}</div></div>'
            )
    n_alarms = sum(len(r.alarms) for r in coll.runs)
    if n_alarms:
        listed = "<br>".join(f"{esc(r.name)}: {esc(_alarm_brief(r))}" for r in coll.runs if r.alarms)
        cards.append(
            f'<div class="card bad"><div class="card-title">Monitors</div>'
            f'<div class="card-big">⚠ {n_alarms} alarm{"s" if n_alarms != 1 else ""}</div>'
            f'<div class="card-sub">{listed}</div></div>'
        )
    else:
        cards.append(
            '<div class="card good"><div class="card-title">Monitors</div>'
            '<div class="card-big">✓ no alarms</div>'
            '<div class="card-sub">KL, length, diversity, entropy, gold vs proxy</div></div>'
        )
    total = sum(float(s.get("seconds", 0) or 0) for s in coll.stages)
    if total > 0:
        cards.append(
            f'<div class="card"><div class="card-title">Wall time</div>'
            f'<div class="card-big">{esc(_duration(total))}</div>'
            f'<div class="card-sub">{len(coll.stages)} stages</div></div>'
        )
    return f'<section class="cards">{"".join(cards)}</section>'


def _alarm_brief(run: Run) -> str:
    """``"6 alarms, first length_trend at step 95"``."""
    n = len(run.alarms)
    first = min(run.alarms, key=lambda a: a.step)
    return f"{n} alarm{'s' if n != 1 else ''}, first {first.kind} at step {first.step}"


def _verdict(coll: Collection) -> str:
    """One or two sentences that say what happened: the best policy, and who raised alarms."""
    base = coll.baseline
    tuned = [r for r in coll.runs if r is not base and not r.is_best_of]
    sentences = []
    keys = [k for r in tuned for k in _headline_keys(r) if _direction(k) > 0 and k != "rm/accuracy"]
    if keys:
        key = max(set(keys), key=keys.count)
        scored = [(r.final(key), r) for r in tuned if r.final(key) is not None]
        if len(scored) > 1 or (scored and base is not None):
            value, best = max(scored, key=lambda t: t[0])
            vs = ""
            if base is not None and base.final(key) is not None:
                vs = f", {fmt(value - base.final(key))} over {esc(base.name)}"
                vs = vs.replace(", ", ", +", 1) if value >= base.final(key) else vs
            sentences.append(
                f"Best policy by <b>{esc(key)}</b>: <b>{esc(best.name.upper())}</b> ({fmt(value)}{vs})."
            )
    for run in coll.runs:
        if not run.alarms:
            continue
        kinds = sorted(
            {a.kind for a in run.alarms}, key=lambda k: min(a.step for a in run.alarms if a.kind == k)
        )
        sentences.append(
            f'<span class="alarm">{esc(run.name.upper())} raised {len(run.alarms)} alarm'
            f"{'s' if len(run.alarms) != 1 else ''}</span> ({esc(', '.join(kinds))})."
        )
    if not sentences:
        return ""
    return f'<p class="verdict">{" ".join(sentences)}</p>'


def _peak(run: Run, key: str) -> tuple[int, float] | None:
    """``(step, value)`` of the best logged value of ``key`` when the curve later gave back at
    least a quarter of its rise from the first value (a peak, not noise); else None."""
    points = [
        (int(row.get("step", 0)), float(v))
        for row in run.rows
        if isinstance(v := row.get(key), int | float) and not isinstance(v, bool)
    ]
    if len(points) < 3:
        return None
    first, last = points[0][1], points[-1][1]
    step, best = max(points, key=lambda p: p[1])
    rise = best - first
    if rise > 0 and step < points[-1][0] and best - last >= 0.25 * rise:
        return step, best
    return None


def _duration(seconds: float) -> str:
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(round(seconds), 60)
    if m < 60:
        return f"{m} min {s:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"


def _policy_runs(coll: Collection) -> list[Run]:
    out = []
    for run in coll.runs:
        keys = run.metric_keys()
        if run.is_baseline or any(_match(k, COMPARE) for k in keys) or run.samples:
            out.append(run)
    return out


def _compare_table(coll: Collection) -> str:
    runs = _policy_runs(coll)
    if not runs:
        return ""
    present = set().union(*(r.metric_keys() for r in runs))
    columns: list[str] = []
    for pattern in COMPARE:
        for key in sorted(k for k in present if fnmatch.fnmatchcase(k, pattern)):
            if key not in columns:
                columns.append(key)
    if not columns:
        return ""
    base = coll.baseline
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    best: dict[str, float] = {}
    for key in columns:
        values = [v for r in runs if r is not base and (v := r.final(key)) is not None]
        if _direction(key) and len(values) > 1:
            best[key] = max(values) if _direction(key) > 0 else min(values)
    body = []
    for run in runs:
        cells = []
        for key in columns:
            value = run.final(key)
            delta = ""
            if base is not None and run is not base:
                delta = _delta_html(key, base.final(key), value)
            cls = "num best" if run is not base and value is not None and best.get(key) == value else "num"
            cells.append(f'<td class="{cls}">{fmt(value)} {delta}</td>')
        n = len(run.alarms)
        alarm = f'<td class="num {"alarm" if n else ""}">{n}</td>'
        cls = ' class="baseline"' if run is base else ""
        body.append(f"<tr{cls}><th>{esc(run.name)}</th>{''.join(cells)}{alarm}</tr>")
    note = (
        f"Final values from each run's summary.json / eval.json (else the last logged value); "
        f"coloured numbers are the change against <b>{esc(base.name)}</b>; bold: best tuned policy."
        if base is not None
        else "Final values from each run's summary.json / eval.json (else the last logged value)."
    )
    return (
        f'<section><h2>Policies side by side</h2><p class="note">{note}</p>'
        f'<table class="compare"><thead><tr><th>run</th>{head}<th>alarms</th></tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></section>"
    )


def _score_vs_kl_section(coll: Collection) -> str:
    """Each tuned policy's final score against its KL to the reference, with best-of-N of the
    reference (``heed eval --best-of N`` folders) as the frontier (:mod:`heed.report.frontier`)."""
    from heed.report.frontier import score_vs_kl
    from heed.report.plots import PALETTE, Marker, frontier_plot

    data = score_vs_kl(coll)
    if data is None or (not data.points and len(data.frontier) < 2):
        return ""
    methods = list(dict.fromkeys(p.method for p in data.points))
    color = {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(methods)}
    png = frontier_plot(
        f"{data.score_key} vs KL",
        [Marker(p.run, p.kl, p.score, color[p.method]) for p in data.points],
        [(p.kl, p.score, f"N={p.n}") for p in data.frontier],
        "KL(policy ‖ reference), nats per answer",
        data.score_key,
    )
    rows = []
    for p in data.frontier:
        rows.append(
            f'<tr class="baseline"><th>{esc(p.run)}</th><td>best-of-{p.n}</td><td class="num">{fmt(p.kl)}</td>'
            f'<td class="num">{fmt(p.score)}</td><td class="num"></td></tr>'
        )
    for p in data.points:
        ref = data.frontier_at(p.kl)
        gap = "" if ref is None else f"{p.score - ref:+.3f}"
        rows.append(
            f'<tr><th>{esc(p.run)}</th><td>{esc(p.method)}</td><td class="num">{fmt(p.kl)}</td>'
            f'<td class="num">{fmt(p.score)}</td><td class="num">{gap}</td></tr>'
        )
    note = (
        "Final evaluation of each run (eval.json / summary.json): KL(policy ‖ reference) per answer "
        f"(eval/kl, else kl/k1) against <b>{esc(data.score_key)}</b>. Grey: best-of-N of the reference, "
        "KL = log N − (N − 1)/N, from the folders <code>heed eval --best-of N --out DIR</code> wrote; "
        "&ldquo;vs best-of-N&rdquo;: the run's score minus the curve's at the same KL (blank outside it)."
    )
    img = base64.b64encode(png).decode()
    return (
        f'<section><h2>Score vs KL</h2><p class="note">{note}</p>'
        f'<figure><img alt="{esc(data.score_key)} vs KL" src="data:image/png;base64,{img}"></figure>'
        f'<table class="compare"><thead><tr><th>run</th><th>method</th><th>KL</th><th>{esc(data.score_key)}</th>'
        f"<th>vs best-of-N</th></tr></thead><tbody>{''.join(rows)}</tbody></table></section>"
    )


def _alarms_section(coll: Collection) -> str:
    rows = []
    replayed = [r.name for r in coll.runs if r.alarms_replayed and (r.rows or r.samples)]
    for run in coll.runs:
        for a in sorted(run.alarms, key=lambda a: a.step):
            rows.append(
                f'<tr><td>{esc(run.name)}</td><td class="num">{a.step}</td><td><b>{esc(a.kind)}</b></td>'
                f'<td>{esc(a.message)}</td><td class="num">{fmt(a.value)}</td>'
                f'<td class="num">{fmt(a.threshold)}</td></tr>'
            )
    note = ""
    if replayed:
        note = (
            f'<p class="note">No alarms.jsonl in {esc(", ".join(replayed))}: the monitors were replayed '
            f"over metrics.jsonl and samples.jsonl with the run's monitor config (defaults otherwise).</p>"
        )
    if not rows:
        return f'<section><h2>Alarms</h2><p class="ok">✓ No monitor fired.</p>{note}</section>'
    return (
        f'<section><h2>Alarms</h2>{note}<table class="alarms"><thead><tr><th>run</th><th>step</th>'
        f"<th>kind</th><th>what the monitor saw</th><th>value</th><th>threshold</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table></section>"
    )


def _series(run: Run, key: str, split: str) -> tuple[list[float], list[float]]:
    steps, values = [], []
    for row in run.rows:
        v = row.get(key)
        if row.get("split", "train") == split and isinstance(v, int | float) and not isinstance(v, bool):
            steps.append(float(row.get("step", 0)))
            values.append(float(v))
    return steps, values


def _curves(coll: Collection) -> str:
    from heed.report.plots import Line, line_plot

    colors = _color(coll.runs)
    logged = sorted(
        {
            k
            for r in coll.runs
            for row in r.rows
            for k, v in row.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
        - {"step", "time"}
    )
    if not logged:
        return ""
    placed: set[str] = set()
    groups: list[tuple[str, list[str]]] = []
    for title, patterns in SECTIONS:
        keys = []
        for p in patterns:
            for k in logged:
                if k not in placed and fnmatch.fnmatchcase(k, p):
                    keys.append(k)
                    placed.add(k)
        groups.append((title, keys))
    groups.append(("Other metrics", [k for k in logged if k not in placed]))
    out, n_plots = [], 0
    for title, keys in groups:
        figures = []
        for key in keys:
            if n_plots >= MAX_PLOTS:
                break
            lines = []
            for run in coll.runs:
                marks = [(a.step, a.kind) for a in run.alarms if _match(key, ALARM_PANELS.get(a.kind, ()))]
                for split in ("train", "eval"):
                    steps, values = _series(run, key, split)
                    if steps:
                        label = run.name if split == "train" else f"{run.name} (eval)"
                        lines.append(Line(label, steps, values, colors[run.name], split == "eval", marks))
                        marks = []
            if not lines:
                continue
            png = line_plot(key, lines)
            n_plots += 1
            figures.append(
                f'<figure><img alt="{esc(key)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
                f"</figure>"
            )
        if figures:
            out.append(f'<h3>{esc(title)}</h3><div class="grid">{"".join(figures)}</div>')
    legend = " ".join(
        f'<span class="swatch" style="background:{colors[r.name]}"></span>{esc(r.name)}'
        for r in coll.runs
        if r.rows
    )
    return (
        f'<section><h2>Learning curves</h2><p class="note">{legend} &nbsp;·&nbsp; dashed: eval split '
        f"&nbsp;·&nbsp; red dotted lines: steps where an alarm fired</p>{''.join(out)}</section>"
    )


def _sample_columns(coll: Collection) -> dict[str, dict[str, dict[str, Any]]]:
    """label -> prompt -> the latest sample row for that policy and prompt."""
    entries: list[tuple[str, dict[str, Any]]] = []
    for run in coll.runs:
        steps = {int(s.get("step", 0)) for s in run.samples if "policy" not in s}
        first = min(steps) if len(steps) > 1 else None
        for s in run.samples:
            if "policy" in s:
                label = str(s["policy"])
            elif first is not None and int(s.get("step", 0)) == first:
                label = f"{run.name} @ step {first}"
            else:
                label = run.name
            entries.append((label, s))
    entries += [(str(s.get("policy", "samples")), s) for s in coll.samples]
    columns: dict[str, dict[str, dict[str, Any]]] = {}
    for label, s in entries:
        if not isinstance(s.get("prompt"), str) or not isinstance(s.get("completion"), str):
            continue
        slot = columns.setdefault(label, {})
        old = slot.get(s["prompt"])
        if old is None or int(s.get("step", 0)) >= int(old.get("step", 0)):
            slot[s["prompt"]] = s

    # Before-columns first: the baseline policy, then "@ step" columns, then the rest in run order.
    def rank(label: str) -> int:
        low = label.lower()
        return 0 if low in ("sft", "base", "reference") else 1 if "@ step" in low else 2

    return dict(sorted(columns.items(), key=lambda kv: rank(kv[0])))


def _samples_section(coll: Collection) -> str:
    columns = _sample_columns(coll)
    if not columns:
        return ""
    counts: dict[str, int] = {}
    order: list[str] = []
    for slot in columns.values():
        for prompt in slot:
            if prompt not in counts:
                order.append(prompt)
            counts[prompt] = counts.get(prompt, 0) + 1
    prompts = sorted(order, key=lambda p: -counts[p])[:MAX_PROMPTS]
    head = "".join(f"<th>{esc(label)}</th>" for label in columns)
    body = []
    for prompt in prompts:
        cells = []
        for slot in columns.values():
            s = slot.get(prompt)
            if s is None:
                cells.append('<td class="missing">—</td>')
                continue
            scores = [
                f"{esc(k)} {fmt(float(s[k]))}"
                for k in ("reward", "gold")
                if isinstance(s.get(k), int | float) and not isinstance(s.get(k), bool)
            ]
            meta = f'<div class="meta">{" · ".join(scores)} · step {esc(s.get("step", "?"))}</div>'
            cells.append(f'<td><div class="answer">{esc(s["completion"])}</div>{meta}</td>')
        body.append(f'<tr><th class="prompt">{esc(prompt)}</th>{"".join(cells)}</tr>')
    return (
        f'<section><h2>Answers before and after</h2><p class="note">The same prompts answered by each '
        f"policy (latest sample per policy; {len(prompts)} of {len(order)} prompts).</p>"
        f'<table class="samples"><thead><tr><th>prompt</th>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></section>"
    )


def _render_data(data: Any, depth: int = 0) -> str:
    """Any JSON value as escaped HTML: mappings as key/value tables, lists of objects as tables."""
    if isinstance(data, dict):
        rows = []
        for k, v in data.items():
            inner = _render_data(v, depth + 1) if isinstance(v, dict | list) else _scalar(v)
            rows.append(f"<tr><th>{esc(k)}</th><td>{inner}</td></tr>")
        return f'<table class="kv">{"".join(rows)}</table>'
    if isinstance(data, list):
        if data and all(isinstance(x, dict) for x in data):
            cols: list[str] = []
            for x in data:
                cols += [str(k) for k in x if str(k) not in cols]
            head = "".join(f"<th>{esc(c)}</th>" for c in cols)
            body = "".join(
                "<tr>" + "".join(f"<td>{_scalar(x.get(c))}</td>" for c in cols) + "</tr>" for x in data
            )
            return f'<table class="kv"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
        return esc(", ".join(_plain(x) for x in data))
    return _scalar(data)


def _plain(v: Any) -> str:
    if isinstance(v, float):
        return fmt(v)
    return str(v)


def _scalar(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, dict | list):
        return _render_data(v, 1)
    return esc(_plain(v))


def _rm_section(coll: Collection) -> str:
    parts = []
    rm_runs = [r for r in coll.runs if any(k.startswith("rm/") for k in r.metric_keys())]
    if rm_runs:
        keys = sorted({k for r in rm_runs for k in r.metric_keys() if k.startswith("rm/")})
        head = "".join(f"<th>{esc(k)}</th>" for k in keys)
        body = "".join(
            f"<tr><th>{esc(r.name)}</th>"
            + "".join(f'<td class="num">{fmt(r.final(k))}</td>' for k in keys)
            + "</tr>"
            for r in rm_runs
        )
        parts.append(
            f'<h3>Reward model</h3><table class="compare"><thead><tr><th>run</th>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table>"
        )
    if coll.agreement is not None:
        parts.append(f"<h3>Annotator agreement</h3>{_render_data(coll.agreement)}")
    if not parts:
        return ""
    return f"<section><h2>Reward model and annotators</h2>{''.join(parts)}</section>"


def _stages_section(coll: Collection) -> str:
    if not coll.stages:
        return ""
    longest = max(float(s.get("seconds", 0) or 0) for s in coll.stages) or 1.0
    rows = []
    for s in coll.stages:
        sec = float(s.get("seconds", 0) or 0)
        extra = {k: v for k, v in s.items() if k not in ("name", "seconds")}
        extra_txt = " · ".join(f"{esc(k)}: {esc(_plain(v))}" for k, v in extra.items())
        rows.append(
            f'<tr><th>{esc(s["name"])}</th><td class="num">{esc(_duration(sec))}</td>'
            f'<td class="barcell"><div class="bar" style="width:{100 * sec / longest:.1f}%"></div></td>'
            + (f'<td class="note">{extra_txt}</td>' if extra_txt else "")
            + "</tr>"
        )
    return f'<section><h2>Stages</h2><table class="stages"><tbody>{"".join(rows)}</tbody></table></section>'


def _configs_section(coll: Collection) -> str:
    import yaml

    parts = []
    for run in coll.runs:
        if not run.config and not run.summary:
            continue
        body = ""
        if run.config:
            body += f"<h4>config.yaml</h4><pre>{esc(yaml.safe_dump(run.config, sort_keys=False))}</pre>"
        if run.summary:
            body += f"<h4>summary</h4>{_render_data(run.summary)}"
        parts.append(
            f'<details><summary>{esc(run.name)} <span class="note">{esc(run.path)}</span></summary>'
            f"{body}</details>"
        )
    if not parts:
        return ""
    return f"<section><h2>Runs in detail</h2>{''.join(parts)}</section>"


CSS = """
:root { --ink:#1d2330; --muted:#5f6b7a; --line:#dde3ea; --good:#1b7f3b; --bad:#c62828; --bg:#f6f8fa; }
* { box-sizing: border-box; }
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--ink);
       margin: 0; background: var(--bg); }
main { max-width: 1280px; margin: 0 auto; padding: 24px 28px 60px; }
header h1 { margin: 0 0 4px; font-size: 26px; }
header .note { margin: 0; }
h2 { font-size: 19px; margin: 34px 0 8px; padding-bottom: 4px; border-bottom: 2px solid var(--line); }
h3 { font-size: 15px; margin: 18px 0 8px; color: var(--muted); }
h4 { font-size: 13px; margin: 10px 0 4px; }
.note { color: var(--muted); font-size: 13px; }
.ok { color: var(--good); font-weight: 600; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin-top: 18px; }
.card { background: #fff; border: 1px solid var(--line); border-left: 6px solid #8795a8; border-radius: 8px;
        padding: 12px 14px; min-width: 170px; flex: 1 1 170px; max-width: 340px; }
.verdict { font-size: 16px; margin: 14px 0 0; }
.verdict .alarm { color: var(--bad); font-weight: 600; }
td.best { font-weight: 700; }
.card.good { border-left-color: var(--good); }
.card.bad { border-left-color: var(--bad); }
.card.warn { border-left-color: #e69f00; }
.card .alarm { color: var(--bad); font-weight: 600; }
.card-title { font-size: 12px; text-transform: none; color: var(--muted); font-weight: 600; letter-spacing: .02em; }
.card-big { font-size: 24px; font-weight: 700; margin: 4px 0 2px; overflow-wrap: anywhere; }
.card-sub { font-size: 12px; color: var(--muted); }
.delta { font-weight: 700; font-size: 12px; }
.delta.up { color: var(--good); } .delta.down { color: var(--bad); } .delta.flat { color: var(--muted); }
table { border-collapse: collapse; background: #fff; font-size: 13px; margin: 6px 0; }
th, td { border: 1px solid var(--line); padding: 5px 8px; text-align: left; vertical-align: top; }
thead th { background: #eef2f6; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.alarm { color: var(--bad); font-weight: 700; }
tr.baseline th, tr.baseline td { background: #f3f6f9; }
table.compare tbody th { white-space: nowrap; }
table.alarms td:nth-child(4) { max-width: 640px; }
table.samples { width: 100%; table-layout: fixed; }
table.samples th.prompt { width: 18%; font-weight: 600; background: #f3f6f9; }
.answer { white-space: pre-wrap; word-break: break-word; font-family: ui-monospace, Menlo, Consolas, monospace;
          font-size: 12px; }
.meta { color: var(--muted); font-size: 11px; margin-top: 4px; }
td.missing { color: var(--muted); text-align: center; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(400px, 1fr)); gap: 10px; }
figure { margin: 0; background: #fff; border: 1px solid var(--line); border-radius: 6px; padding: 4px; }
figure img { width: 100%; height: auto; display: block; }
.swatch { display: inline-block; width: 12px; height: 12px; border-radius: 2px; margin: 0 4px -1px 8px; }
table.kv th { background: #f3f6f9; font-weight: 600; }
table.stages .barcell { width: 320px; }
.bar { height: 12px; background: #0072B2; border-radius: 2px; min-width: 2px; }
details { background: #fff; border: 1px solid var(--line); border-radius: 6px; padding: 6px 10px; margin: 6px 0; }
summary { cursor: pointer; font-weight: 600; }
pre { background: #f6f8fa; padding: 8px; overflow-x: auto; font-size: 12px; }
"""


def render_report(coll: Collection) -> str:
    """The whole page as one HTML string."""
    names = ", ".join(r.name for r in coll.runs)
    when = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    title = f"Heed report · {coll.root.resolve().name}"
    body = "".join(
        [
            f'<header><h1>{esc(title)}</h1><p class="note">{len(coll.runs)} run'
            f"{'s' if len(coll.runs) != 1 else ''}: {esc(names)} · {esc(coll.root)} · generated {esc(when)}</p></header>",
            _verdict(coll),
            _cards(coll),
            _compare_table(coll),
            _score_vs_kl_section(coll),
            _alarms_section(coll),
            _curves(coll),
            _samples_section(coll),
            _rm_section(coll),
            _stages_section(coll),
            _configs_section(coll),
        ]
    )
    csp = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head>"
        f"<body><main>{body}</main></body></html>\n"
    )


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write ``report.html`` for a run folder or a folder of runs; returns its path.

    ``out`` defaults to ``RUN_DIR/report.html``. Raises :class:`heed.errors.HeedError` when
    ``run_dir`` holds no run.
    """
    coll = load_collection(run_dir)
    path = Path(out) if out is not None else Path(run_dir) / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(render_report(coll), encoding="utf-8")
    tmp.replace(path)
    return path

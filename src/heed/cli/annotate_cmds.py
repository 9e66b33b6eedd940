"""``heed annotate ...``: the human-feedback collection app (server, projects, users, import/export)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from heed.cli.app import app

annotate = typer.Typer(
    help="Collect human preferences in the browser: serve, import, export, users.", no_args_is_help=True
)
user_app = typer.Typer(help="Manage annotators and admins.", no_args_is_help=True)
project_app = typer.Typer(help="Create and list projects.", no_args_is_help=True)
annotate.add_typer(user_app, name="user")
annotate.add_typer(project_app, name="project")
app.add_typer(annotate, name="annotate")

DbOpt = Annotated[
    str,
    typer.Option(
        "--db",
        envvar="HEED_ANNOTATE_DB",
        help="SQLAlchemy URL or SQLite file (postgresql+psycopg2://... for PostgreSQL).",
    ),
]
ProjectOpt = Annotated[str, typer.Option("--project", "-p", help="Project name.")]


def _feedback(db: str):  # type: ignore[no-untyped-def]
    from heed.feedback.service import Feedback

    return Feedback(db)


@annotate.command("serve")
def serve(
    db: DbOpt = "heed-annotate.db",
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            help="Worker processes sharing the port; one that dies is restarted at once while the others "
            "answer. 1: a single process (a crash stops the service until it is restarted).",
        ),
    ] = 2,
    secure_cookies: Annotated[
        bool, typer.Option(help="Mark the session cookie Secure (behind HTTPS).")
    ] = False,
) -> None:
    """Run the annotation web app (pages at /, JSON API at /api, schema at /docs)."""
    from heed.feedback.listen import listen_socket

    # Listen before the heavy imports: clients arriving during start-up (after a restart) queue.
    sock = listen_socket(host, port)
    from heed.feedback.api import serve as run

    typer.echo(f"heed annotate: http://{host}:{port}/  (database {db}, {workers} worker(s))")
    if workers == 1:
        run(db, sock=sock, secure_cookies=secure_cookies)
        return
    from heed.feedback.service import Feedback
    from heed.feedback.workers import supervise

    # Create or migrate the schema once, here: N workers doing it at once would race, and a bad
    # --db is one line from this process rather than one per worker. No connection survives the fork.
    Feedback(db).close()
    code = supervise(lambda s: run(db, sock=s, secure_cookies=secure_cookies), sock, workers)
    if code:
        raise typer.Exit(code)


@project_app.command("create")
def project_create(
    name: Annotated[str, typer.Argument(help="Project name (letters, digits, _ . -).")],
    task: Annotated[
        str,
        typer.Option(
            help="pairwise (A/B), ranking (K answers), binary (thumbs), rating (Likert), critique (text), "
            "edit (corrected answer), or several joined by commas, e.g. ranking,critique."
        ),
    ] = "pairwise",
    overlap: Annotated[int, typer.Option(help="Annotations wanted per record.")] = 1,
    guidelines: Annotated[Path | None, typer.Option(help="Markdown file shown beside every record.")] = None,
    tie: Annotated[bool, typer.Option("--tie/--no-tie", help="Allow ties.")] = True,
    discard: Annotated[
        bool, typer.Option("--discard/--no-discard", help="Allow discarding a record.")
    ] = True,
    rationale: Annotated[str, typer.Option(help="off, optional or required.")] = "optional",
    lease_seconds: Annotated[int, typer.Option(help="How long a handed-out record stays reserved.")] = 600,
    scale: Annotated[str | None, typer.Option(help="Rating: the Likert scale LOW-HIGH, e.g. 1-7.")] = None,
    scale_labels: Annotated[
        str | None, typer.Option(help='Rating: names of the low and high ends, e.g. "harmful,excellent".')
    ] = None,
    diff: Annotated[
        bool, typer.Option("--diff/--no-diff", help="Show how two answers differ (key f).")
    ] = False,
    suggest: Annotated[
        tuple[str, Path] | None,
        typer.Option(
            help="Show a model's suggestion: reward-model DIR (its scores, computed at import). Off by "
            "default: suggestions pull annotators towards the model."
        ),
    ] = None,
    suggest_show: Annotated[
        str, typer.Option(help="scores, or ranking (the model's order only).")
    ] = "scores",
    suggest_rate: Annotated[
        float, typer.Option(help="Share of records shown with the suggestion (the rest measure its pull).")
    ] = 1.0,
    db: DbOpt = "heed-annotate.db",
) -> None:
    """Create a project."""
    from heed.errors import DataError

    suggestion = None
    if suggest is not None:
        source, folder = suggest
        if source != "reward-model":
            raise DataError(f"--suggest {source!r}: expected reward-model DIR")
        from heed.cli.builtin import resolve_path

        folder = resolve_path(folder, "--suggest")
        if not Path(folder).is_dir():
            raise DataError(f"--suggest reward-model {folder}: no such folder")
        suggestion = {"model": str(Path(folder).resolve()), "show": suggest_show, "rate": suggest_rate}

    text = ""
    if guidelines is not None:
        if not guidelines.is_file():
            raise DataError(f"--guidelines {guidelines}: no such file")
        text = guidelines.read_text(encoding="utf-8")
    p = _feedback(db).create_project(
        name,
        task,
        guidelines=text,
        overlap=overlap,
        allow_tie=tie,  # type: ignore[arg-type]
        allow_discard=discard,
        rationale=rationale,
        lease_seconds=lease_seconds,
        scale=scale,
        scale_labels=scale_labels,
        diff=diff,
        suggest=suggestion,
    )  # type: ignore[arg-type]
    typer.echo(f"created project {p.name} ({', '.join(p.kinds)}, overlap {p.overlap})")


@project_app.command("list")
def project_list(db: DbOpt = "heed-annotate.db") -> None:
    """List projects with their progress."""
    fb = _feedback(db)
    for p in fb.projects():
        prog = fb.progress(p.name)
        typer.echo(
            f"{p.name}\t{','.join(p.kinds)}\toverlap={p.overlap}\trecords={p.num_records}\t"
            f"annotations={prog['annotations']}/{prog['target']}"
        )


@user_app.command("add")
def user_add(
    name: Annotated[str, typer.Argument(help="User name (unique ignoring case).")],
    role: Annotated[str, typer.Option(help="annotator or admin.")] = "annotator",
    project: Annotated[
        list[str] | None, typer.Option("--project", "-p", help="Make the user a member (repeatable).")
    ] = None,
    db: DbOpt = "heed-annotate.db",
) -> None:
    """Create a user and print a one-time password (only its argon2 hash is stored); the user must
    choose their own password at first login."""
    fb = _feedback(db)
    for p in project or []:
        fb.project(p)  # an unknown project is refused before the user is created
    info, password = fb.add_user(name, role)  # type: ignore[arg-type]
    for p in project or []:
        fb.add_member(p, info)
    typer.echo(f"user {info.name} ({info.role}) password: {password}")


@user_app.command("reset")
def user_reset(
    name: Annotated[str, typer.Argument(help="User name.")], db: DbOpt = "heed-annotate.db"
) -> None:
    """Give a user a new one-time password (to change at next login) and end their sessions."""
    typer.echo(f"user {name} password: {_feedback(db).set_password(name)}")


@user_app.command("disable")
def user_disable(
    name: Annotated[str, typer.Argument(help="User name.")], db: DbOpt = "heed-annotate.db"
) -> None:
    """Disable a user: no login, sessions ended, pending records released (their labels stay)."""
    u = _feedback(db).set_active(name, False)
    typer.echo(f"user {u.name} disabled")


@user_app.command("enable")
def user_enable(
    name: Annotated[str, typer.Argument(help="User name.")], db: DbOpt = "heed-annotate.db"
) -> None:
    """Enable a disabled user again."""
    u = _feedback(db).set_active(name, True)
    typer.echo(f"user {u.name} enabled")


@user_app.command("rename")
def user_rename(
    old: Annotated[str, typer.Argument(help="Current name, spelled exactly as stored.")],
    new: Annotated[str, typer.Argument(help="New name.")],
    db: DbOpt = "heed-annotate.db",
) -> None:
    """Rename a user (also resolves two older names that differ only in case)."""
    from heed.feedback.service import Feedback

    fb = Feedback(db, allow_name_clashes=True)
    u = fb.rename_user(old, new)
    fb.close()
    Feedback(db).close()  # with the clash gone, the case-insensitive index can be made now
    typer.echo(f"user {old} renamed to {u.name}")


@user_app.command("list")
def user_list(db: DbOpt = "heed-annotate.db") -> None:
    """List users (name, role, state)."""
    for u in _feedback(db).users():
        flags = ("active" if u.active else "disabled") + (
            ", one-time password" if u.must_change_password else ""
        )
        typer.echo(f"{u.name}\t{u.role}\t{flags}")


@project_app.command("add-member")
def project_add_member(
    project: Annotated[str, typer.Argument(help="Project name.")],
    users: Annotated[list[str], typer.Argument(help="User names.")],
    db: DbOpt = "heed-annotate.db",
) -> None:
    """Let annotators work on a project (annotators see only their projects; admins see all)."""
    fb = _feedback(db)
    for u in users:
        fb.add_member(project, u)
    typer.echo(f"{project} members: {', '.join(fb.members(project))}")


@project_app.command("remove-member")
def project_remove_member(
    project: Annotated[str, typer.Argument(help="Project name.")],
    users: Annotated[list[str], typer.Argument(help="User names.")],
    db: DbOpt = "heed-annotate.db",
) -> None:
    """Take a project away from annotators (their labels stay; pending records are released)."""
    fb = _feedback(db)
    for u in users:
        fb.remove_member(project, u)
    typer.echo(f"{project} members: {', '.join(fb.members(project)) or '(none)'}")


@project_app.command("members")
def project_members(
    project: Annotated[str, typer.Argument(help="Project name.")], db: DbOpt = "heed-annotate.db"
) -> None:
    """List a project's members."""
    for name in _feedback(db).members(project):
        typer.echo(name)


def _scorer(reward_model: Path):  # type: ignore[no-untyped-def]
    import heed
    from heed.cli.builtin import resolve_path
    from heed.errors import ModelLoadError

    reward_model = resolve_path(reward_model, "--reward-model")
    try:
        rm = heed.load_reward_model(str(reward_model))
    except ModuleNotFoundError as exc:
        raise ModelLoadError(
            f"--reward-model {reward_model}: reward models are not available in this build ({exc})"
        ) from exc
    return rm.score


@annotate.command("import")
def import_(
    project: ProjectOpt,
    data: Annotated[Path, typer.Option("--data", help="JSONL, Parquet or a datasets folder of records.")],
    file_format: Annotated[
        str | None, typer.Option(help="jsonl, parquet or dataset (default: by name).")
    ] = None,
    reward_model: Annotated[
        Path | None, typer.Option(help="Show records with the smallest score gap first.")
    ] = None,
    db: DbOpt = "heed-annotate.db",
) -> None:
    """Import records {prompt, responses} (or {prompt, chosen, rejected}; one answer, {prompt, response}
    or {prompt, completion}, for binary, rating, critique and edit projects) into a project."""
    from heed.cli.builtin import resolve_path

    fb = _feedback(db)
    n = fb.import_file(project, resolve_path(data, "--data"), file_format)
    typer.echo(f"imported {n} records into {project}")
    _score_suggestions(fb, project)
    if reward_model is not None:
        typer.echo(
            f"scored {fb.set_priorities(project, _scorer(reward_model))} records by reward-model uncertainty"
        )


@annotate.command("generate")
def generate(
    project: ProjectOpt,
    model: Annotated[Path, typer.Option("--model", "-m", help="Local policy folder (Hugging Face format).")],
    prompts: Annotated[Path, typer.Option("--prompts", help='Prompts file: {"prompt": ...} per record.')],
    num_samples: Annotated[
        int, typer.Option("--num-samples", "-k", help="Answers sampled per prompt (2-9).")
    ] = 2,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Longest answer in tokens.")] = 64,
    temperature: Annotated[float, typer.Option(min=0.0, help="Sampling temperature (0 = greedy).")] = 1.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0, help="Nucleus sampling mass.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    reward_model: Annotated[
        Path | None,
        typer.Option(help="Pick the closest-scored pair (pairwise) and show uncertain records first."),
    ] = None,
    db: DbOpt = "heed-annotate.db",
) -> None:
    """Sample K answers per prompt from a policy and import them as records of the project."""
    from heed.cli.builtin import resolve_path
    from heed.feedback.generate import generate_records

    model, prompts = resolve_path(model, "--model"), resolve_path(prompts, "--prompts")
    fb = _feedback(db)
    task = fb.project(project).task
    scorer = _scorer(reward_model) if reward_model is not None else None
    records = generate_records(
        model,
        prompts,
        num_samples,
        task,
        scorer=scorer,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
    )
    n = fb.import_records(project, records)
    typer.echo(f"imported {n} generated records into {project}")
    if scorer is not None:
        typer.echo(f"scored {fb.set_priorities(project, scorer)} records by reward-model uncertainty")


def _score_suggestions(fb, project: str, model: Path | None = None) -> None:  # type: ignore[no-untyped-def]
    """Score the project's records with ``model``, or with its ``--suggest reward-model DIR``."""
    if model is None:
        options = fb.suggest_options(project)
        if options is None or not options.get("model"):
            return
        model = Path(options["model"])
    n = fb.set_suggestions(project, _scorer(model))
    typer.echo(f"scored {n} records with {model} for the suggestions")


@annotate.command("suggest")
def suggest_cmd(
    project: ProjectOpt,
    reward_model: Annotated[
        Path | None, typer.Option(help="Reward model folder (default: the project's --suggest model).")
    ] = None,
    db: DbOpt = "heed-annotate.db",
) -> None:
    """(Re)score every record with the suggestion model (shown only in projects created with --suggest)."""
    from heed.errors import DataError

    fb = _feedback(db)
    if reward_model is None and fb.project(project).suggest is None:
        raise DataError(
            f"suggest: project {project!r} was created without --suggest; give --reward-model DIR"
        )
    _score_suggestions(fb, project, reward_model)


@annotate.command("prioritize")
def prioritize(
    project: ProjectOpt,
    reward_model: Annotated[Path, typer.Option(help="Reward model folder: smallest score gap first.")],
    db: DbOpt = "heed-annotate.db",
) -> None:
    """Order a project's records by reward-model uncertainty (small score gaps first)."""
    n = _feedback(db).set_priorities(project, _scorer(reward_model))
    typer.echo(f"scored {n} records")


@annotate.command("export")
def export(
    project: ProjectOpt,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="FILE.jsonl, FILE.parquet or a folder (datasets).")
    ],
    format: Annotated[
        str,
        typer.Option(
            "--format",
            help="pairs (chosen/rejected), ranked / rankings (ranked groups), kto (thumbs: prompt, completion, "
            "label), sft (corrections) or critiques; which ones a project has follows from its kinds.",
        ),
    ] = "pairs",
    file_format: Annotated[
        str | None, typer.Option(help="jsonl, parquet or dataset (default: by name).")
    ] = None,
    method: Annotated[
        str, typer.Option(help="Scores of --aggregate mean-rank: mean_rank or borda (the same order).")
    ] = "mean_rank",
    aggregate: Annotated[
        str | None,
        typer.Option(
            help="majority (pairwise, binary), mean-rank (ranking), mean (rating) or dawid-skene (pairwise, "
            "ranking, binary: votes weighted by each annotator's estimated reliability). Default by task."
        ),
    ] = None,
    complete_only: Annotated[bool, typer.Option(help="Only records with all `overlap` annotations.")] = False,
    db: DbOpt = "heed-annotate.db",
) -> None:
    """Aggregate the annotations and write the training file (feeds `heed rm train` / `heed dpo`)."""
    from heed.errors import DataError
    from heed.feedback.aggregate import AGGREGATIONS
    from heed.feedback.service import EXPORT_FORMATS

    if format not in EXPORT_FORMATS:
        raise DataError(f"--format {format!r}: expected {', '.join(EXPORT_FORMATS)}")
    if method not in ("mean_rank", "borda"):
        raise DataError(f"--method {method!r}: expected mean_rank or borda")
    if aggregate is not None and aggregate not in AGGREGATIONS:
        raise DataError(f"--aggregate {aggregate!r}: expected {', '.join(AGGREGATIONS)}")
    fb = _feedback(db)
    path, n = fb.export_file(
        project,
        format,
        out,
        file_format,
        method=method,  # type: ignore[arg-type]
        complete_only=complete_only,
        aggregate=aggregate,
    )
    summary = fb.summary(project, aggregate=aggregate)
    typer.echo(f"wrote {n} {format} rows to {path}; record outcomes: {json.dumps(summary)}")


@annotate.command("stats")
def stats(project: ProjectOpt, db: DbOpt = "heed-annotate.db") -> None:
    """Print progress, agreement, position bias and each annotator's estimated reliability as JSON.

    ``agreement.per_annotator[user]`` puts the Dawid-Skene ``reliability`` (chance of giving a pair's
    true preference) next to the leave-one-out agreement; ``agreement.reliability`` has the fit
    (confusion matrices, class prior). ``suggestions`` (projects made with --suggest) gives the
    labels' agreement with the model's suggestion, given with it shown and hidden.
    """
    fb = _feedback(db)

    def finite(x):  # type: ignore[no-untyped-def]
        if isinstance(x, float):
            return x if math.isfinite(x) else None
        if isinstance(x, dict):
            return {k: finite(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [finite(v) for v in x]
        return x

    typer.echo(
        json.dumps(
            finite(
                {
                    "progress": fb.progress(project),
                    "agreement": asdict(fb.agreement(project)),
                    "outcomes": fb.summary(project),
                    "suggestions": fb.suggestion_agreement(project),
                }
            ),
            indent=2,
            ensure_ascii=False,
        )
    )


def _load_watch_state(path: Path, project: str) -> dict:  # type: ignore[type-arg]
    """The watch's state file, or a fresh state when there is none; one-line errors otherwise."""
    from heed.errors import DataError

    if not path.exists():
        return {"project": project, "last_complete": 0, "runs": 0, "last_run": None}
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        ok = isinstance(state, dict) and isinstance(state.get("last_complete"), int)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not a watch state file ({exc.__class__.__name__}: {exc})") from None
    if not ok or not isinstance(state.get("runs"), int):
        raise DataError(f"{path}: not a watch state file (expected last_complete and runs as integers)")
    if state.get("project") != project:
        raise DataError(
            f"{path}: state of project {state.get('project')!r}, not {project!r}; pass --state FILE"
        )
    return state


def _save_watch_state(path: Path, state: dict) -> None:  # type: ignore[type-arg]
    """Write the state atomically (a killed watch leaves the old file or the new one, never half)."""
    import os

    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


@annotate.command("watch")
def watch(
    project: ProjectOpt,
    every: Annotated[
        int, typer.Option(help="Start the command each time this many more records are complete.")
    ],
    command: Annotated[
        list[str] | None, typer.Argument(help="The command to start, after -- (e.g. heed rm train ...).")
    ] = None,
    interval: Annotated[float, typer.Option(help="Seconds between two looks at the store.")] = 30.0,
    max_runs: Annotated[int | None, typer.Option(help="Stop after starting the command this often.")] = None,
    once: Annotated[
        bool, typer.Option("--once", help="Look once (start the command if due), then exit.")
    ] = False,
    state: Annotated[
        Path | None, typer.Option(help="State file (default heed-watch-PROJECT.json in this folder).")
    ] = None,
    db: DbOpt = "heed-annotate.db",
) -> None:
    """Start a command each time N more records reach their overlap, e.g. retrain the reward model.

    The count of complete records at each start is kept in the state file, so a restarted watch
    does not start the command again for the same records (an interrupted run is not repeated; a
    failed run stops the watch and is retried when it is started again). The command sees
    HEED_WATCH_PROJECT, HEED_WATCH_RUN and HEED_WATCH_COMPLETE in its environment.
    """
    import os
    import shlex
    import subprocess
    import time

    from heed.errors import DataError, HeedError

    if every < 1:
        raise DataError(f"--every {every}: expected a positive number of records")
    if interval < 0:
        raise DataError(f"--interval {interval}: expected seconds >= 0")
    if max_runs is not None and max_runs < 1:
        raise DataError(f"--max-runs {max_runs}: expected 1 or more")
    if not command:
        raise DataError("watch: give the command after --, e.g. -- heed rm train --config rm.yaml")
    path = state or Path(f"heed-watch-{project}.json")
    st = _load_watch_state(path, project)
    fb = _feedback(db)
    fb.project(project)  # an unknown project fails here, before any state is written
    if st["last_run"] and st["last_run"].get("status") == "running":
        typer.echo(f"watch: run {st['last_run']['run']} was interrupted; not started again for these records")
        st["last_run"]["status"] = "interrupted"
        _save_watch_state(path, st)
    started = 0
    while True:
        complete = int(fb.progress(project)["complete_records"])
        if complete - st["last_complete"] >= every:
            # step 1: record the start before starting, so a restart never starts it twice
            previous, run_no = st["last_complete"], st["runs"] + 1
            st.update(last_complete=complete, runs=run_no)
            st["last_run"] = {
                "run": run_no,
                "complete": complete,
                "started_at": time.time(),
                "status": "running",
            }
            _save_watch_state(path, st)
            typer.echo(
                f"watch: {complete} complete records ({complete - previous} new); run {run_no}: {shlex.join(command)}"
            )
            # step 2: run it, with the counts in its environment
            env = {
                **os.environ,
                "HEED_WATCH_PROJECT": project,
                "HEED_WATCH_RUN": str(run_no),
                "HEED_WATCH_COMPLETE": str(complete),
            }
            try:
                rc = subprocess.run(command, env=env, check=False).returncode
            except OSError as exc:  # not found, not executable
                rc = None
                error = f"watch: cannot start {command[0]!r} ({exc.strerror or exc})"
            else:
                error = f"watch: run {run_no} ({shlex.join(command)}) exited with code {rc}"
            # step 3: a failure hands these records back to the next start of the watch
            st["last_run"].update(status="ok" if rc == 0 else "failed", returncode=rc, ended_at=time.time())
            if rc != 0:
                st["last_complete"] = previous
                _save_watch_state(path, st)
                raise HeedError(f"{error}; fix it and start the watch again to retry")
            _save_watch_state(path, st)
            started += 1
            if max_runs is not None and started >= max_runs:
                return
            continue
        if once:
            return
        time.sleep(interval)

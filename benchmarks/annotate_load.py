"""Annotation server under load, over real HTTP on 127.0.0.1.

20 concurrent annotators submit 1,000 pairwise annotations (500 records x overlap 2) through a
`heed annotate serve --workers N` subprocess (N = 2 by default): once steady, once with one worker
process SIGKILLed after 400 acknowledged submissions (the supervisor replaces it; the other worker
answers meanwhile), and once with the whole server SIGKILLed after 400 and restarted (after
`--restart-delay` seconds, 0.5 by default). Prints, per run: acknowledged / stored / lost / stored
twice / over-assigned records, p50 / p99 submit latency over every acknowledged submission (those
in flight at the kill included: `spanned_restart`), and `restart_s` (server: from the SIGKILL to
the new server answering; worker: to the replacement's fork).

    PYTHONPATH=src python benchmarks/annotate_load.py
    PYTHONPATH=src python benchmarks/annotate_load.py --db postgresql+psycopg2://USER@HOST/EMPTY_DB

(With `--db`, every run needs an empty database: give one run with `--only`, e.g. `--only worker`.)
"""

from __future__ import annotations

import argparse
import json
import tempfile

from heed.feedback.loadtest import run_load

RUNS = {"steady": (None, "server"), "worker": (True, "worker"), "server": (True, "server")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--annotators", type=int, default=20)
    ap.add_argument("--annotations", type=int, default=1000)
    ap.add_argument("--kill-after", type=int, default=400)
    ap.add_argument("--restart-delay", type=float, default=0.5)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--db", default=None, help="Database URL of an EMPTY database (default: SQLite files).")
    ap.add_argument("--only", choices=list(RUNS), action="append", help="Runs to do (default: all).")
    args = ap.parse_args()
    only = args.only or list(RUNS)
    if args.db and len(only) > 1:
        ap.error("--db: every run needs an empty database; pick one run with --only")
    for label in only:
        kill_after, kill = RUNS[label]
        with tempfile.TemporaryDirectory(prefix="heed-load-") as tmp:
            figures = run_load(
                tmp,
                annotators=args.annotators,
                annotations=args.annotations,
                kill_after=args.kill_after if kill_after else None,
                kill=kill,
                workers=args.workers,
                restart_delay_s=args.restart_delay,
                db=args.db,
            )
        ok = figures["lost"] == 0 and figures["stored_twice"] == 0 and figures["over_assigned_records"] == 0
        print(f"== {label}: {'OK' if ok else 'FAILED'}")
        print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()

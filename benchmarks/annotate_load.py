"""Annotation server under load, over real HTTP on 127.0.0.1.

20 concurrent annotators submit 1,000 pairwise annotations (500 records x overlap 2) through a
`heed annotate serve` subprocess; then the same with the server SIGKILLed after 400 acknowledged
submissions and restarted (after `--restart-delay` seconds, 0.5 by default). Prints, per run:
acknowledged / stored / lost / stored twice / over-assigned records, p50 / p99 submit latency over
every acknowledged submission (those that waited across the restart included: `spanned_restart`),
and `restart_s`, from the SIGKILL to the new server answering.

    PYTHONPATH=src python benchmarks/annotate_load.py

(For PostgreSQL: `python -m heed.feedback.loadtest --db URL --kill-after 400` on an empty database.)
"""

from __future__ import annotations

import argparse
import json
import tempfile

from heed.feedback.loadtest import run_load


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--annotators", type=int, default=20)
    ap.add_argument("--annotations", type=int, default=1000)
    ap.add_argument("--kill-after", type=int, default=400)
    ap.add_argument("--restart-delay", type=float, default=0.5)
    args = ap.parse_args()
    for label, kill in (("steady", None), ("sigkill-restart", args.kill_after)):
        with tempfile.TemporaryDirectory(prefix="heed-load-") as tmp:
            figures = run_load(
                tmp,
                annotators=args.annotators,
                annotations=args.annotations,
                kill_after=kill,
                restart_delay_s=args.restart_delay,
            )
        ok = figures["lost"] == 0 and figures["stored_twice"] == 0 and figures["over_assigned_records"] == 0
        print(f"== {label}: {'OK' if ok else 'FAILED'}")
        print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()

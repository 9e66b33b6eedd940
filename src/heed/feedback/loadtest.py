"""Load test over real HTTP on loopback: N annotators label a project to completion through a
``heed annotate serve`` subprocess, optionally SIGKILLed and restarted mid-run.

Checks (returned, and asserted by the tests): every acknowledged submission is stored exactly once
(the idempotency key is ``user:record``, so a retry after a lost reply or a crash is recognised),
no record holds more than ``overlap`` annotations, and the stored count equals the distinct
acknowledged count. Reports p50/p99 submit latency over every acknowledged submission, those that
waited across the kill included (``spanned_restart`` counts them), and ``restart_s``: for
``--kill server``, from the SIGKILL to the new server answering ``/health`` (``restart_delay_s``
of it is the pause a process supervisor takes before restarting, 0.5 s by default; systemd's
``RestartSec`` default is 0.1 s); for ``--kill worker``, from the SIGKILL to the replacement
worker's fork (the other workers answer throughout).

Each annotator is a client that retries a request that got no answer or a 5xx, as a browser's
fetch wrapper or an API client would: after 10, 20, 40, 80, 160 ms, then every 250 ms (each delay
drawn between half and all of that, so twenty clients do not retry in step), for at most a minute.
A retried submission carries the same idempotency key, so it is stored once.

Used by ``benchmarks/annotate_load.py`` and ``tests/feedback/test_load.py``; run directly with
``python -m heed.feedback.loadtest --help``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m heed annotate serve --workers N`` as a child process bound to 127.0.0.1, in a
    process group of its own (the supervisor and its workers)."""

    def __init__(self, db: str, port: int, log: Path, workers: int = 2) -> None:
        self.db, self.port, self.log, self.workers = db, port, log, workers
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> None:
        env = dict(os.environ)
        src = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        with self.log.open("ab") as fh:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "heed",
                    "annotate",
                    "serve",
                    "--db",
                    self.db,
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--workers",
                    str(self.workers),
                ],
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log}")
            try:
                # (the server listens before it has loaded the app: this waits in its accept queue)
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=5.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"server did not answer /health within {timeout} s; see {self.log}")

    def kill(self) -> None:
        """SIGKILL the whole server (supervisor and workers): no shutdown handlers run, like a crash
        of the machine's service."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def worker_pids(self) -> list[int]:
        """The supervisor's children (its workers), from ``/proc`` (Linux)."""
        if self.proc is None:
            return []
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            # "pid (comm) state ppid ...": comm may hold spaces, so split after its closing ")"
            if int(stat.rsplit(")", 1)[1].split()[1]) == self.proc.pid:
                pids.append(int(entry))
        return sorted(pids)

    def kill_worker(self, timeout: float = 30.0) -> int:
        """SIGKILL one worker process and wait until the supervisor has replaced it; returns its pid."""
        before = self.worker_pids()
        if not before:
            raise RuntimeError("kill worker: the server has no worker processes (--workers 1?)")
        os.kill(before[0], signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            now = self.worker_pids()
            if before[0] not in now and len(now) == len(before):
                return before[0]
            time.sleep(0.01)
        raise RuntimeError(f"kill worker: no replacement for worker {before[0]} within {timeout} s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


@dataclass
class Ack:
    user: str
    record_id: int
    annotation_id: int
    duplicate: bool


@dataclass
class Shared:
    acks: list[Ack] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    spans: list[tuple[float, float]] = field(default_factory=list)  # (sent, acknowledged), perf_counter
    errors: list[str] = field(default_factory=list)
    retries: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


RETRY_FIRST_S = 0.01  # the first retry's delay; doubled each time up to RETRY_MAX_S
RETRY_MAX_S = 0.25
RETRY_BUDGET_S = 60.0  # then the client gives up (reported as an error)


def retry_delay(attempt: int, rng: random.Random) -> float:
    """Seconds to wait before retry ``attempt`` (0-based): 10, 20, 40, ... ms capped at 250 ms,
    each drawn uniformly between half and all of that (jitter)."""
    return min(RETRY_FIRST_S * 2**attempt, RETRY_MAX_S) * rng.uniform(0.5, 1.0)


@dataclass
class Reply:
    status_code: int
    text: str

    def json(self) -> Any:
        return json.loads(self.text)


class Client:
    """A keep-alive HTTP/1.1 JSON client on :mod:`http.client`: it costs the load generator far
    less CPU per request than httpx, so twenty annotators on the server's machine leave its cores
    to the server. A connection that failed is dropped and the next request opens a new one."""

    def __init__(self, host: str, port: int, timeout: float = 30.0) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.headers = {"Content-Type": "application/json", "Accept": "application/json"}
        self.conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, json_body: Any = None) -> Reply:
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        body = None if json_body is None else json.dumps(json_body).encode("utf-8")
        try:
            self.conn.request(method, path, body=body, headers=self.headers)
            resp = self.conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException):
            self.close()
            raise
        if resp.will_close:
            self.close()
        return Reply(resp.status, data.decode("utf-8", "replace"))

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def _request(
    client: Client,
    shared: Shared,
    method: str,
    path: str,
    stop: threading.Event,
    rng: random.Random,
    json_body: Any = None,
) -> Reply | None:
    """One request, retried (see the module docstring) while the server is down or restarting."""
    deadline = time.monotonic() + RETRY_BUDGET_S
    attempt = 0
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            r = client.request(method, path, json_body)
            if r.status_code < 500:
                return r
        except (OSError, http.client.HTTPException):
            pass
        with shared.lock:
            shared.retries += 1
        time.sleep(retry_delay(attempt, rng))
        attempt += 1
    return None


def annotator(
    port: int,
    name: str,
    password: str,
    project: str,
    task: str,
    shared: Shared,
    max_steps: int,
    stop: threading.Event,
    seed: int,
) -> None:
    rng = random.Random(seed)
    client = Client("127.0.0.1", port)
    try:
        r = _request(
            client,
            shared,
            "POST",
            "/api/login",
            stop,
            rng,
            {"name": name, "password": password, "bearer": True},
        )
        if r is None or r.status_code != 200:
            shared.errors.append(f"{name}: login failed: {r.status_code if r else 'no answer'}")
            return
        client.headers["Authorization"] = f"Bearer {r.json()['token']}"
        for _ in range(max_steps):
            r = _request(client, shared, "POST", f"/api/projects/{project}/next", stop, rng)
            if r is None or r.status_code != 200:
                shared.errors.append(
                    f"{name}: next: {r.status_code if r else 'no answer'} {r.text if r else ''}"
                )
                return
            item = r.json()
            if item["done"]:
                return
            k = len(item["responses"])
            body: dict[str, Any] = {
                "record_id": item["record_id"],
                "idempotency_key": f"{name}:{item['record_id']}",
            }
            if task == "pairwise":
                body["choice"] = rng.choice(["A", "B", "A", "B", "tie"])
            else:
                body["ranks"] = [rng.randint(1, k) for _ in range(k)]
            t0 = time.perf_counter()
            r = _request(client, shared, "POST", f"/api/projects/{project}/annotations", stop, rng, body)
            dt = time.perf_counter() - t0
            if r is None or r.status_code != 200:
                shared.errors.append(
                    f"{name}: submit: {r.status_code if r else 'no answer'} {r.text if r else ''}"
                )
                return
            out = r.json()
            with shared.lock:
                shared.acks.append(Ack(name, out["record_id"], out["annotation_id"], out["duplicate"]))
                shared.latencies.append(dt)
                shared.spans.append((t0, t0 + dt))
    finally:
        client.close()


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def run_load(
    workdir: str | Path,
    *,
    annotators: int = 20,
    annotations: int = 1000,
    overlap: int = 2,
    task: str = "pairwise",
    kill_after: int | None = None,
    kill: str = "server",
    workers: int = 2,
    restart_delay_s: float = 0.5,
    db: str | None = None,
    fast_hashes: bool = False,
    timeout_s: float = 600.0,
) -> dict[str, Any]:
    """Run the load test and return its figures and checks (see the module docstring).

    ``kill``: what is SIGKILLed after ``kill_after`` acknowledged submissions: ``server`` (the
    supervisor's whole process group, restarted after ``restart_delay_s``) or ``worker`` (one
    worker process; the supervisor replaces it and the other workers answer meanwhile)."""
    from heed.feedback.service import Feedback

    if kill not in ("server", "worker"):
        raise ValueError(f"kill={kill!r}: expected server or worker")
    if kill == "worker" and workers < 2 and kill_after is not None:
        raise ValueError("kill='worker' needs workers >= 2 (with one worker, kill the server)")

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if db is None:
        for old in workdir.glob("load.db*"):  # a fresh database per run
            old.unlink()
        db = f"sqlite:///{workdir / 'load.db'}"
    hasher = None
    if fast_hashes:
        from argon2 import PasswordHasher

        hasher = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1)
    fb = Feedback(db, hasher=hasher)
    records = annotations // overlap
    k = 2 if task == "pairwise" else 4
    fb.create_project("load", task, overlap=overlap)  # type: ignore[arg-type]
    fb.import_records(
        "load",
        [
            {"prompt": f"prompt {i} 你好", "responses": [f"answer {i}.{j}" for j in range(k)]}
            for i in range(records)
        ],
    )
    from heed.feedback.auth import new_password

    # passwords of their own (not one-time ones, which must be changed before anything else)
    users = {f"ann{i:02d}": fb.add_user(f"ann{i:02d}", password=new_password())[1] for i in range(annotators)}
    for name in users:
        fb.add_member("load", name)

    server = Server(db, free_port(), workdir / "server.log", workers)
    server.start()
    shared, stop = Shared(), threading.Event()
    kills = 0
    killed_at = restart_s = None
    t0 = time.perf_counter()
    threads = [
        threading.Thread(
            target=annotator,
            args=(server.port, n, p, "load", task, shared, 4 * records, stop, i),
            daemon=True,
        )
        for i, (n, p) in enumerate(users.items())
    ]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + timeout_s
        while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
            if kill_after is not None and kills == 0 and len(shared.acks) >= kill_after:
                killed_at = time.perf_counter()
                kills += 1
                if kill == "worker":
                    server.kill_worker()  # returns once the supervisor has forked the replacement
                else:
                    server.kill()
                    time.sleep(restart_delay_s)
                    server.start()
                restart_s = time.perf_counter() - killed_at
            time.sleep(0.02)
        stop.set()
        for t in threads:
            t.join(30)
    finally:
        server.stop()
    elapsed = time.perf_counter() - t0
    # every submission's (sent, latency) in seconds from the start, for a look at where the slow ones fall
    with (workdir / "submits.json").open("w", encoding="utf-8") as fh:
        json.dump(
            {
                "killed_at_s": None if killed_at is None else round(killed_at - t0, 4),
                "submits": sorted((round(a - t0, 4), round(b - a, 4)) for a, b in shared.spans),
            },
            fh,
        )

    # verify against the database itself
    judgements = fb.annotations("load")
    stored = {(a["user"], a["record_id"]): a["annotation_id"] for a in judgements}
    ack_ids: dict[tuple[str, int], set[int]] = {}
    for a in shared.acks:
        ack_ids.setdefault((a.user, a.record_id), set()).add(a.annotation_id)
    lost = [key for key, ids in ack_ids.items() if stored.get(key) not in ids]
    double = [key for key, ids in ack_ids.items() if len(ids) > 1]
    per_record: dict[int, int] = {}
    for a in judgements:
        per_record[a["record_id"]] = per_record.get(a["record_id"], 0) + 1
    over = [rid for rid, c in per_record.items() if c > overlap]
    progress = fb.progress("load")
    fb.close()
    return {
        "annotators": annotators,
        "workers": workers,
        "kill": None if kill_after is None else kill,
        "target_annotations": records * overlap,
        "acknowledged": len(ack_ids),
        "acks_total": len(shared.acks),
        "duplicate_acks": sum(a.duplicate for a in shared.acks),
        "stored": len(judgements),
        "lost": len(lost),
        "stored_twice": len(double),
        "over_assigned_records": len(over),
        "complete_records": progress["complete_records"],
        "unacknowledged_stored": len(set(stored) - set(ack_ids)),
        "kills": kills,
        "retries": shared.retries,
        "errors": shared.errors[:10],
        "elapsed_s": round(elapsed, 2),
        "submits_per_s": round(len(shared.latencies) / elapsed, 1) if elapsed else None,
        "p50_submit_ms": round(1000 * percentile(shared.latencies, 50), 2),
        "p99_submit_ms": round(1000 * percentile(shared.latencies, 99), 2),
        "max_submit_ms": round(1000 * max(shared.latencies, default=float("nan")), 2),
        "restart_s": None if restart_s is None else round(restart_s, 2),
        "spanned_restart": 0 if killed_at is None else sum(a < killed_at < b for a, b in shared.spans),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="runs/annotate-load")
    ap.add_argument("--annotators", type=int, default=20)
    ap.add_argument("--annotations", type=int, default=1000)
    ap.add_argument("--overlap", type=int, default=2)
    ap.add_argument("--task", choices=["pairwise", "ranking"], default="pairwise")
    ap.add_argument("--kill-after", type=int, default=None, help="SIGKILL after this many acks.")
    ap.add_argument(
        "--kill",
        choices=["server", "worker"],
        default="server",
        help="What --kill-after SIGKILLs: one worker process, or the whole server (then restarted).",
    )
    ap.add_argument("--workers", type=int, default=2, help="heed annotate serve --workers.")
    ap.add_argument(
        "--restart-delay", type=float, default=0.5, help="Seconds between the SIGKILL and the restart."
    )
    ap.add_argument("--db", default=None, help="Database URL (default: a SQLite file in --workdir).")
    args = ap.parse_args(argv)
    print(
        json.dumps(
            run_load(
                args.workdir,
                annotators=args.annotators,
                annotations=args.annotations,
                overlap=args.overlap,
                task=args.task,
                kill_after=args.kill_after,
                kill=args.kill,
                workers=args.workers,
                restart_delay_s=args.restart_delay,
                db=args.db,
            ),
            indent=2,
        )
    )


if __name__ == "__main__":
    main()

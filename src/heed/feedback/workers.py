"""Pre-forked worker processes for ``heed annotate serve --workers N``, restarted the moment one dies.

The supervisor (the ``heed annotate serve`` process) binds the port once
(:func:`heed.feedback.listen.listen_socket`), imports the app's modules once, and forks N workers
that all accept on that one socket, each with its own database engine and uvicorn server. When a
worker dies (a crash, the OOM killer, SIGKILL) its clients see a reset connection and retry; the
other workers answer them at once, since new connections wait in the shared accept queue rather
than in the dead process, and the supervisor forks a replacement straight away (no imports left
to do). SIGTERM or SIGINT to the supervisor stops every worker (SIGTERM: uvicorn's graceful
shutdown, SIGKILL after ``stop_timeout_s``) and then exits. Workers get SIGTERM if the
supervisor itself dies (Linux ``PR_SET_PDEATHSIG``), so none is left holding the port.

Imports only the standard library (Linux and other POSIX systems: it forks).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import sys
import time
from collections.abc import Callable

from heed.errors import ConfigError

# a worker that exits by itself (not killed) this soon after its start failed to start: the
# supervisor stops instead of forking it again and again (e.g. the database went away)
EARLY_EXIT_S = 5.0
SIGNALS = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT}


def _die_with_parent() -> None:
    """Ask Linux to send this process SIGTERM when its parent (the supervisor) dies."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return


def _fork_worker(serve: Callable[[socket.socket], None], sock: socket.socket, supervisor: int) -> int:
    pid = os.fork()
    if pid:
        return pid
    # the worker: default signal handling (uvicorn installs its own), never return to the caller
    code = 1
    try:
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
        _die_with_parent()
        if os.getppid() != supervisor:  # the supervisor died before the request took effect
            os._exit(0)
        serve(sock)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException as exc:
        print(f"heed annotate: worker {os.getpid()}: {exc}", file=sys.stderr, flush=True)
        code = 2
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def supervise(
    serve: Callable[[socket.socket], None],
    sock: socket.socket,
    workers: int,
    *,
    stop_timeout_s: float = 10.0,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
) -> int:
    """Run ``serve(sock)`` in ``workers`` forked processes until SIGTERM or SIGINT; restart each one
    that dies. Returns the exit code: 0 after a requested stop, a worker's code when it failed
    at start (see :data:`EARLY_EXIT_S`)."""
    if workers < 1:
        raise ConfigError(f"--workers {workers}: expected 1 or more")
    me = os.getpid()
    signal.signal(signal.SIGCHLD, lambda *_: None)  # (a blocked, ignored SIGCHLD might not queue)
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    started: dict[int, float] = {}  # pid -> start time
    code = 0
    try:
        for _ in range(workers):
            started[_fork_worker(serve, sock, me)] = time.monotonic()
        while code == 0:
            info = signal.sigtimedwait(SIGNALS, 1.0)  # (also a periodic look, in case SIGCHLDs merged)
            if info is not None and info.si_signo != signal.SIGCHLD:
                break
            while started:
                pid, status = os.waitpid(-1, os.WNOHANG)
                if pid == 0:
                    break
                began = started.pop(pid, None)
                if began is None:
                    continue
                if (
                    os.WIFEXITED(status)
                    and os.WEXITSTATUS(status)
                    and time.monotonic() - began < EARLY_EXIT_S
                ):
                    code = os.WEXITSTATUS(status)
                    log(f"heed annotate: worker {pid} failed to start (exit code {code}); stopping")
                    break
                why = (
                    f"signal {signal.Signals(os.WTERMSIG(status)).name}"
                    if os.WIFSIGNALED(status)
                    else f"exit code {os.WEXITSTATUS(status)}"
                )
                new = _fork_worker(serve, sock, me)
                started[new] = time.monotonic()
                log(f"heed annotate: worker {pid} died ({why}); started worker {new}")
    finally:
        _stop_all(started, stop_timeout_s)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    return code


def _stop_all(started: dict[int, float], timeout_s: float) -> None:
    """SIGTERM every worker, wait up to ``timeout_s`` for them, then SIGKILL the rest."""
    for pid in started:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    pending = set(started)
    while pending:
        for pid in list(pending):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                pending.discard(pid)
        if not pending:
            return
        if time.monotonic() > deadline:
            for pid in pending:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
            return
        time.sleep(0.02)


__all__ = ["supervise"]

"""The server's listening socket, opened before the app is imported and built.

``heed annotate serve`` binds first and then spends most of its start-up importing FastAPI and
SQLAlchemy and opening the database. Clients that connect during that time (annotators retrying
after a restart) wait in the kernel's accept queue instead of being refused and backing off, and
are answered the moment the app is ready. Imports only the standard library.
"""

from __future__ import annotations

import socket

from heed.errors import ConfigError

BACKLOG = 2048  # connections queued while the app starts (uvicorn's default backlog)


def listen_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``(host, port)`` and listening; a one-line :class:`ConfigError` when
    the address is taken or cannot be used."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except (OSError, OverflowError) as exc:
        sock.close()
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"--host {host} --port {port}: cannot listen there ({why})") from None
    return sock

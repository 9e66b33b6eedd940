"""Fixtures for the annotation app: a fresh database per test (SQLite always; PostgreSQL too when
HEED_TEST_POSTGRES_URL is set, in a schema of its own that is dropped afterwards)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

pytest.importorskip("sqlalchemy")
pytest.importorskip("fastapi")

from argon2 import PasswordHasher

PG_URL = os.environ.get("HEED_TEST_POSTGRES_URL")
BACKENDS = ["sqlite"] + (["postgresql"] if PG_URL else [])


def fast_hasher() -> PasswordHasher:
    """Real argon2id with small parameters so tests do not spend seconds hashing."""
    return PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1)


@pytest.fixture
def hasher() -> PasswordHasher:
    return fast_hasher()


def _postgres_schema_url() -> Iterator[str]:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    schema = f"heed_t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_URL)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = make_url(PG_URL).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path) -> Iterator[str]:  # type: ignore[no-untyped-def]
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'heed.db'}"
    else:
        yield from _postgres_schema_url()


@pytest.fixture
def fb(db_url: str, hasher: PasswordHasher):  # type: ignore[no-untyped-def]
    from heed.feedback.service import Feedback

    service = Feedback(db_url, hasher=hasher, seed=0)
    yield service
    service.close()

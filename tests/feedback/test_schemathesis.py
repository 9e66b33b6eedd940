"""Property-based API test: schemathesis generates requests from the OpenAPI schema (valid and
invalid ones) and none may get a 5xx. Runs as an admin with a bearer token, on SQLite."""

from __future__ import annotations

from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402

from heed.feedback.api import create_app  # noqa: E402
from heed.feedback.service import Feedback  # noqa: E402

from .conftest import fast_hasher  # noqa: E402


def build_app():  # type: ignore[no-untyped-def]
    """A fresh SQLite database in a temporary folder, seeded with an admin, two projects and records."""
    import atexit
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix="heed-schemathesis-")
    atexit.register(shutil.rmtree, folder, True)
    db = Path(folder) / "heed.db"
    fb = Feedback(f"sqlite:///{db}", hasher=fast_hasher(), seed=0)
    fb.add_user("boss", "admin", password="boss-password-1")
    fb.create_project("p", "pairwise", overlap=2)
    fb.create_project("r", "ranking", overlap=1)
    fb.import_records("p", [{"prompt": f"q{i}", "responses": ["a", "b"]} for i in range(20)])
    fb.import_records("r", [{"prompt": f"q{i}", "responses": ["a", "b", "c"]} for i in range(20)])
    token, _ = fb.open_session("boss", kind="bearer")
    return create_app(fb, login_limit=1000), token


APP, TOKEN = build_app()
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@schema.parametrize()
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case) -> None:  # type: ignore[no-untyped-def]
    response = case.call(headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code < 500, (
        f"{case.method} {case.formatted_path}: {response.status_code} {response.text[:500]}"
    )

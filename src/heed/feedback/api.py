"""The HTTP side: a FastAPI app whose JSON routes call :class:`heed.feedback.service.Feedback`, and the
pages (login, account, projects, annotate, admin, API docs) that drive those routes from vanilla JS.

Security: every route except ``/health``, ``/login``, ``/docs``, ``/openapi.json`` and
``POST /api/login`` needs a session: an HttpOnly, SameSite=Strict cookie (state-changing requests
must then echo the session's CSRF token in ``X-CSRF-Token``) or ``Authorization: Bearer TOKEN``
from ``POST /api/login {"bearer": true}``. For every state-changing ``/api`` request the session,
the CSRF token and the body size are checked on the headers, before the body is read (:class:`Gate`).
``GET`` never changes state. A user on a one-time password may only change it. Annotators see
only their own work in the projects they are members of; ``/admin`` and ``/api/admin/*`` need the
admin role.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import re
import socket
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import cookie_parser

from heed.errors import HeedError
from heed.feedback import i18n
from heed.feedback.auth import LoginLimiter, SharedLoginLimiter, same_token
from heed.feedback.kinds import parse_kinds
from heed.feedback.service import (
    MIN_PASSWORD,
    NAME_RE,
    ConflictError,
    Feedback,
    ForbiddenError,
    NotFoundError,
    UserInfo,
    export_formats,
    one_prompt_form,
)

HERE = Path(__file__).parent
COOKIE = "heed_session"
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
NAME_PATTERN = NAME_RE.pattern
MAX_BODY = 1 << 20  # 1 MiB for ordinary requests
MAX_IMPORT_BODY = 64 << 20  # 64 MiB for record imports (admins only)
MAX_LOGIN_BODY = 4 << 10  # a name and a password
IMPORT_PATH = re.compile(r"^/api/admin/projects/[^/]+/records$")
PUBLIC_PATHS = {"/health", "/api/login"}  # API routes that need no session
SESSION_FREE_PAGES = {"/login", "/docs", "/openapi.json"}
MUST_CHANGE = "change your one-time password first (POST /api/me/password)"

ProjectName = Annotated[str, PathParam(pattern=NAME_PATTERN, max_length=64, description="Project name.")]
UserName = Annotated[str, PathParam(pattern=NAME_PATTERN, max_length=64, description="User name.")]


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


# ------------------------------------------------------------------- request / response bodies


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Issue(BaseModel):
    loc: list[str | int] = Field(description="Where: e.g. ['body', 'ranks', 0].")
    msg: str
    type: str


class ErrorOut(BaseModel):
    """Every error (4xx) has this body."""

    detail: str = Field(description="One message for the user, naming the field when one is at fault.")
    errors: list[Issue] | None = Field(None, description="Validation errors (422 only), at most 10.")


class LoginIn(Strict):
    name: str = Field(min_length=1, max_length=64, description="User name (case does not matter).")
    password: str = Field(min_length=1, max_length=256, description="Password.")
    bearer: bool = Field(
        False, description="Return a bearer token for API clients instead of setting a cookie."
    )


class LoginOut(BaseModel):
    user: str
    role: str
    csrf_token: str = Field(
        description="Send as X-CSRF-Token on state-changing requests made with the cookie."
    )
    token: str | None = Field(None, description="Bearer token (only when requested).")
    must_change_password: bool = Field(
        False, description="True on a one-time password: only POST /api/me/password is open until then."
    )


class PasswordIn(Strict):
    current_password: str = Field(min_length=1, max_length=256)
    new_password: str = Field(min_length=MIN_PASSWORD, max_length=256)


class OkOut(BaseModel):
    ok: bool


KINDS_PATTERN = (
    r"^(pairwise|ranking|binary|rating|critique|edit)(,(pairwise|ranking|binary|rating|critique|edit)){0,2}$"
)


class ProjectIn(Strict):
    name: str = Field(pattern=NAME_PATTERN, max_length=64, description="Project name.")
    task: str = Field(
        pattern=KINDS_PATTERN,
        max_length=64,
        description="Feedback kind(s): pairwise (A/B), ranking (K answers), binary (thumbs), rating "
        "(Likert scale), critique (text), edit (corrected answer); several joined by commas, e.g. "
        "ranking,critique (at most one of the first four).",
    )
    scale: str | None = Field(
        None, pattern=r"^\d-\d$", description="Rating: the Likert scale LOW-HIGH (default 1-5)."
    )
    scale_labels: list[Annotated[str, Field(min_length=1, max_length=100)]] | None = Field(
        None, min_length=2, max_length=2, description="Rating: names of the scale's low and high ends."
    )
    diff: bool = Field(False, description="Show how two answers differ (key f).")
    guidelines: str = Field("", max_length=100_000, description="Annotation guidelines (Markdown).")
    overlap: int = Field(1, ge=1, le=100, description="Annotations wanted per record.")
    allow_tie: bool = Field(True, description="Offer 'tie' (pairwise) / allow equal ranks (ranking).")
    allow_discard: bool = Field(True, description="Offer 'discard' for unusable records.")
    rationale: Literal["off", "optional", "required"] = Field("optional", description="Free-text rationale.")
    lease_seconds: int = Field(
        600, ge=10, le=604_800, description="How long a handed-out record is reserved."
    )


class ProjectOut(BaseModel):
    name: str
    task: str = Field(description="The judgement kind (or the only kind); `kinds` lists them all.")
    guidelines: str
    guidelines_html: str
    overlap: int
    lease_seconds: int
    allow_tie: bool
    allow_discard: bool
    rationale: str
    num_records: int
    kinds: list[str] = Field(description="Every kind asked on each record, judgement first.")
    scale: list[int] | None = Field(None, description="Rating: the scale's lowest and highest point.")
    scale_labels: list[str] | None = Field(None, description="Rating: names of the scale's ends.")
    diff: bool = False
    suggest: str | None = Field(None, description="How a model's suggestion is shown (scores | ranking).")
    suggest_rate: float = Field(0.0, description="Share of handed-out records showing the suggestion.")
    formats: list[str] = Field([], description="The export formats the project's kinds give.")


class SuggestionOut(BaseModel):
    scores: list[float] = Field(description="The model's score per display position.")
    ranks: list[int] = Field(description="The model's ranking per display position (1 = best).")
    label: str | None = Field(None, description="Binary: the model's suggested thumb.")


class RecordsIn(Strict):
    records: list[dict[str, Any]] = Field(
        min_length=1, max_length=20_000, description="Records: {prompt, responses, id?, metadata?}."
    )


class CountOut(BaseModel):
    count: int


class ResponseOut(BaseModel):
    position: int = Field(description="Display position, 0 = shown first.")
    text: str


class AssignmentOut(BaseModel):
    done: bool = Field(description="True when nothing is left for this annotator.")
    record_id: int | None = None
    prompt: Any = None
    responses: list[ResponseOut] = []
    expires_at: str | None = None
    suggestion: SuggestionOut | None = Field(None, description="A model's suggestion, when shown to you.")


class Judgement(Strict):
    choice: Literal["A", "B", "tie", "discard"] | None = Field(None, description="Pairwise: A = first shown.")
    ranks: list[int | float] | None = Field(
        None, min_length=2, max_length=9, description="Ranking: a rank per display position, lower is better."
    )
    thumb: Literal["up", "down"] | None = Field(None, description="Binary: thumbs up or down.")
    rating: float | None = Field(None, description="Rating: a point of the project's scale.")
    critique: str | None = Field(None, max_length=10_000, description="Critique: what is right or wrong.")
    edit: str | None = Field(None, max_length=200_000, description="Edit: the corrected answer.")
    discard: bool = Field(
        False, description="Discard the record (any kind but pairwise, which sends choice)."
    )
    rationale: str | None = Field(None, max_length=10_000, description="Why (free text).")


class SubmitIn(Judgement):
    record_id: int = Field(ge=1, le=2**31 - 1, description="The assigned record.")
    idempotency_key: str = Field(
        min_length=1,
        max_length=128,
        pattern=r"^[\x21-\x7e]+$",
        description="Unique per submission; a retry with the same key is stored once.",
    )
    duration_ms: int | None = Field(None, ge=0, le=2**31 - 1, description="Time spent, for the admin page.")


class SubmitOut(BaseModel):
    annotation_id: int
    record_id: int
    duplicate: bool


class SkipIn(Strict):
    record_id: int = Field(ge=1, le=2**31 - 1, description="The assigned record to pass over.")


class SkipOut(BaseModel):
    record_id: int
    skipped: bool = Field(description="False when it had been skipped already (a retry).")


class UndoOut(BaseModel):
    record_id: int | None


class PastLabelOut(BaseModel):
    annotation_id: int
    record_id: int
    prompt: Any
    choice: str | None = Field(None, description="Pairwise: A / B (display positions), tie or discard.")
    ranks: list[int | float] | None = Field(None, description="Ranking: a rank per display position.")
    thumb: str | None = None
    rating: int | float | None = None
    critique: str | None = None
    edit: str | None = None
    discard: bool
    rationale: str | None
    created_at: str


class PastAnnotationOut(PastLabelOut):
    responses: list[ResponseOut]


class ProgressOut(BaseModel):
    project: str
    total: int
    complete_records: int
    annotations: int
    target: int
    done: int | None = None
    assigned: int | None = None
    available: int | None = None
    skipped: int | None = None
    annotators: list[dict[str, Any]] | None = None


class UserIn(Strict):
    name: str = Field(pattern=NAME_PATTERN, max_length=64, description="Unique ignoring case.")
    role: Literal["annotator", "admin"] = "annotator"
    projects: list[Annotated[str, Field(pattern=NAME_PATTERN, max_length=64)]] = Field(
        [], max_length=100, description="Projects the new user may work on."
    )


class UserOut(BaseModel):
    name: str
    role: str
    active: bool = True
    must_change_password: bool = False
    password: str | None = Field(None, description="One-time password, returned only on creation.")


class MemberIn(Strict):
    user: str = Field(pattern=NAME_PATTERN, max_length=64)


class MeOut(BaseModel):
    name: str
    role: str
    csrf_token: str | None
    must_change_password: bool = False


# ------------------------------------------------------------------- helpers


def finite(obj: Any) -> Any:
    """Replace NaN/inf (undefined statistics) by None so responses are valid JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    return obj


def render_markdown(text: str) -> str:
    """Markdown to HTML with raw HTML disabled (so guidelines cannot carry script) and unsafe links dropped."""
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": False}).enable("table").render(text)


def _json_response(status: int, detail: str, headers: dict[str, str] | None = None) -> tuple[dict, bytes]:
    body = json.dumps({"detail": detail}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return {"type": "http.response.start", "status": status, "headers": raw}, body


class Gate:
    """ASGI middleware that judges a request on its line and headers before reading its body.

    For a state-changing ``/api`` request (other than ``POST /api/login``): no valid session gives
    401 and a cookie session without the right ``X-CSRF-Token`` 403, without reading a byte of the
    body; then a ``Content-Length`` over the limit gives 413, and a streamed body is cut off at the
    limit (413). The limit is 1 MiB, 4 KiB for logins and 64 MiB for an admin's record import. The
    session found is handed to the routes in ``scope["state"]``.
    """

    def __init__(self, app: Any, resolve: Callable[[str, Headers], tuple]) -> None:
        self.app, self.resolve = app, resolve

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        method, path = scope.get("method", "GET"), scope["path"]
        headers = Headers(scope=scope)
        limit = MAX_BODY
        if method not in SAFE_METHODS and path.startswith("/api/"):
            if path == "/api/login":
                limit = MAX_LOGIN_BODY
            else:
                found = await run_in_threadpool(self.resolve, method, headers)
                if isinstance(found[0], int):  # (status, message, headers): refused
                    return await self._reject(send, *found)
                scope.setdefault("state", {})["heed_session"] = found
                if found[0].role == "admin" and IMPORT_PATH.match(path):
                    limit = MAX_IMPORT_BODY
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await self._too_large(send, limit)
        if method in SAFE_METHODS:
            return await self.app(scope, receive, send)
        messages, total = [], 0
        while True:
            msg = await receive()
            messages.append(msg)
            if msg["type"] != "http.request":
                break
            total += len(msg.get("body", b""))
            if total > limit:
                return await self._too_large(send, limit)
            if not msg.get("more_body"):
                break

        async def replay() -> dict:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, send: Any, limit: int) -> None:
        await self._reject(
            send, 413, f"request body too large; at most {limit} bytes", {"Connection": "close"}
        )

    @staticmethod
    async def _reject(send: Any, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        start, body = _json_response(status, message, {**SECURITY_HEADERS, **(headers or {})})
        await send(start)
        await send({"type": "http.response.body", "body": body})


class SecurityHeaders:
    """ASGI middleware adding :data:`SECURITY_HEADERS` to every response that does not set them
    itself (a plain wrapper of ``send``: no task or stream per request)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for k, v in SECURITY_HEADERS.items():
                    headers.setdefault(k, v)
            await send(message)

        await self.app(scope, receive, send_with_headers)


SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

ERROR_TEXT = {
    400: "Malformed JSON body.",
    401: "No session, or an expired or forged one.",
    403: "Wrong role, missing or wrong X-CSRF-Token, not a member, or a one-time password to change first.",
    404: "Unknown project, record, annotation or user.",
    409: "Conflicts with the current state (record full, lease expired, already annotated, key reused).",
    413: "Request body over the limit (1 MiB; record imports 64 MiB).",
    422: "Invalid input; `detail` names the field(s), `errors` lists them.",
    429: "Too many failed logins from this address; see Retry-After.",
    503: "Too many logins being checked at once; see Retry-After.",
}


def api_schema(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema, made true to the API: every 4xx body is ``ErrorOut`` (``detail`` is a string),
    and the cookie + CSRF and bearer security schemes are declared per operation."""
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    comps = schema.setdefault("components", {})
    schemas = comps.setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    for model in (ErrorOut, Issue):
        schemas[model.__name__] = model.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas["ErrorOut"].pop("$defs", None)
    comps["securitySchemes"] = {
        "cookie": {
            "type": "apiKey",
            "in": "cookie",
            "name": COOKIE,
            "description": "Session cookie set by POST /api/login (HttpOnly, SameSite=Strict).",
        },
        "csrf": {
            "type": "apiKey",
            "in": "header",
            "name": "X-CSRF-Token",
            "description": "The session's csrf_token (from POST /api/login or GET /api/me); required "
            "with the cookie on every state-changing request.",
        },
        "bearer": {
            "type": "http",
            "scheme": "bearer",
            "description": "Token from POST /api/login with bearer=true; needs no CSRF token.",
        },
    }
    error_ref = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}}
    for path, ops in schema.get("paths", {}).items():
        for method, op in ops.items():
            for code, resp in op.get("responses", {}).items():
                if code.startswith(("4", "5")):
                    resp["content"] = error_ref
                    resp["description"] = ERROR_TEXT.get(int(code), resp.get("description", "Error"))
            if path in PUBLIC_PATHS:
                op.pop("security", None)
            elif method.upper() in SAFE_METHODS:
                op["security"] = [{"cookie": []}, {"bearer": []}]
            else:
                op["security"] = [{"cookie": [], "csrf": []}, {"bearer": []}]
    return schema


# ------------------------------------------------------------------- the app


def create_app(
    db: str | Path | Feedback,
    *,
    secure_cookies: bool = False,
    login_limit: int = 10,
    login_window_s: float = 300.0,
    login_slots: int = 2,
    limiter: LoginLimiter | SharedLoginLimiter | None = None,
) -> FastAPI:
    """Build the app over a database URL/path (or an open :class:`Feedback`).

    ``secure_cookies`` adds the ``Secure`` flag (serve behind HTTPS). Failed logins: ``login_limit``
    per ``login_window_s`` per (user name, client address), ten times that per address, then a
    backoff of at most 30 s, all counted before any hash, in the database so that every worker
    process sees them (:class:`heed.feedback.auth.SharedLoginLimiter`); at most ``login_slots``
    password checks run at once in this process. ``limiter`` replaces the default limiter.
    """
    fb = db if isinstance(db, Feedback) else Feedback(db)
    limiter = limiter or SharedLoginLimiter(fb.store, login_limit, login_window_s)
    hash_slots = asyncio.Semaphore(login_slots)
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    templates = Environment(
        loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"])
    )

    app = FastAPI(
        title="Heed annotation API",
        version="2",
        description="Collect human feedback: pairwise and ranking preferences, thumbs, ratings, critiques "
        "and edits. Every page action has a route here. "
        "Authenticate with the session cookie plus X-CSRF-Token on state-changing requests, or a "
        "bearer token. Errors are {detail: string}.",
        docs_url=None,
        redoc_url=None,
    )
    app.state.feedback = fb
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    def resolve(method: str, headers: Headers) -> tuple:
        """``(user, csrf or None, token)`` for the request's session, else ``(status, message, headers)``."""
        auth = headers.get("authorization", "")
        scheme, _, credentials = auth.partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            token = credentials.strip()
            found = fb.session_user(token)
            if found is None or found[2] != "bearer":
                return 401, "invalid or expired bearer token", {"WWW-Authenticate": "Bearer"}
            return found[0], None, token
        token = cookie_parser(headers.get("cookie", "")).get(COOKIE)
        found = fb.session_user(token) if token else None
        if found is None or found[2] != "cookie":
            return 401, "not logged in", None
        user, csrf, _ = found
        if method not in SAFE_METHODS and not same_token(headers.get("x-csrf-token"), csrf):
            return 403, "missing or wrong X-CSRF-Token header", None
        return user, csrf, token

    app.add_middleware(Gate, resolve=resolve)
    app.add_middleware(SecurityHeaders)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = api_schema(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    # ----------------------------------------------------------- errors: one clear message, never a 5xx for bad input

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(HeedError)
    async def _heed_error(_: Request, exc: HeedError) -> JSONResponse:
        status = (
            404
            if isinstance(exc, NotFoundError)
            else 409
            if isinstance(exc, ConflictError)
            else 403
            if isinstance(exc, ForbiddenError)
            else 422
        )
        return JSONResponse({"detail": str(exc)}, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            msg = next(e for e in errors if e.get("type") == "json_invalid").get("ctx", {}).get("error", "")
            return JSONResponse({"detail": f"malformed JSON body: {msg}".strip()}, status_code=400)
        parts = []
        for e in errors[:10]:
            loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
            parts.append(f"{loc}: {e.get('msg', 'invalid')}")
        return JSONResponse(
            {
                "detail": "; ".join(parts),
                "errors": finite(
                    json.loads(
                        json.dumps(
                            [
                                {
                                    "loc": [x if isinstance(x, int) else str(x) for x in e.get("loc", ())],
                                    "msg": str(e.get("msg")),
                                    "type": str(e.get("type")),
                                }
                                for e in errors[:10]
                            ],
                            default=str,
                        )
                    )
                ),
            },
            status_code=422,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"detail": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    # ----------------------------------------------------------- sessions

    # (dependencies that touch no database are async: FastAPI runs a sync one on a worker thread,
    # one hop per dependency per request)
    async def session(request: Request) -> tuple:
        """``(user, csrf, token)``: from the gate for state-changing requests, else looked up here."""
        found = request.scope.get("state", {}).get("heed_session")
        if found is None:
            found = await run_in_threadpool(resolve, request.method, request.headers)
        if isinstance(found[0], int):
            raise ApiError(*found)
        return found

    async def current_user(sess: tuple = Depends(session)) -> UserInfo:
        if sess[0].must_change_password:
            raise ApiError(403, MUST_CHANGE)
        return sess[0]

    async def admin_user(user: UserInfo = Depends(current_user)) -> UserInfo:
        if user.role != "admin":
            raise ApiError(403, "admins only")
        return user

    def member(project: ProjectName, user: UserInfo = Depends(current_user)) -> UserInfo:
        """The user, when they may open the project (admins: every project; annotators: their own).
        Otherwise 404, as for a project that does not exist, so names are not revealed."""
        if not fb.can_access(user, project):
            raise NotFoundError(f"project {project!r} not found")
        return user

    def project_out(name: str) -> ProjectOut:
        p = fb.project(name)
        return ProjectOut(
            **asdict(p),
            guidelines_html=render_markdown(p.guidelines),
            formats=list(export_formats(parse_kinds(p.kinds or p.task))),
        )

    def client_address(request: Request) -> str:
        return request.client.host if request.client else "?"

    async def checked_password(
        name: str, address: str, check: Callable[[], Any], failed: Callable[[Any], bool]
    ) -> Any:
        """Run a password check under the login limiter (counted before hashing) and the hash slots."""
        wait = await run_in_threadpool(limiter.acquire, name, address)  # (the shared one queries)
        if wait is not None:
            raise ApiError(
                429,
                f"too many failed login attempts; try again in {math.ceil(wait)} s",
                {"Retry-After": str(math.ceil(wait))},
            )
        ok: bool | None = False
        try:
            try:
                await asyncio.wait_for(hash_slots.acquire(), timeout=10)
            except asyncio.TimeoutError:
                raise ApiError(503, "too many logins at once; try again", {"Retry-After": "2"}) from None
            try:
                result = await run_in_threadpool(check)
            finally:
                hash_slots.release()
            ok = not failed(result)
            return result
        except HeedError:  # refused before any password was checked (e.g. a new password too short)
            ok = None
            raise
        finally:
            await run_in_threadpool(lambda: limiter.release(name, address, ok=ok))

    # ----------------------------------------------------------- routes: health, auth

    @app.get("/health", tags=["meta"])
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post(
        "/api/login", response_model=LoginOut, tags=["auth"], responses={401: {}, 413: {}, 429: {}, 503: {}}
    )
    async def login(body: LoginIn, request: Request, response: Response) -> LoginOut:
        user = await checked_password(
            body.name,
            client_address(request),
            lambda: fb.authenticate(body.name, body.password),
            lambda u: u is None,
        )
        if user is None:
            raise ApiError(401, "wrong name or password")
        token, csrf = await run_in_threadpool(fb.open_session, user, "bearer" if body.bearer else "cookie")
        out = LoginOut(
            user=user.name, role=user.role, csrf_token=csrf, must_change_password=user.must_change_password
        )
        if body.bearer:
            out.token = token
            return out
        response.set_cookie(
            COOKIE,
            token,
            httponly=True,
            samesite="strict",
            secure=secure_cookies,
            path="/",
            max_age=12 * 3600,
        )
        return out

    @app.post("/api/logout", response_model=OkOut, tags=["auth"], responses={401: {}, 403: {}})
    def logout(response: Response, sess: tuple = Depends(session)) -> OkOut:
        fb.close_session(sess[2])
        response.delete_cookie(COOKIE, path="/")
        return OkOut(ok=True)

    @app.get("/api/me", response_model=MeOut, tags=["auth"], responses={401: {}})
    def me(sess: tuple = Depends(session)) -> MeOut:
        u = sess[0]
        return MeOut(
            name=u.name, role=u.role, csrf_token=sess[1], must_change_password=u.must_change_password
        )

    @app.post(
        "/api/me/password",
        response_model=OkOut,
        tags=["auth"],
        responses={401: {}, 403: {}, 413: {}, 429: {}, 503: {}},
    )
    async def change_password(body: PasswordIn, request: Request, sess: tuple = Depends(session)) -> OkOut:
        """Replace your password (required after a one-time password). Ends your other sessions."""
        user = sess[0]

        def check() -> bool:
            try:
                fb.change_password(user, body.current_password, body.new_password, keep_session=sess[2])
            except ForbiddenError:
                return False
            return True

        if not await checked_password(user.name, client_address(request), check, lambda ok: not ok):
            raise ApiError(403, "current_password: wrong password")
        return OkOut(ok=True)

    # ----------------------------------------------------------- routes: annotating

    @app.get(
        "/api/projects", response_model=list[ProjectOut], tags=["annotate"], responses={401: {}, 403: {}}
    )
    def list_projects(user: UserInfo = Depends(current_user)) -> list[ProjectOut]:
        """The projects you may open (an annotator: those they are a member of)."""
        return [project_out(p.name) for p in fb.projects(user)]

    @app.get(
        "/api/projects/{project}",
        response_model=ProjectOut,
        tags=["annotate"],
        responses={401: {}, 403: {}, 404: {}},
    )
    def get_project(project: ProjectName, user: UserInfo = Depends(member)) -> ProjectOut:
        return project_out(project)

    @app.post(
        "/api/projects/{project}/next",
        response_model=AssignmentOut,
        tags=["annotate"],
        responses={401: {}, 403: {}, 404: {}},
    )
    def next_assignment(project: ProjectName, user: UserInfo = Depends(member)) -> AssignmentOut:
        """Lease the next record to you (or return your pending one, lease renewed)."""
        a = fb.next_assignment(user, project)
        if a is None:
            return AssignmentOut(done=True)
        return AssignmentOut(
            done=False,
            record_id=a.record_id,
            prompt=a.prompt,
            responses=[ResponseOut(position=i, text=t) for i, t in enumerate(a.responses)],
            expires_at=a.expires_at.isoformat() + "Z",
            suggestion=SuggestionOut(**a.suggestion) if a.suggestion else None,
        )

    @app.post(
        "/api/projects/{project}/annotations",
        response_model=SubmitOut,
        tags=["annotate"],
        responses={400: {}, 401: {}, 403: {}, 404: {}, 409: {}, 413: {}},
    )
    def submit(project: ProjectName, body: SubmitIn, user: UserInfo = Depends(member)) -> SubmitOut:
        r = fb.submit(
            user,
            project,
            body.record_id,
            choice=body.choice,
            ranks=body.ranks,
            discard=body.discard,
            rationale=body.rationale,
            key=body.idempotency_key,
            duration_ms=body.duration_ms,
            thumb=body.thumb,
            rating=body.rating,
            critique=body.critique,
            edit=body.edit,
        )
        return SubmitOut(annotation_id=r.annotation_id, record_id=r.record_id, duplicate=r.duplicate)

    @app.post(
        "/api/projects/{project}/skip",
        response_model=SkipOut,
        tags=["annotate"],
        responses={400: {}, 401: {}, 403: {}, 404: {}, 409: {}, 413: {}},
    )
    def skip(project: ProjectName, body: SkipIn, user: UserInfo = Depends(member)) -> SkipOut:
        """Pass over your current record: no vote, its slot goes back to others, not shown to you again."""
        return SkipOut(record_id=body.record_id, skipped=fb.skip(user, project, body.record_id))

    @app.post(
        "/api/projects/{project}/undo",
        response_model=UndoOut,
        tags=["annotate"],
        responses={401: {}, 403: {}, 404: {}},
    )
    def undo(project: ProjectName, user: UserInfo = Depends(member)) -> UndoOut:
        return UndoOut(record_id=fb.undo_last(user, project))

    @app.get(
        "/api/projects/{project}/progress",
        response_model=ProgressOut,
        tags=["annotate"],
        responses={401: {}, 403: {}, 404: {}},
    )
    def my_progress(project: ProjectName, user: UserInfo = Depends(member)) -> ProgressOut:
        return ProgressOut(**fb.progress(project, user))

    @app.get(
        "/api/projects/{project}/history",
        response_model=list[PastLabelOut],
        tags=["annotate"],
        responses={401: {}, 403: {}, 404: {}},
    )
    def history(
        project: ProjectName,
        limit: int = Query(50, ge=1, le=500),
        offset: int = Query(0, ge=0, le=10_000_000),
        user: UserInfo = Depends(member),
    ) -> list[PastLabelOut]:
        """Your labels in this project, newest first, in display positions."""
        return [PastLabelOut(**h) for h in fb.history(user, project, limit=limit, offset=offset)]

    @app.get(
        "/api/projects/{project}/annotations/{annotation_id}",
        response_model=PastAnnotationOut,
        tags=["annotate"],
        responses={401: {}, 403: {}, 404: {}},
    )
    def past_annotation(
        project: ProjectName,
        annotation_id: Annotated[int, PathParam(ge=1, le=2**31 - 1)],
        user: UserInfo = Depends(member),
    ) -> PastAnnotationOut:
        """One of your past labels with its record, responses in the order you saw them."""
        a = fb.past_annotation(user, project, annotation_id)
        a["responses"] = [ResponseOut(position=i, text=t) for i, t in enumerate(a["responses"])]
        return PastAnnotationOut(**a)

    @app.put(
        "/api/projects/{project}/annotations/{annotation_id}",
        response_model=SubmitOut,
        tags=["annotate"],
        responses={400: {}, 401: {}, 403: {}, 404: {}, 413: {}},
    )
    def edit_annotation(
        project: ProjectName,
        annotation_id: Annotated[int, PathParam(ge=1, le=2**31 - 1)],
        body: Judgement,
        user: UserInfo = Depends(member),
    ) -> SubmitOut:
        """Change one of your past labels (same record, same display order)."""
        r = fb.edit(
            user,
            project,
            annotation_id,
            choice=body.choice,
            ranks=body.ranks,
            discard=body.discard,
            rationale=body.rationale,
            thumb=body.thumb,
            rating=body.rating,
            critique=body.critique,
            edit=body.edit,
        )
        return SubmitOut(annotation_id=r.annotation_id, record_id=r.record_id, duplicate=False)

    # ----------------------------------------------------------- routes: admin

    @app.post(
        "/api/admin/projects",
        response_model=ProjectOut,
        status_code=201,
        tags=["admin"],
        responses={400: {}, 401: {}, 403: {}, 409: {}, 413: {}},
    )
    def create_project(body: ProjectIn, user: UserInfo = Depends(admin_user)) -> ProjectOut:
        fb.create_project(
            body.name,
            body.task,
            guidelines=body.guidelines,
            overlap=body.overlap,
            allow_tie=body.allow_tie,
            allow_discard=body.allow_discard,
            rationale=body.rationale,
            lease_seconds=body.lease_seconds,
            scale=body.scale,
            scale_labels=body.scale_labels,
            diff=body.diff,
        )
        return project_out(body.name)

    @app.post(
        "/api/admin/projects/{project}/records",
        response_model=CountOut,
        tags=["admin"],
        responses={400: {}, 401: {}, 403: {}, 404: {}, 413: {}},
    )
    def import_records(
        project: ProjectName, body: RecordsIn, user: UserInfo = Depends(admin_user)
    ) -> CountOut:
        return CountOut(count=fb.import_records(project, body.records))

    @app.get(
        "/api/admin/projects/{project}/progress",
        response_model=ProgressOut,
        tags=["admin"],
        responses={401: {}, 403: {}, 404: {}},
    )
    def project_progress(project: ProjectName, user: UserInfo = Depends(admin_user)) -> ProgressOut:
        return ProgressOut(**fb.progress(project))

    @app.get("/api/admin/projects/{project}/stats", tags=["admin"], responses={401: {}, 403: {}, 404: {}})
    def stats(project: ProjectName, user: UserInfo = Depends(admin_user)) -> dict[str, Any]:
        return finite(
            {
                "agreement": asdict(fb.agreement(project)),
                "outcomes": fb.summary(project),
                "progress": fb.progress(project),
                "suggestions": fb.suggestion_agreement(project),
            }
        )

    @app.get(
        "/api/admin/projects/{project}/disagreements", tags=["admin"], responses={401: {}, 403: {}, 404: {}}
    )
    def disagreements(
        project: ProjectName, limit: int = Query(100, ge=1, le=1000), user: UserInfo = Depends(admin_user)
    ) -> list[dict[str, Any]]:
        return finite(fb.disagreements(project, limit))

    @app.get(
        "/api/admin/projects/{project}/annotations", tags=["admin"], responses={401: {}, 403: {}, 404: {}}
    )
    def annotations(project: ProjectName, user: UserInfo = Depends(admin_user)) -> list[dict[str, Any]]:
        return fb.annotations(project)

    @app.get(
        "/api/admin/projects/{project}/export",
        tags=["admin"],
        responses={
            200: {"content": {"application/x-ndjson": {}, "application/vnd.apache.parquet": {}}},
            401: {},
            403: {},
            404: {},
        },
    )
    def export(
        project: ProjectName,
        format: Literal["pairs", "ranked", "rankings", "kto", "sft", "critiques"] = "pairs",
        file: Literal["jsonl", "parquet"] = "jsonl",
        method: Literal["mean_rank", "borda"] = "mean_rank",
        complete_only: bool = False,
        user: UserInfo = Depends(admin_user),
    ) -> Response:
        rows = fb.export(project, format, method=method, complete_only=complete_only)
        name = f"{project}-{format}.{file}"
        headers = {"Content-Disposition": f'attachment; filename="{name}"'}
        if file == "jsonl":
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
            return Response(text.encode("utf-8"), media_type="application/x-ndjson", headers=headers)
        from heed.feedback.records import write_rows

        with tempfile.TemporaryDirectory() as tmp:
            path = write_rows(one_prompt_form(rows), Path(tmp) / name, "parquet") if rows else None
            data = path.read_bytes() if path else _empty_parquet()
        return Response(data, media_type="application/vnd.apache.parquet", headers=headers)

    @app.get(
        "/api/admin/projects/{project}/members",
        response_model=list[str],
        tags=["admin"],
        responses={401: {}, 403: {}, 404: {}},
    )
    def members(project: ProjectName, user: UserInfo = Depends(admin_user)) -> list[str]:
        return fb.members(project)

    @app.post(
        "/api/admin/projects/{project}/members",
        response_model=list[str],
        tags=["admin"],
        responses={400: {}, 401: {}, 403: {}, 404: {}, 413: {}},
    )
    def add_member(project: ProjectName, body: MemberIn, user: UserInfo = Depends(admin_user)) -> list[str]:
        """Let a user work on the project; returns the members."""
        fb.add_member(project, body.user)
        return fb.members(project)

    @app.delete(
        "/api/admin/projects/{project}/members/{name}",
        response_model=list[str],
        tags=["admin"],
        responses={401: {}, 403: {}, 404: {}},
    )
    def remove_member(
        project: ProjectName, name: UserName, user: UserInfo = Depends(admin_user)
    ) -> list[str]:
        """Take the project away from a user (their labels stay); returns the members."""
        fb.remove_member(project, name)
        return fb.members(project)

    def user_out(u: UserInfo, password: str | None = None) -> UserOut:
        return UserOut(
            name=u.name,
            role=u.role,
            active=u.active,
            must_change_password=u.must_change_password,
            password=password,
        )

    @app.get("/api/admin/users", response_model=list[UserOut], tags=["admin"], responses={401: {}, 403: {}})
    def users(user: UserInfo = Depends(admin_user)) -> list[UserOut]:
        return [user_out(u) for u in fb.users()]

    @app.post(
        "/api/admin/users",
        response_model=UserOut,
        status_code=201,
        tags=["admin"],
        responses={400: {}, 401: {}, 403: {}, 404: {}, 409: {}, 413: {}},
    )
    def add_user(body: UserIn, user: UserInfo = Depends(admin_user)) -> UserOut:
        """Create a user with a one-time password (shown once; they must change it at first login)."""
        for p in body.projects:
            fb.project(p)  # 404 before anything is created
        info, password = fb.add_user(body.name, body.role)
        for p in body.projects:
            fb.add_member(p, info)
        return user_out(info, password)

    @app.post(
        "/api/admin/users/{name}/{action}",
        response_model=UserOut,
        tags=["admin"],
        responses={401: {}, 403: {}, 404: {}, 409: {}},
    )
    def set_active(
        name: UserName, action: Literal["disable", "enable"], user: UserInfo = Depends(admin_user)
    ) -> UserOut:
        """Disable (no login, sessions ended, pending records released; labels stay) or enable a user."""
        if action == "disable" and name.lower() == user.name.lower():
            raise ConflictError("you cannot disable yourself")
        return user_out(fb.set_active(name, action == "enable"))

    # ----------------------------------------------------------- pages

    def page(request: Request, name: str, **ctx: Any) -> HTMLResponse:
        lang = i18n.pick_language(
            request.query_params.get("lang") or request.cookies.get("heed_lang"),
            request.headers.get("accept-language"),
        )
        html = templates.get_template(name).render(
            t=i18n.STRINGS[lang], lang=lang, languages=i18n.LANGUAGES, strings=i18n.STRINGS[lang], **ctx
        )
        resp = HTMLResponse(html)
        if request.query_params.get("lang") in i18n.STRINGS:
            resp.set_cookie("heed_lang", lang, samesite="strict", path="/", max_age=365 * 86400)
        return resp

    def page_user(request: Request) -> UserInfo | None:
        found = resolve("GET", request.headers)
        return None if isinstance(found[0], int) or found[1] is None else found[0]

    def gated_page(request: Request, name: str, *, admin: bool = False, **ctx: Any) -> Response:
        user = page_user(request)
        if user is None:
            return RedirectResponse("/login", status_code=303)
        if user.must_change_password:
            return RedirectResponse("/account", status_code=303)
        if admin and user.role != "admin":
            raise ApiError(403, "admins only")
        return page(request, name, user=user, **ctx)

    @app.get("/login", response_class=HTMLResponse, include_in_schema=False)
    def login_page(request: Request) -> HTMLResponse:
        return page(request, "login.html", user=None)

    @app.get("/account", include_in_schema=False)
    def account_page(request: Request) -> Response:
        user = page_user(request)
        if user is None:
            return RedirectResponse("/login", status_code=303)
        return page(request, "account.html", user=user, min_password=MIN_PASSWORD)

    @app.get("/", include_in_schema=False)
    def home(request: Request) -> Response:
        return gated_page(request, "projects.html")

    @app.get("/annotate/{project}", include_in_schema=False)
    def annotate_page(request: Request, project: ProjectName) -> Response:
        return gated_page(request, "annotate.html", project=project)

    @app.get("/admin", include_in_schema=False)
    def admin_page(request: Request) -> Response:
        return gated_page(request, "admin.html", admin=True)

    @app.get("/docs", include_in_schema=False)
    def docs_page(request: Request) -> HTMLResponse:
        """The API reference, rendered from /openapi.json by a local script (no CDN, same CSP)."""
        return page(request, "docs.html", user=page_user(request))

    return app


def _empty_parquet() -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table({}), buf)
    return buf.getvalue()


def serve(
    db: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    sock: socket.socket | None = None,
    **kwargs: Any,
) -> None:
    """Run the app with uvicorn in this process (``heed annotate serve --workers N`` runs it in each of
    N forked processes: :mod:`heed.feedback.workers`).

        ``sock``: a listening socket opened earlier (:func:`heed.feedback.listen.listen_socket`), so
        clients queue instead of being refused while the app starts; else ``host:port`` is bound here.
    """
    import uvicorn

    from heed.feedback.listen import listen_socket

    sock = sock or listen_socket(host, port)
    config = uvicorn.Config(create_app(db, **kwargs), log_level="warning", access_log=False)
    uvicorn.Server(config).run(sockets=[sock])


__all__ = ["create_app", "serve"]

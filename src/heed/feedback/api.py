"""The HTTP side: a FastAPI app whose JSON routes call :class:`heed.feedback.service.Feedback`, and the
three pages (login, annotate, admin) that drive those routes from vanilla JS.

Security: every route except ``/health``, ``/login`` and ``POST /api/login`` needs a session: an
HttpOnly, SameSite=Strict cookie (state-changing requests must then echo the session's CSRF token
in ``X-CSRF-Token``) or ``Authorization: Bearer TOKEN`` from ``POST /api/login {"bearer": true}``.
Annotators see only their own work; ``/admin`` and ``/api/admin/*`` need the admin role.
"""

from __future__ import annotations

import io
import json
import math
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from heed.errors import HeedError
from heed.feedback import i18n
from heed.feedback.auth import RateLimiter, same_token
from heed.feedback.service import (
    NAME_RE,
    ConflictError,
    Feedback,
    ForbiddenError,
    NotFoundError,
    UserInfo,
)

HERE = Path(__file__).parent
COOKIE = "heed_session"
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
NAME_PATTERN = NAME_RE.pattern
MAX_BODY = 1 << 20  # 1 MiB for ordinary requests
MAX_IMPORT_BODY = 64 << 20  # 64 MiB for record imports

ProjectName = Annotated[str, PathParam(pattern=NAME_PATTERN, max_length=64, description="Project name.")]


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


# ------------------------------------------------------------------- request / response bodies


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoginIn(Strict):
    name: str = Field(min_length=1, max_length=64, description="User name.")
    password: str = Field(min_length=1, max_length=256, description="Password.")
    bearer: bool = Field(
        False, description="Return a bearer token for API clients instead of setting a cookie."
    )


class LoginOut(BaseModel):
    user: str
    role: str
    csrf_token: str = Field(description="Send as X-CSRF-Token on POST requests made with the cookie.")
    token: str | None = Field(None, description="Bearer token (only when requested).")


class ProjectIn(Strict):
    name: str = Field(pattern=NAME_PATTERN, max_length=64, description="Project name.")
    task: Literal["pairwise", "ranking"] = Field(description="Choose A/B (pairwise) or rank K responses.")
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
    task: str
    guidelines: str
    guidelines_html: str
    overlap: int
    lease_seconds: int
    allow_tie: bool
    allow_discard: bool
    rationale: str
    num_records: int


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


class SubmitIn(Strict):
    record_id: int = Field(ge=1, le=2**31 - 1, description="The assigned record.")
    idempotency_key: str = Field(
        min_length=1,
        max_length=128,
        pattern=r"^[\x21-\x7e]+$",
        description="Unique per submission; a retry with the same key is stored once.",
    )
    choice: Literal["A", "B", "tie", "discard"] | None = Field(None, description="Pairwise: A = first shown.")
    ranks: list[int | float] | None = Field(
        None, min_length=2, max_length=9, description="Ranking: a rank per display position, lower is better."
    )
    discard: bool = Field(False, description="Ranking: discard the record.")
    rationale: str | None = Field(None, max_length=10_000, description="Why (free text).")
    duration_ms: int | None = Field(None, ge=0, le=2**31 - 1, description="Time spent, for the admin page.")


class SubmitOut(BaseModel):
    annotation_id: int
    record_id: int
    duplicate: bool


class UndoOut(BaseModel):
    record_id: int | None


class ProgressOut(BaseModel):
    project: str
    total: int
    complete_records: int
    annotations: int
    target: int
    done: int | None = None
    assigned: int | None = None
    available: int | None = None
    annotators: list[dict[str, Any]] | None = None


class UserIn(Strict):
    name: str = Field(pattern=NAME_PATTERN, max_length=64)
    role: Literal["annotator", "admin"] = "annotator"


class UserOut(BaseModel):
    name: str
    role: str
    password: str | None = Field(None, description="One-time password, returned only on creation.")


class MeOut(BaseModel):
    name: str
    role: str
    csrf_token: str | None


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

    return MarkdownIt("commonmark", {"html": False}).render(text)


class BodyLimit:
    """ASGI middleware: 413 for a body over the limit (Content-Length or streamed), before any parsing."""

    def __init__(self, app: Any, default: int = MAX_BODY, large: int = MAX_IMPORT_BODY) -> None:
        self.app, self.default, self.large = app, default, large

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.large if scope["path"].endswith("/records") else self.default
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await self._reject(send, limit)
        messages, total = [], 0
        if scope.get("method") not in SAFE_METHODS:
            while True:
                msg = await receive()
                messages.append(msg)
                if msg["type"] != "http.request":
                    break
                total += len(msg.get("body", b""))
                if total > limit:
                    return await self._reject(send, limit)
                if not msg.get("more_body"):
                    break

        async def replay() -> dict:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _reject(send: Any, limit: int) -> None:
        body = json.dumps({"detail": f"request body too large; at most {limit} bytes"}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


# ------------------------------------------------------------------- the app


def create_app(
    db: str | Path | Feedback,
    *,
    secure_cookies: bool = False,
    login_limit: int = 10,
    login_window_s: float = 300.0,
) -> FastAPI:
    """Build the app over a database URL/path (or an open :class:`Feedback`).

    ``secure_cookies`` adds the ``Secure`` flag (serve behind HTTPS); failed logins are limited to
    ``login_limit`` per ``login_window_s`` per user name and ten times that per client address.
    """
    fb = db if isinstance(db, Feedback) else Feedback(db)
    limiter = RateLimiter(login_limit, login_window_s)  # failed logins per user name
    ip_limiter = RateLimiter(10 * login_limit, login_window_s)  # failed logins per client address
    bearer_scheme = HTTPBearer(auto_error=False, description="Token from POST /api/login with bearer=true.")
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    templates = Environment(
        loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"])
    )

    app = FastAPI(
        title="Heed annotation API",
        version="1",
        description="Collect pairwise and ranking preferences. Every page action has a route here.",
    )
    app.state.feedback = fb
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.add_middleware(BodyLimit)

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Any) -> Response:
        response = await call_next(request)
        for k, v in SECURITY_HEADERS.items():
            response.headers.setdefault(k, v)
        return response

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
                                {"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")}
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
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    # ----------------------------------------------------------- sessions

    def session(
        request: Request, creds: HTTPAuthorizationCredentials | None = Depends(bearer_scheme)
    ) -> tuple:
        if creds is not None:
            found = fb.session_user(creds.credentials)
            if found is None or found[2] != "bearer":
                raise ApiError(401, "invalid or expired bearer token", {"WWW-Authenticate": "Bearer"})
            return found[0], None
        token = request.cookies.get(COOKIE)
        found = fb.session_user(token) if token else None
        if found is None or found[2] != "cookie":
            raise ApiError(401, "not logged in")
        user, csrf, _ = found
        if request.method not in SAFE_METHODS and not same_token(request.headers.get("x-csrf-token"), csrf):
            raise ApiError(403, "missing or wrong X-CSRF-Token header")
        return user, csrf

    def current_user(sess: tuple = Depends(session)) -> UserInfo:
        return sess[0]

    def admin_user(user: UserInfo = Depends(current_user)) -> UserInfo:
        if user.role != "admin":
            raise ApiError(403, "admins only")
        return user

    def project_out(name: str) -> ProjectOut:
        p = fb.project(name)
        return ProjectOut(**asdict(p), guidelines_html=render_markdown(p.guidelines))

    # ----------------------------------------------------------- routes: health, auth

    @app.get("/health", tags=["meta"])
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/api/login", response_model=LoginOut, tags=["auth"], responses={401: {}, 429: {}})
    def login(body: LoginIn, request: Request, response: Response) -> LoginOut:
        client = request.client.host if request.client else "?"
        keys = {f"ip:{client}": ip_limiter, f"user:{body.name}": limiter}
        for key, lim in keys.items():
            wait = lim.blocked(key)
            if wait is not None:
                raise ApiError(
                    429,
                    f"too many failed login attempts; try again in {math.ceil(wait)} s",
                    {"Retry-After": str(math.ceil(wait))},
                )
        user = fb.authenticate(body.name, body.password)
        if user is None:
            for key, lim in keys.items():
                lim.hit(key)
            raise ApiError(401, "wrong name or password")
        token, csrf = fb.open_session(user, kind="bearer" if body.bearer else "cookie")
        if body.bearer:
            return LoginOut(user=user.name, role=user.role, csrf_token=csrf, token=token)
        response.set_cookie(
            COOKIE,
            token,
            httponly=True,
            samesite="strict",
            secure=secure_cookies,
            path="/",
            max_age=12 * 3600,
        )
        return LoginOut(user=user.name, role=user.role, csrf_token=csrf)

    @app.post("/api/logout", tags=["auth"], responses={401: {}, 403: {}})
    def logout(
        request: Request,
        response: Response,
        creds: HTTPAuthorizationCredentials | None = Depends(bearer_scheme),
        _: tuple = Depends(session),
    ) -> dict[str, bool]:
        token = creds.credentials if creds is not None else request.cookies.get(COOKIE)
        if token:
            fb.close_session(token)
        response.delete_cookie(COOKIE, path="/")
        return {"ok": True}

    @app.get("/api/me", response_model=MeOut, tags=["auth"], responses={401: {}})
    def me(sess: tuple = Depends(session)) -> MeOut:
        return MeOut(name=sess[0].name, role=sess[0].role, csrf_token=sess[1])

    # ----------------------------------------------------------- routes: annotating

    @app.get("/api/projects", response_model=list[ProjectOut], tags=["annotate"], responses={401: {}})
    def list_projects(user: UserInfo = Depends(current_user)) -> list[ProjectOut]:
        return [project_out(p.name) for p in fb.projects()]

    @app.get(
        "/api/projects/{project}", response_model=ProjectOut, tags=["annotate"], responses={401: {}, 404: {}}
    )
    def get_project(project: ProjectName, user: UserInfo = Depends(current_user)) -> ProjectOut:
        return project_out(project)

    @app.get(
        "/api/projects/{project}/next",
        response_model=AssignmentOut,
        tags=["annotate"],
        responses={401: {}, 404: {}},
    )
    def next_assignment(project: ProjectName, user: UserInfo = Depends(current_user)) -> AssignmentOut:
        a = fb.next_assignment(user, project)
        if a is None:
            return AssignmentOut(done=True)
        return AssignmentOut(
            done=False,
            record_id=a.record_id,
            prompt=a.prompt,
            responses=[ResponseOut(position=i, text=t) for i, t in enumerate(a.responses)],
            expires_at=a.expires_at.isoformat() + "Z",
        )

    @app.post(
        "/api/projects/{project}/annotations",
        response_model=SubmitOut,
        tags=["annotate"],
        responses={400: {}, 401: {}, 403: {}, 404: {}, 409: {}, 413: {}},
    )
    def submit(project: ProjectName, body: SubmitIn, user: UserInfo = Depends(current_user)) -> SubmitOut:
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
        )
        return SubmitOut(annotation_id=r.annotation_id, record_id=r.record_id, duplicate=r.duplicate)

    @app.post(
        "/api/projects/{project}/undo",
        response_model=UndoOut,
        tags=["annotate"],
        responses={401: {}, 403: {}, 404: {}},
    )
    def undo(project: ProjectName, user: UserInfo = Depends(current_user)) -> UndoOut:
        return UndoOut(record_id=fb.undo_last(user, project))

    @app.get(
        "/api/projects/{project}/progress",
        response_model=ProgressOut,
        tags=["annotate"],
        responses={401: {}, 404: {}},
    )
    def my_progress(project: ProjectName, user: UserInfo = Depends(current_user)) -> ProgressOut:
        return ProgressOut(**fb.progress(project, user))

    # ----------------------------------------------------------- routes: admin

    @app.post(
        "/api/admin/projects",
        response_model=ProjectOut,
        status_code=201,
        tags=["admin"],
        responses={401: {}, 403: {}, 409: {}},
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
        )
        return project_out(body.name)

    @app.post(
        "/api/admin/projects/{project}/records",
        response_model=CountOut,
        tags=["admin"],
        responses={401: {}, 403: {}, 404: {}, 413: {}},
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
        format: Literal["pairs", "ranked"] = "pairs",
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
            path = write_rows(rows, Path(tmp) / name, "parquet") if rows else None
            data = path.read_bytes() if path else _empty_parquet()
        return Response(data, media_type="application/vnd.apache.parquet", headers=headers)

    @app.get("/api/admin/users", response_model=list[UserOut], tags=["admin"], responses={401: {}, 403: {}})
    def users(user: UserInfo = Depends(admin_user)) -> list[UserOut]:
        return [UserOut(name=u.name, role=u.role) for u in fb.users()]

    @app.post(
        "/api/admin/users",
        response_model=UserOut,
        status_code=201,
        tags=["admin"],
        responses={401: {}, 403: {}, 409: {}},
    )
    def add_user(body: UserIn, user: UserInfo = Depends(admin_user)) -> UserOut:
        info, password = fb.add_user(body.name, body.role)
        return UserOut(name=info.name, role=info.role, password=password)

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
        token = request.cookies.get(COOKIE)
        found = fb.session_user(token) if token else None
        return found[0] if found and found[2] == "cookie" else None

    @app.get("/login", response_class=HTMLResponse, include_in_schema=False)
    def login_page(request: Request) -> HTMLResponse:
        return page(request, "login.html", user=None)

    @app.get("/", include_in_schema=False)
    def home(request: Request) -> Response:
        user = page_user(request)
        if user is None:
            return RedirectResponse("/login", status_code=303)
        return page(request, "projects.html", user=user)

    @app.get("/annotate/{project}", include_in_schema=False)
    def annotate_page(request: Request, project: ProjectName) -> Response:
        user = page_user(request)
        if user is None:
            return RedirectResponse("/login", status_code=303)
        return page(request, "annotate.html", user=user, project=project)

    @app.get("/admin", include_in_schema=False)
    def admin_page(request: Request) -> Response:
        user = page_user(request)
        if user is None:
            return RedirectResponse("/login", status_code=303)
        if user.role != "admin":
            raise ApiError(403, "admins only")
        return page(request, "admin.html", user=user)

    return app


def _empty_parquet() -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table({}), buf)
    return buf.getvalue()


def serve(db: str | Path, host: str = "127.0.0.1", port: int = 8000, **kwargs: Any) -> None:
    """Run the app with uvicorn (one process; SQLite/PostgreSQL handle concurrency)."""
    import uvicorn

    uvicorn.run(create_app(db, **kwargs), host=host, port=port, log_level="warning", access_log=False)


__all__ = ["create_app", "serve"]

"""The console's endpoints: pages (Jinja2, server-rendered), the JSON API, login / logout, operator actions.

Every endpoint but ``/health``, ``/ready``, the login form, the static stylesheet / script and (with
``metrics_public``) ``/metrics`` first calls :meth:`Console.who`, which raises :class:`AuthRequired` (401: a page
answers with the login form, the API with JSON and ``WWW-Authenticate``) or :class:`Forbidden` (403). Actions
(POST) also pass :meth:`Console.check_post`: the request must come from this origin (``Origin`` / ``Referer``),
and a login session must post its CSRF token back.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import secrets
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response

from node import audit
from node.http import data
from node.http.auth import Authenticator, Principal, same_token

log = logging.getLogger("recon-node.http")

HERE = Path(__file__).resolve().parent
COOKIE = "recon_node_session"
MAX_FORM_BYTES = 16 * 1024


class AuthRequired(Exception):
    def __init__(self, message: str = "sign in to see this page") -> None:
        super().__init__(message)
        self.message = message


class Forbidden(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def is_api(request: Request) -> bool:
    return request.url.path.startswith("/api/")


def client_ip(request: Request) -> str:
    return request.client.host if request.client else "?"


def _json(obj: Any, status: int = 200) -> Response:
    return Response(json.dumps(obj, default=str), status_code=status, media_type="application/json")


class Console:
    """The console's state (the node's service, who is logged in, rendered previews) and its endpoints."""

    def __init__(self, service: Any) -> None:
        self.service = service
        self.cfg = service.cfg
        settings = service.cfg.node.http
        assert settings is not None
        self.settings = settings
        self.auth = Authenticator(settings)
        self.tls = bool(settings.tls)
        self.previews = data.PreviewCache()
        self._flash: dict[str, tuple[float, str, str]] = {}  # id -> (expires, kind, text)
        self._flash_lock = threading.Lock()
        self.env = Environment(
            loader=FileSystemLoader(str(HERE / "templates")),
            autoescape=select_autoescape(["html"]),
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.globals.update(
            node_name=self.cfg.node.ae_title, age=data.age_text, local_time=data.local_time, urlencode=urlencode
        )

    # ---- who is asking ---------------------------------------------------------------------------------------
    async def who(self, request: Request, role: str = "viewer") -> Principal:
        """The authenticated caller (session cookie, ``Authorization: Basic`` or ``Bearer``) with at least ``role``."""
        p = await self._principal(request)
        if p is None:
            raise AuthRequired()
        if not p.can(role):
            audit.event(
                "http.forbidden",
                "refused",
                user=p.name,
                role=p.role,
                actor_ip=client_ip(request),
                path=request.url.path,
                method=request.method,
            )
            raise Forbidden(f"{p.name} is a {p.role}; this needs the {role} role")
        return p

    async def _principal(self, request: Request) -> Principal | None:
        header = request.headers.get("authorization", "")
        scheme, _, cred = header.partition(" ")
        ip = client_ip(request)
        if scheme.lower() == "bearer" and cred.strip():
            p = self.auth.check_token(cred.strip())
            if p is None:
                self._refused(request, "bearer", None)
                raise AuthRequired("the token is not valid")
            return p
        if scheme.lower() == "basic" and cred.strip():
            wait = self.auth.blocked_for(ip)
            if wait:
                raise BadRequest(f"too many failed logins from {ip}; try again in {wait / 60:.0f} min", 429)
            try:
                name, sep, password = base64.b64decode(cred.strip(), validate=True).decode("utf-8").partition(":")
            except (binascii.Error, UnicodeDecodeError):
                name, sep, password = "", "", ""
            p = await run_in_threadpool(self.auth.check_password, name, password) if sep else None
            if p is None:
                self._refused(request, "basic", name)
                raise AuthRequired("wrong user name or password")
            return p
        sid = request.cookies.get(COOKIE)
        return self.auth.session(sid) if sid else None

    def _refused(self, request: Request, how: str, name: str | None) -> None:
        ip = client_ip(request)
        self.auth.note_failure(ip)
        audit.event(
            "http.login",
            "refused",
            method=how,
            user=(name or "")[:64] or None,
            actor_ip=ip,
            path=request.url.path,
            reason="wrong user name or password" if how != "bearer" else "unknown token",
        )
        log.warning("console: refused %s credentials from %s", how, ip)

    def check_post(self, request: Request, p: Principal, form: dict[str, str]) -> None:
        """CSRF defence for actions: same origin, and a session's token posted back."""
        host = request.headers.get("host", "")
        origin = request.headers.get("origin") or request.headers.get("referer")
        if origin is not None:
            parts = urlsplit(origin)
            if origin == "null" or parts.netloc != host:
                raise Forbidden("this action must be sent from the console's own pages (cross-site request refused)")
        if p.via == "session" and not same_token(form.get("csrf"), p.csrf):
            raise Forbidden("the form has expired or did not come from the console; reload the page and try again")

    async def form(self, request: Request) -> dict[str, str]:
        body = b""
        async for chunk in request.stream():  # never more than the limit in memory
            body += chunk
            if len(body) > MAX_FORM_BYTES:
                raise BadRequest("form too large", 413)
        try:
            parsed = parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=32)
        except (UnicodeDecodeError, ValueError):
            raise BadRequest("cannot read the form") from None
        return {k: v[0] for k, v in parsed.items()}

    # ---- rendering -------------------------------------------------------------------------------------------
    def page(self, name: str, user: Principal | None, status: int = 200, **ctx: Any) -> HTMLResponse:
        html = self.env.get_template(name).render(user=user, **ctx)
        return HTMLResponse(html, status_code=status, headers={"Cache-Control": "no-store"})

    def flash(self, kind: str, text: str) -> str:
        fid = secrets.token_urlsafe(12)
        now = time.monotonic()
        with self._flash_lock:
            for k in [k for k, v in self._flash.items() if v[0] < now]:
                del self._flash[k]
            self._flash[fid] = (now + 300, kind, text)
        return fid

    def take_flash(self, request: Request) -> tuple[str, str] | None:
        fid = request.query_params.get("flash")
        if not fid:
            return None
        with self._flash_lock:
            v = self._flash.pop(fid, None)
        return (v[1], v[2]) if v else None

    def login_page(self, request: Request, message: str | None = None, status: int = 401) -> HTMLResponse:
        nxt = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        if request.url.path in ("/login", "/logout"):
            nxt = "/jobs"
        resp = self.page("login.html", None, status=status, title="Sign in", message=message, next=nxt)
        resp.headers["WWW-Authenticate"] = 'Bearer realm="recon-node"'  # no browser basic-auth pop-up on pages
        return resp

    # ---- exception handlers ----------------------------------------------------------------------------------
    async def on_auth_required(self, request: Request, exc: Exception) -> Response:
        msg = getattr(exc, "message", "authentication required")
        if is_api(request) or request.url.path == "/metrics":
            return JSONResponse(
                {"error": msg},
                status_code=401,
                headers={"WWW-Authenticate": 'Basic realm="recon-node", charset="UTF-8"'},
            )
        return self.login_page(request, None if msg == "sign in to see this page" else msg)

    async def on_forbidden(self, request: Request, exc: Exception) -> Response:
        msg = getattr(exc, "message", "forbidden")
        if is_api(request):
            return JSONResponse({"error": msg}, status_code=403)
        user = await self._principal_quiet(request)
        return self.page("error.html", user, status=403, title="Not allowed", message=msg)

    async def on_bad_request(self, request: Request, exc: Exception) -> Response:
        msg, status = getattr(exc, "message", "bad request"), getattr(exc, "status", 400)
        if is_api(request):
            return JSONResponse({"error": msg}, status_code=status)
        user = await self._principal_quiet(request)
        return self.page("error.html", user, status=status, title="Cannot do that", message=msg)

    async def _principal_quiet(self, request: Request) -> Principal | None:
        try:
            return await self._principal(request)
        except (AuthRequired, BadRequest):
            return None

    # ---- unauthenticated -------------------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(self, request: Request) -> Response:
        try:
            from node import metrics
        except ImportError:
            return JSONResponse({"error": "readiness is not available in this version"}, status_code=503)
        ok, detail = await run_in_threadpool(metrics.readiness, self.service)
        return _json(detail, 200 if ok else 503)

    async def metrics(self, request: Request) -> Response:
        if not self.settings.metrics_public:
            await self.who(request)
        try:
            from node import metrics
        except ImportError:
            return PlainTextResponse("metrics are not available in this version\n", status_code=503)
        body, content_type = await run_in_threadpool(metrics.render)
        return Response(body, media_type=content_type, headers={"Cache-Control": "no-store"})

    async def login_form(self, request: Request) -> Response:
        if await self._principal_quiet(request) is not None:
            return RedirectResponse("/jobs", status_code=303)
        return self.login_page(request, status=200)

    async def login(self, request: Request) -> Response:
        form = await self.form(request)
        ip = client_ip(request)
        origin = request.headers.get("origin")
        if origin is not None and urlsplit(origin).netloc != request.headers.get("host", ""):
            raise Forbidden("sign in from the console's own login page")
        nxt = form.get("next") or "/jobs"
        if not nxt.startswith("/") or nxt.startswith("//") or "\\" in nxt:
            nxt = "/jobs"
        wait = self.auth.blocked_for(ip)
        if wait:
            return self.page(
                "login.html",
                None,
                status=429,
                title="Sign in",
                message=f"Too many failed logins from {ip}; try again in {max(1.0, wait / 60):.0f} min.",
                next=nxt,
            )
        name = form.get("user", "")
        p = await run_in_threadpool(self.auth.check_password, name, form.get("password", ""))
        if p is None:
            self._refused(request, "form", name)
            return self.page(
                "login.html", None, status=401, title="Sign in", message="Wrong user name or password.", next=nxt
            )
        s = self.auth.open_session(p)
        audit.event("http.login", "success", method="form", user=p.name, role=p.role, actor_ip=ip)
        resp = RedirectResponse(nxt, status_code=303)
        resp.set_cookie(
            COOKIE,
            s.session or "",
            max_age=int(self.settings.session_hours * 3600),
            httponly=True,
            secure=self.tls,
            samesite="strict",
            path="/",
        )
        return resp

    async def logout(self, request: Request) -> Response:
        p = await self.who(request)
        self.check_post(request, p, await self.form(request))
        if p.session:
            self.auth.close_session(p.session)
        audit.event("http.logout", user=p.name, actor_ip=client_ip(request))
        resp = RedirectResponse("/login", status_code=303)
        resp.delete_cookie(COOKIE, path="/")
        return resp

    # ---- pages -----------------------------------------------------------------------------------------------
    async def root(self, request: Request) -> Response:
        await self.who(request)
        return RedirectResponse("/jobs", status_code=303)

    def _filter(self, request: Request) -> data.JobFilter:
        try:
            return data.JobFilter.parse(dict(request.query_params))
        except ValueError as e:
            raise BadRequest(str(e)) from None

    def _job(self, job_id: str) -> Any:
        job = self.service.store.get(job_id)
        if job is None:
            raise BadRequest(f"no job {job_id!r}", 404)
        return job

    async def jobs_page(self, request: Request) -> Response:
        user = await self.who(request)
        f = self._filter(request)
        view = await run_in_threadpool(data.jobs_view, self.service, f)
        jobs = list(reversed(view["jobs"]))  # newest first on the page
        sources = sorted({s.name for s in self.cfg.sources} | {j["source"] for j in jobs if j["source"]})
        routes = [r.name for r in self.cfg.routes]
        return self.page(
            "jobs.html",
            user,
            title="Jobs",
            nav="jobs",
            view=view,
            jobs=jobs,
            f=f,
            states=list(view["counts"]),
            sources=sources,
            routes=routes,
            show_ran_on=any(j.get("ran_on") for j in jobs),
            refresh=True,
        )

    async def job_page(self, request: Request) -> Response:
        user = await self.who(request)
        job = self._job(request.path_params["job_id"])
        view = await run_in_threadpool(data.job_view, self.service, job)
        return self.page(
            "job.html",
            user,
            title=f"Job {job.id}",
            nav="jobs",
            v=view,
            j=view["job"],
            flash=self.take_flash(request),
            refresh=job.state in ("queued", "running") or (view["job"]["egress"] or {}).get("pending", 0) > 0,
        )

    async def preview(self, request: Request) -> Response:
        await self.who(request)
        job = self._job(request.path_params["job_id"])
        png = await run_in_threadpool(
            data.render_preview, self.service, job, request.path_params["kind"], self.previews
        )
        if png is None:
            raise BadRequest("no such preview", 404)
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=300"})

    async def peers_page(self, request: Request) -> Response:
        user = await self.who(request)
        view = await run_in_threadpool(data.peers_view, self.service)
        return self.page("peers.html", user, title="Sources and destinations", nav="peers", v=view, refresh=True)

    # ---- actions ---------------------------------------------------------------------------------------------
    async def _act(self, request: Request, action: str) -> tuple[Principal, str, str]:
        """Run ``retry`` / ``resend`` on the path's job for an operator; returns (who, kind, message)."""
        from node.operations import JobNotFound, resend_job, retry_job

        p = await self.who(request, "operator")
        form = await self.form(request)
        self.check_post(request, p, form)
        job_id = request.path_params["job_id"]
        who = {"actor_ip": client_ip(request), "via": f"console ({p.via})"}
        svc = self.service
        try:
            if action == "retry":
                res = await run_in_threadpool(
                    lambda: retry_job(
                        self.cfg, svc.store, job_id, force=form.get("force") == "1", actor=p.name, who=who
                    )
                )
                svc.worker.submit(res.job)
                return p, "ok", res.message()
            rs = await run_in_threadpool(
                lambda: resend_job(self.cfg, svc.store, svc.egress.outbox, job_id, actor=p.name, who=who)
            )
            svc.egress.sender.wake()
            return p, "ok", rs.message()
        except JobNotFound as e:
            raise BadRequest(str(e), 404) from None
        except ValueError as e:
            return p, "error", str(e)

    async def action_page(self, request: Request) -> Response:
        action = request.path_params["action"]
        if action not in ("retry", "resend"):
            raise BadRequest("unknown action", 404)
        _, kind, msg = await self._act(request, action)
        job_id = request.path_params["job_id"]
        return RedirectResponse(f"/jobs/{job_id}?flash={self.flash(kind, msg)}", status_code=303)

    async def action_api(self, request: Request) -> Response:
        action = request.path_params["action"]
        if action not in ("retry", "resend"):
            raise BadRequest("unknown action", 404)
        _, kind, msg = await self._act(request, action)
        return JSONResponse({"ok": kind == "ok", "message": msg}, status_code=200 if kind == "ok" else 409)

    # ---- API -------------------------------------------------------------------------------------------------
    async def api_jobs(self, request: Request) -> Response:
        await self.who(request)
        f = self._filter(request)
        if "limit" not in request.query_params:
            f.limit = 0  # the API, like `recon-node status`, lists every job unless asked for fewer
        return _json(await run_in_threadpool(data.jobs_view, self.service, f))

    async def api_job(self, request: Request) -> Response:
        await self.who(request)
        job = self._job(request.path_params["job_id"])
        return _json(await run_in_threadpool(data.job_view, self.service, job))

    async def api_peers(self, request: Request) -> Response:
        await self.who(request)
        return _json(await run_in_threadpool(data.peers_view, self.service))

"""The dashboard shell: Flask server with Flask-Login, Dash Pages, navigation.

Every route needs a session: Dash internals (``/_dash-*``) answer 401 without one,
anything else redirects to the login page. Who may see what is decided in
:mod:`dashboard.access`, applied by :mod:`dashboard.data`.

Hardening (issue #9): failed sign-ins are throttled per username and per client address
(:class:`LoginThrottle`); in production the app refuses to start without its own secret
key (:func:`flask_config`); an unhandled error shows a generic page with a reference
and is logged without its message (which may hold SQL and identifiers); access-log
lines have episode ids in ``/client/...`` paths redacted (:class:`RedactClientPaths`).
"""

from __future__ import annotations

import hashlib
import hmac
import html as html_lib
import logging
import math
import re
import secrets
import threading
import time
import traceback
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any

import dash
import dash_bootstrap_components as dbc
import flask
import flask_login
import sqlalchemy as sa
from dash import dcc, html
from werkzeug.exceptions import HTTPException
from werkzeug.middleware.proxy_fix import ProxyFix

from dashboard.access import may_export, may_see_clients, may_see_service
from dashboard.data import DataAccess
from dashboard.session import LoginUser, current_viewer
from pipeline.config import Settings
from pipeline.errors import ConfigError
from pipeline.scales import load_registry
from pipeline.store import Store, login_failures, utcnow
from pipeline.users import audit, authenticate, get_user, username_exists

__all__ = ["DEMO_SECRET", "MIN_SECRET_CHARS", "THROTTLE_KEY", "LoginThrottle",
           "RedactClientPaths", "StoreThrottle", "create_app", "flask_config", "redact_paths"]

log = logging.getLogger("ontrack.dashboard")
DEMO_SECRET = "ontrack-demo-secret-do-not-use-in-production"
#: Shortest secret key accepted in production (characters).
MIN_SECRET_CHARS = 32
# Only the sign-in page is public; even /favicon.ico would otherwise be served the app
# shell by Dash's catch-all route.
_PUBLIC = ("/login",)
#: Where the app's :class:`LoginThrottle` lives (``server.config``).
THROTTLE_KEY = "ONTRACK_LOGIN_THROTTLE"


def flask_config(settings: Settings) -> dict[str, Any]:
    """The Flask settings of the dashboard: its secret key and the session cookie flags.

    Raises :class:`ConfigError` in production (``environment = "production"``) when the
    secret key is unset, is the demo key or has fewer than :data:`MIN_SECRET_CHARS`
    characters; in development a missing key falls back to the demo key with a warning.
    Called before anything else is built, so ``ontrack serve`` fails at once.
    """
    production = settings.environment == "production"
    secret = settings.secret_key
    if production and (not secret or secret == DEMO_SECRET or len(secret) < MIN_SECRET_CHARS):
        why = ("is not set" if not secret else "is the public demo key"
               if secret == DEMO_SECRET else f"has fewer than {MIN_SECRET_CHARS} characters")
        # Never the key itself in the message.
        raise ConfigError(
            f"the dashboard will not start in production: the secret key {why}. Set "
            f"ONTRACK_SECRET_KEY in the environment to a random string of at least "
            f"{MIN_SECRET_CHARS} characters, e.g. the output of python -c \"import secrets; "
            f"print(secrets.token_urlsafe(48))\" (or set ONTRACK_ENVIRONMENT=development "
            f"for a local demo)")
    if not secret:
        log.warning("ONTRACK_SECRET_KEY is not set: using the demo key (never in production)")
        secret = DEMO_SECRET
    return {"SECRET_KEY": secret, "SESSION_COOKIE_HTTPONLY": True,
            "SESSION_COOKIE_SAMESITE": "Lax",
            # Production is served over HTTPS (behind a proxy): never send the session
            # cookie in clear text.
            "SESSION_COOKIE_SECURE": production, "REMEMBER_COOKIE_SECURE": production,
            "REMEMBER_COOKIE_HTTPONLY": True,
            # Errors go to our handler (generic page), never propagate to a debugger.
            "PROPAGATE_EXCEPTIONS": False}


class LoginThrottle:
    """Sliding-window count of failed sign-ins per key (``user:<name>``, ``addr:<ip>``).

    A sign-in is refused while any of its keys has ``max_failures`` failures within the
    last ``window_seconds``; refused attempts are not counted (the window then passes)
    and a successful sign-in resets nothing, so no one can clear a counter by signing in.

    This base class counts in process memory (bounded: at most ``max_failures``
    timestamps per key and ``max_keys`` keys); the app uses :class:`StoreThrottle`, which
    keeps the counts in the store so that several worker processes share one limit.
    Refused attempts write nothing, so a flood of guesses cannot fill the store.
    """

    def __init__(self, max_failures: int = 5, window_seconds: float = 60.0,
                 clock: Callable[[], float] = time.monotonic, max_keys: int = 50_000) -> None:
        self.max_failures = max_failures
        self.window = window_seconds
        self._clock = clock
        self._max_keys = max_keys
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._reported: dict[str, float] = {}
        self._lock = threading.Lock()

    @staticmethod
    def keys(username: str, address: str | None) -> tuple[str, str]:
        """The counters one attempt touches (usernames compared case-insensitively)."""
        return f"user:{username.strip().casefold()[:200]}", f"addr:{address or 'unknown'}"

    def retry_after(self, keys: Iterable[str]) -> float:
        """Seconds until an attempt with these keys is allowed (0.0: allowed now)."""
        now = self._clock()
        wait = 0.0
        with self._lock:
            for key in keys:
                times = self._failures.get(key)
                if times is not None and len(times) >= self.max_failures:
                    wait = max(wait, times[0] + self.window - now)
        return max(wait, 0.0)

    def record_failure(self, keys: Iterable[str]) -> None:
        now = self._clock()
        with self._lock:
            for key in keys:
                times = self._failures.pop(key, None) or deque(maxlen=self.max_failures)
                times.append(now)
                self._failures[key] = times  # most recently failed last
            if len(self._failures) > self._max_keys:
                self._prune(now)

    def first_refusal(self, keys: Iterable[str]) -> bool:
        """True once per key and window: refusals are audited, not every one of a flood."""
        now = self._clock()
        first = False
        with self._lock:
            for key in keys:
                if now - self._reported.get(key, -math.inf) >= self.window:
                    self._reported[key] = now
                    first = True
            if len(self._reported) > self._max_keys:
                self._reported = {k: t for k, t in self._reported.items()
                                  if now - t < self.window}
        return first

    def reset(self) -> None:
        with self._lock:
            self._failures.clear()
            self._reported.clear()

    def _prune(self, now: float) -> None:
        for key in [k for k, t in self._failures.items() if now - t[-1] >= self.window]:
            del self._failures[key]
        while len(self._failures) > self._max_keys:
            self._failures.popitem(last=False)


class StoreThrottle(LoginThrottle):
    """:class:`LoginThrottle` whose failure counts live in the store (``login_failures``),
    so the limit holds across all worker processes of a production server (gunicorn with
    several workers) and across restarts. Keys are stored as HMAC-SHA-256 under the app's
    secret key; only the de-duplication of audit entries stays per process.
    """

    def __init__(self, store: Store, secret: str, max_failures: int = 5,
                 window_seconds: float = 60.0) -> None:
        super().__init__(max_failures, window_seconds)
        self.store = store
        self._secret = secret.encode()

    def _hash(self, key: str) -> str:
        return hmac.new(self._secret, key.encode(), hashlib.sha256).hexdigest()

    def retry_after(self, keys: Iterable[str]) -> float:
        now = utcnow()
        hashes = [self._hash(k) for k in keys]
        since = now - timedelta(seconds=self.window)
        with self.store.engine.connect() as conn:
            rows = conn.execute(sa.select(login_failures.c.key_hash, login_failures.c.at)
                                .where(login_failures.c.key_hash.in_(hashes)
                                       & (login_failures.c.at > since))
                                .order_by(login_failures.c.at.desc())).all()
        wait = 0.0
        for h in hashes:
            times = [at for key, at in rows if key == h][: self.max_failures]
            if len(times) >= self.max_failures:
                wait = max(wait, (times[-1] + timedelta(seconds=self.window) - now)
                           .total_seconds())
        return max(wait, 0.0)

    def record_failure(self, keys: Iterable[str]) -> None:
        now = utcnow()
        with self.store.transaction() as conn:
            conn.execute(login_failures.insert(),
                         [{"key_hash": self._hash(k), "at": now} for k in keys])
            conn.execute(login_failures.delete().where(
                login_failures.c.at < now - timedelta(seconds=self.window)))

    def reset(self) -> None:
        super().reset()
        with self.store.transaction() as conn:
            conn.execute(login_failures.delete())


def _throttled_message(wait: float) -> str:
    span = "a minute" if wait <= 60 else f"{math.ceil(wait / 60)} minutes"
    return f"Too many failed sign-ins; wait {span} and try again."


_CLIENT_PATH = re.compile(r"((?:/|%2F)client(?:/|%2F))[^\s?&#\"']+", re.IGNORECASE)


def redact_paths(text: str) -> str:
    """``/client/<episode id>`` (also URL-encoded, as in ``?next=``) without the id."""
    return _CLIENT_PATH.sub(r"\1<episode>", text)


class RedactClientPaths(logging.Filter):
    """Access-log lines carry the URL; a client page's URL carries an episode id."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact_paths(message)
        if redacted != message:
            record.msg, record.args = redacted, ()
        return True


_ERROR_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>OnTrack: something went wrong</title></head>
<body style="font-family:system-ui,sans-serif;margin:3rem"><h1>Something went wrong</h1>
<p>The request could not be completed. Please try again; if it keeps happening, tell
your administrator the reference <strong>{ref}</strong>.</p><p><a href="/">Back to
OnTrack</a></p></body></html>"""


def _wire_errors(server: flask.Flask) -> None:
    @server.errorhandler(Exception)
    def unhandled(exc: Exception) -> Any:
        if isinstance(exc, HTTPException):
            return exc  # 404, 405, ...: Werkzeug's generic pages
        ref = secrets.token_hex(4)
        rule = flask.request.url_rule.rule if flask.request.url_rule else "-"
        chain, seen, e = [], set(), exc
        while e is not None and id(e) not in seen:
            seen.add(id(e))
            chain.append(f"{type(e).__module__}.{type(e).__qualname__}")
            e = e.__cause__ or e.__context__  # type: ignore[assignment]
        frames = "".join(f"\n  {f.filename}:{f.lineno} in {f.name}"
                         for f in traceback.extract_tb(exc.__traceback__))
        # The exception's message and the URL are left out on purpose: database errors
        # carry SQL and parameters (identifiers), a client page's path an episode id.
        log.error("unhandled error %s on %s %s: %s%s", ref, flask.request.method, rule,
                  " <- ".join(chain), frames)
        if flask.request.path.startswith("/_dash-"):
            return flask.Response(f"Internal error (reference {ref}).", status=500,
                                  mimetype="text/plain")
        return flask.Response(_ERROR_PAGE.format(ref=ref), status=500, mimetype="text/html")


_LOGIN_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>OnTrack: sign in</title><meta name="viewport" content="width=device-width">
<link rel="icon" href="data:,">
<style>body{{font-family:system-ui,sans-serif;background:#f4f6f8;display:flex;
justify-content:center;align-items:center;height:100vh;margin:0}}
form{{background:#fff;padding:2rem 2.5rem;border-radius:8px;box-shadow:0 2px 8px #0002;
width:320px}}h1{{font-size:1.4rem;margin:0 0 .3rem}}p.sub{{color:#555;margin:0 0 1.2rem}}
label{{display:block;margin:.6rem 0 .2rem}}input{{width:100%;padding:.5rem;box-sizing:border-box}}
button{{margin-top:1.2rem;width:100%;padding:.6rem;background:#0d47a1;color:#fff;border:0;
border-radius:4px;font-size:1rem}}.err{{color:#b71c1c;margin-top:.8rem}}</style></head>
<body><form method="post" action="/login"><h1>OnTrack</h1>
<p class="sub">Outcome monitoring for psychological therapy</p>
<input type="hidden" name="csrf" value="{csrf}"><input type="hidden" name="next" value="{next}">
<label for="username">Username</label><input id="username" name="username" autocomplete="username" required>
<label for="password">Password</label><input id="password" name="password" type="password" autocomplete="current-password" required>
<button type="submit">Sign in</button>{error}</form></body></html>"""


def _login_page(error: str = "", next_url: str = "/") -> str:
    # One token per session until it is used: a second GET of the login page (say the
    # browser's own favicon request, redirected here) must not void the form shown.
    token = flask.session.get("csrf") or secrets.token_urlsafe(24)
    flask.session["csrf"] = token
    err = f'<p class="err" role="alert">{html_lib.escape(error)}</p>' if error else ""
    return _LOGIN_PAGE.format(csrf=token, next=html_lib.escape(next_url, quote=True),
                              error=err)


def _safe_next(target: str | None) -> str:
    # Only local paths: never redirect to another site after login.
    if not target or not target.startswith("/") or target.startswith("//"):
        return "/"
    return target


def _wire_auth(server: flask.Flask, store: Store, throttle: LoginThrottle) -> None:
    manager = flask_login.LoginManager()
    manager.init_app(server)

    @manager.user_loader
    def load(user_id: str) -> LoginUser | None:
        user = get_user(store, int(user_id)) if user_id.isdigit() else None
        return LoginUser(user) if user else None

    @server.before_request
    def require_login() -> Any:
        path = flask.request.path
        if path in _PUBLIC or flask_login.current_user.is_authenticated:
            return None
        # Dash internals and the browser's own favicon request: a plain 401, no redirect
        # (a redirect would only send the browser to the login page behind the user's back).
        if path.startswith(("/_dash-", "/_reload-hash", "/_favicon")) or path == "/favicon.ico":
            return flask.Response("authentication required", status=401)
        return flask.redirect(f"/login?next={flask.request.full_path.rstrip('?')}")

    @server.route("/login", methods=["GET", "POST"])
    def login() -> Any:
        if flask.request.method == "GET":
            return _login_page(next_url=_safe_next(flask.request.args.get("next")))
        form = flask.request.form
        next_url = _safe_next(form.get("next"))
        username = form.get("username", "")
        address = flask.request.remote_addr or "unknown"
        keys = throttle.keys(username, address)
        wait = throttle.retry_after(keys)
        if wait > 0:
            # Checked before the password: the right password does not help either.
            if throttle.first_refusal(keys):
                log.warning("sign-in refused: too many failed sign-ins")
                audit(store, _audit_name(username), "login_throttled", f"address {address}")
            response = flask.make_response(_login_page(_throttled_message(wait), next_url),
                                           429)
            response.headers["Retry-After"] = str(math.ceil(wait))
            return response
        if not form.get("csrf") or form.get("csrf") != flask.session.pop("csrf", None):
            return _login_page("Your session expired; please sign in again.", next_url), 400
        user = authenticate(store, username, form.get("password", ""))
        if user is None:
            throttle.record_failure(keys)
            # The process log names no one; the audit log has the (real) username.
            log.info("failed sign-in")
            audit(store, _audit_name(username), "login_failed", f"address {address}")
            return _login_page("Unknown username or wrong password.", next_url), 401
        flask.session.clear()
        flask_login.login_user(LoginUser(user))
        audit(store, user.username, "login")
        return flask.redirect(next_url)

    def _audit_name(username: str) -> str:
        # Whatever was typed may be a password or junk: only real usernames are stored.
        return username if username and username_exists(store, username) else "(unknown)"

    @server.route("/logout")
    def logout() -> Any:
        if flask_login.current_user.is_authenticated:
            audit(store, flask_login.current_user.user.username, "logout")
        flask_login.logout_user()
        flask.session.clear()
        return flask.redirect("/login")


def _navbar() -> Any:
    viewer = current_viewer()
    links = []
    if viewer is not None and may_see_clients(viewer):
        links.append(dbc.NavItem(dbc.NavLink("Caseload", href="/", active="exact")))
    if viewer is not None and may_see_service(viewer):
        links += [dbc.NavItem(dbc.NavLink("Service outcomes", href="/service",
                                          active="exact")),
                  dbc.NavItem(dbc.NavLink("Data quality", href="/quality", active="exact"))]
    if viewer is not None and may_export(viewer):
        links.append(dbc.NavItem(dbc.NavLink("Research export", href="/export",
                                             active="exact")))
    who = f"{viewer.username} ({viewer.role})" if viewer else ""
    links.append(dbc.NavItem(dbc.NavLink(f"Sign out {who}", href="/logout", external_link=True,
                                         id="nav-logout")))
    return dbc.NavbarSimple(children=links, brand="OnTrack", brand_href="/", color="primary",
                            dark=True, fluid=True)


def create_app(settings: Settings, store: Store | None = None) -> dash.Dash:
    """Build the Dash app (its Flask server is ``app.server``).

    Raises :class:`ConfigError` before touching the store when the settings are unfit for
    production (see :func:`flask_config`).
    """
    config = flask_config(settings)
    store = store or Store(settings.resolved_database_url)
    store.init()
    app = dash.Dash(__name__, use_pages=True, pages_folder="",
                    # Bootstrap 5.3.3 CSS is vendored in dashboard/assets: no CDN at run time.
                    title="OnTrack",
                    suppress_callback_exceptions=True)
    server: flask.Flask = app.server
    throttle = StoreThrottle(store, config["SECRET_KEY"], settings.login_max_failures,
                             settings.login_window_seconds)
    server.config.update(config, ONTRACK_DATA=DataAccess(store, settings, load_registry()),
                         ONTRACK_STORE=store)
    server.config[THROTTLE_KEY] = throttle
    if settings.proxy_hops:
        # The client address (for throttling) from X-Forwarded-For of trusted proxies only.
        server.wsgi_app = ProxyFix(  # type: ignore[method-assign]
            server.wsgi_app, x_for=settings.proxy_hops, x_proto=settings.proxy_hops)
    access_log = logging.getLogger("werkzeug")
    if not any(isinstance(f, RedactClientPaths) for f in access_log.filters):
        access_log.addFilter(RedactClientPaths())
    _wire_errors(server)
    _wire_auth(server, store, throttle)
    from dashboard.pages import (  # noqa: F401  registers the pages
        caseload,
        client,
        export,
        quality,
        service,
    )

    app.layout = lambda: html.Div([
        dcc.Location(id="url"), _navbar(),
        dbc.Container(dash.page_container, fluid=True, className="py-3")])
    return app

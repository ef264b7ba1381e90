"""The dashboard shell: Flask server with Flask-Login, Dash Pages, navigation.

Every route needs a session: Dash internals (``/_dash-*``) answer 401 without one,
anything else redirects to the login page. Who may see what is decided in
:mod:`dashboard.access`, applied by :mod:`dashboard.data`.
"""

from __future__ import annotations

import html as html_lib
import logging
import secrets
from typing import Any

import dash
import dash_bootstrap_components as dbc
import flask
import flask_login
from dash import dcc, html

from dashboard.access import may_export, may_see_clients, may_see_service
from dashboard.data import DataAccess
from dashboard.session import LoginUser, current_viewer
from pipeline.config import Settings
from pipeline.scales import load_registry
from pipeline.store import Store
from pipeline.users import audit, authenticate, get_user

__all__ = ["DEMO_SECRET", "create_app"]

log = logging.getLogger("ontrack.dashboard")
DEMO_SECRET = "ontrack-demo-secret-do-not-use-in-production"
_PUBLIC = ("/login", "/favicon.ico")


_LOGIN_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>OnTrack: sign in</title><meta name="viewport" content="width=device-width">
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
    token = secrets.token_urlsafe(24)
    flask.session["csrf"] = token
    err = f'<p class="err" role="alert">{html_lib.escape(error)}</p>' if error else ""
    return _LOGIN_PAGE.format(csrf=token, next=html_lib.escape(next_url, quote=True),
                              error=err)


def _safe_next(target: str | None) -> str:
    # Only local paths: never redirect to another site after login.
    if not target or not target.startswith("/") or target.startswith("//"):
        return "/"
    return target


def _wire_auth(server: flask.Flask, store: Store) -> None:
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
        if path.startswith("/_dash-") or path.startswith("/_reload-hash"):
            return flask.Response("authentication required", status=401)
        return flask.redirect(f"/login?next={flask.request.full_path.rstrip('?')}")

    @server.route("/login", methods=["GET", "POST"])
    def login() -> Any:
        if flask.request.method == "GET":
            return _login_page(next_url=_safe_next(flask.request.args.get("next")))
        form = flask.request.form
        next_url = _safe_next(form.get("next"))
        if not form.get("csrf") or form.get("csrf") != flask.session.pop("csrf", None):
            return _login_page("Your session expired; please sign in again.", next_url), 400
        user = authenticate(store, form.get("username", ""), form.get("password", ""))
        if user is None:
            log.info("failed login")
            return _login_page("Unknown username or wrong password.", next_url), 401
        flask.session.clear()
        flask_login.login_user(LoginUser(user))
        audit(store, user.username, "login")
        return flask.redirect(next_url)

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
    """Build the Dash app (its Flask server is ``app.server``)."""
    store = store or Store(settings.resolved_database_url)
    store.init()
    app = dash.Dash(__name__, use_pages=True, pages_folder="",
                    # Bootstrap 5.3.3 CSS is vendored in dashboard/assets: no CDN at run time.
                    title="OnTrack",
                    suppress_callback_exceptions=True)
    server: flask.Flask = app.server
    secret = settings.secret_key
    if not secret:
        log.warning("ONTRACK_SECRET_KEY is not set: using the demo key (never in production)")
        secret = DEMO_SECRET
    server.config.update(SECRET_KEY=secret, SESSION_COOKIE_HTTPONLY=True,
                         SESSION_COOKIE_SAMESITE="Lax",
                         ONTRACK_DATA=DataAccess(store, settings, load_registry()),
                         ONTRACK_STORE=store)
    _wire_auth(server, store)
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

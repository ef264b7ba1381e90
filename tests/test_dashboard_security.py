"""Access control and hardening of the dashboard (issue #9), without a browser.

(a) every route, page and callback without a session: 401 or the login page, never data;
(b) IDOR: every callback of the app, fed crafted payloads naming another therapist's
    episode (or a filter outside the caller's scope), returns nothing of it; a test fails
    when a callback is added without being listed here;
(c) sign-in throttling; (d) production mode; (e) error pages and process logs;
(f) password hashes.

All tests share the session's one Dash app (``dash_env``). Throttling tests use their
own user and client addresses and reset the throttle afterwards, so the demo users of
the other tests are never locked out.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dash
import pytest
import sqlalchemy as sa
from werkzeug.security import check_password_hash
from werkzeug.serving import make_server

from dashboard.app import (
    DEMO_SECRET,
    MIN_SECRET_CHARS,
    THROTTLE_KEY,
    LoginThrottle,
    RedactClientPaths,
    flask_config,
)
from pipeline.config import Settings, load_settings
from pipeline.errors import ConfigError
from pipeline.store import Store, clients, episodes, users
from pipeline.users import add_user, username_exists
from tests.dashboard_helpers import PASSWORDS, episode_of
from tests.test_dashboard_access import _callback, client_for

ROOT = Path(__file__).resolve().parents[1]
THROTTLE_USER, THROTTLE_PASSWORD = "throttle-user", "throttle-user-pass-1"
TOO_MANY = "Too many failed sign-ins; wait a minute and try again."


@pytest.fixture
def env(dash_env: dict[str, Any]) -> dict[str, Any]:
    env = dash_env
    env["app"].server.test_client().get("/login")  # Dash registers callbacks on request 1
    return env


@pytest.fixture(scope="module")
def secrets_(dash_env: dict[str, Any]) -> dict[str, Any]:
    """Identifiers that must never reach an unauthorised browser or the process log."""
    store: Store = dash_env["store"]
    tids = dash_env["tids"]
    foreign = episode_of(store, tids["other"])
    own = episode_of(store, tids["therapist"])
    with store.engine.connect() as conn:
        rows = conn.execute(sa.select(episodes.c.episode_id, clients.c.client_id,
                                      clients.c.given_name, clients.c.family_name)
                            .join(clients, clients.c.client_id == episodes.c.client_id)
                            .where(episodes.c.episode_id.in_([own, foreign]))).mappings().all()
        some = conn.execute(sa.select(episodes.c.episode_id).order_by(episodes.c.episode_id)
                            .limit(5)).scalars().all()
    names = {r["episode_id"]: f"{r['given_name']} {r['family_name']}" for r in rows}
    client_ids = {r["episode_id"]: r["client_id"] for r in rows}
    values = {own, foreign, *some, *names.values(), *client_ids.values(), tids["other"]}
    return {"own": own, "foreign": foreign, "names": names, "client_ids": client_ids,
            "values": values}


def _no_data(body: str, secrets_: dict[str, Any]) -> None:
    leaked = [v for v in secrets_["values"] if v in body]
    assert not leaked, leaked


def _refused(r: Any) -> bool:
    """401/403, or a redirect to the sign-in page."""
    if r.status_code in (401, 403):
        return True
    return r.status_code == 302 and r.headers["Location"].split("?")[0] in ("/login",
                                                                            "http://localhost/login")


# ============================================================ (a) no session, no data

#: Every route of the Flask server with sample URLs to try (each with every method the
#: route allows). The catch-all page route is tried with every registered Dash page below.
ROUTES: dict[str, list[str]] = {
    "/static/<path:filename>": ["/static/app.css", "/static/../dashboard/data.py"],
    "/assets/<path:filename>": ["/assets/bootstrap.min.css", "/assets/nope.json"],
    "/_dash-component-suites/<string:package_name>/<path:fingerprinted_path>": [
        "/_dash-component-suites/dash/dcc/dash_core_components.js",
        "/_dash-component-suites/dash_ag_grid/dash_ag_grid.min.js"],
    "/_dash-layout": ["/_dash-layout"],
    "/_dash-dependencies": ["/_dash-dependencies"],
    "/_dash-update-component": ["/_dash-update-component"],
    "/_reload-hash": ["/_reload-hash"],
    "/_favicon.ico": ["/_favicon.ico"],
    "/": ["/", "/?tab=1"],
    "/<path:path>": ["/favicon.ico", "/no/such/page", "/client/", "/logout/x"],
    "/logout": ["/logout"],
}
#: The one route that answers without a session (it shows no data): tested separately.
PUBLIC_ROUTES = {"/login"}


def test_route_table_lists_every_route(env: dict[str, Any]) -> None:
    """A new route fails here until it is added to ROUTES (and so checked below)."""
    rules = {r.rule for r in env["app"].server.url_map.iter_rules()}
    assert rules == set(ROUTES) | PUBLIC_ROUTES, rules ^ (set(ROUTES) | PUBLIC_ROUTES)


@pytest.mark.parametrize("rule", list(ROUTES))
def test_route_without_session_gives_no_data(env: dict[str, Any], secrets_: dict[str, Any],
                                             rule: str) -> None:
    methods = next(r.methods for r in env["app"].server.url_map.iter_rules()
                   if r.rule == rule)
    c = client_for(env, None)
    for path in ROUTES[rule]:
        for method in sorted(methods or ()):
            kw: dict[str, Any] = {"json": {"output": "caseload-grid.rowData"}} \
                if method == "POST" else {}
            r = c.open(path, method=method, **kw)
            assert _refused(r), (method, path, r.status_code)
            _no_data(r.get_data(as_text=True), secrets_)


def test_every_page_without_session_redirects_to_login(env: dict[str, Any],
                                                       secrets_: dict[str, Any]) -> None:
    c = client_for(env, None)
    pages = list(dash.page_registry.values())
    assert {p["module"].rsplit(".", 1)[-1] for p in pages} >= {
        "caseload", "client", "service", "quality", "export"}
    for page in pages:
        path = page.get("path_template") or page["path"]
        path = path.replace("<episode_id>", secrets_["foreign"])
        r = c.get(path)
        assert r.status_code == 302, path
        assert r.headers["Location"].startswith("/login"), path
        # The redirect's body names the target, which is the caller's own URL; no data.
        for name in secrets_["names"].values():
            assert name not in r.get_data(as_text=True)


def test_every_callback_and_download_without_session_is_401(env: dict[str, Any]) -> None:
    c = client_for(env, None)
    for key, cb in env["app"].callback_map.items():
        outs = key[2:-2].split("...") if key.startswith("..") else [key]
        outputs = [(o.split(".", 1)[0], o.split(".", 1)[1]) for o in outs]
        inputs = [{**i, "value": 1} for i in cb["inputs"]]
        r = _callback(c, outputs, inputs, [{**s, "value": None} for s in cb["state"]])
        assert r.status_code == 401, key
        assert r.get_data(as_text=True) == "authentication required"


def test_assets_are_static_style_and_code_only(env: dict[str, Any]) -> None:
    """Assets hold no data: CSS/JS only (and they need a session anyway)."""
    folder = Path(env["app"].config.assets_folder)
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert files and all(p.suffix in (".css", ".js") for p in files), files
    r = client_for(env, None).get(f"/assets/{files[0].relative_to(folder).as_posix()}")
    assert _refused(r)


def test_login_page_is_public_but_shows_no_data(env: dict[str, Any],
                                               secrets_: dict[str, Any]) -> None:
    c = client_for(env, None)
    r = c.get(f"/login?next=/client/{secrets_['foreign']}")
    body = r.get_data(as_text=True)
    assert r.status_code == 200 and 'name="password"' in body
    for value in (*secrets_["names"].values(), *secrets_["client_ids"].values()):
        assert value not in body


def test_a_session_ends_at_logout(env: dict[str, Any]) -> None:
    c = client_for(env, "director")
    assert c.get("/_dash-layout").status_code == 200
    c.get("/logout")
    assert c.get("/_dash-layout").status_code == 401
    r = _callback(c, [("quality-records", "rowData")],
                  [{"id": "quality-reason", "property": "value", "value": None}], [])
    assert r.status_code == 401


# ============================================================ (b) IDOR, every callback

#: Every callback of the app -> the test that feeds it crafted payloads.
CALLBACK_TESTS = {
    "..caseload-grid.getRowsResponse...caseload-count.children..":
        "test_idor_caseload_filter",
    "caseload-grid.filterModel": "test_caseload_dropdowns_only_build_a_filter",
    "..client-review-result.children...client-flags.children...client-reviews.children..":
        "test_idor_review_form",
    "..export-summary.children...export-download.data...export-log.children..":
        "test_idor_export_download",
    "quality-records.rowData": "test_idor_quality_drill_down",
    "service-funnel.figure": "test_idor_service_funnel",
    ".._pages_content.children..._pages_store.data..": "test_idor_page_router",
    "_pages_dummy.children": "test_clientside_callback_runs_nothing_on_the_server",
}


def test_every_callback_has_an_access_test(env: dict[str, Any]) -> None:
    """A new callback fails here until it is listed in CALLBACK_TESTS with its test."""
    assert set(env["app"].callback_map) == set(CALLBACK_TESTS)
    names = set(globals())
    assert all(t in names for t in CALLBACK_TESTS.values())


def _rows(r: Any, ident: str, prop: str = "rowData") -> Any:
    assert r.status_code == 200, r.get_data(as_text=True)
    return r.get_json()["response"][ident][prop]


def _caseload(c: Any, filter_model: Any = None, request: Any = None) -> Any:
    """One block request of the caseload grid (AG Grid's infinite row model)."""
    if request is None:
        request = {"startRow": 0, "endRow": 100, "sortModel": [],
                   "filterModel": filter_model or {}}
    return _callback(c, [("caseload-grid", "getRowsResponse"), ("caseload-count", "children")],
                     [{"id": "caseload-grid", "property": "getRowsRequest", "value": request}],
                     [])


def _grid_rows(r: Any) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = _rows(r, "caseload-grid", "getRowsResponse")["rowData"]
    return rows


def _equals(col: str, value: Any) -> dict[str, Any]:
    return {col: {"filterType": "text", "type": "equals", "filter": value}}


def test_idor_caseload_filter(env: dict[str, Any], secrets_: dict[str, Any]) -> None:
    own_tid, other_tid = env["tids"]["therapist"], env["tids"]["other"]
    with env["store"].engine.connect() as conn:
        teams = conn.execute(sa.select(episodes.c.team).distinct()).scalars().all()
    c = client_for(env, "therapist")
    mine = _grid_rows(_caseload(c))
    assert mine and {row["therapist_id"] for row in mine} == {own_tid}
    assert _grid_rows(_caseload(c, _equals("therapist_id", other_tid))) == []
    for team in teams:  # any team filter: still only their own episodes
        r = _caseload(c, _equals("team", team))
        assert {row["therapist_id"] for row in _grid_rows(r)} <= {own_tid}
        assert secrets_["foreign"] not in r.get_data(as_text=True)
    crafted_models = [
        {"therapist_id": {"filterType": "text", "type": "notEqual", "filter": own_tid}},
        _equals("therapist_id", [other_tid]), _equals("therapist_id", {"$ne": None}),
        _equals("therapist_id", f"{other_tid}' OR '1'='1"), _equals("therapist_id", 7),
        _equals("episodes.therapist_id", other_tid), {"therapist_id": "x"}, ["x"], "x",
    ]
    for crafted in crafted_models:
        r = _caseload(c, crafted)
        assert _grid_rows(r) == [], crafted
        assert secrets_["foreign"] not in r.get_data(as_text=True)
    for request in (["x"], "x", 7, {"startRow": "0", "endRow": 10},
                    {"startRow": 0, "endRow": 10 ** 6},
                    {"startRow": 0, "endRow": 10, "sortModel": "therapist_id; DROP"}):
        r = _caseload(c, request=request)
        assert _grid_rows(r) == [], request
    assert _grid_rows(_caseload(client_for(env, "researcher"))) == []
    # Positive control: the director's same filter does return the other therapist's rows.
    assert _grid_rows(_caseload(client_for(env, "director"),
                                _equals("therapist_id", other_tid)))


def test_caseload_dropdowns_only_build_a_filter(env: dict[str, Any],
                                                secrets_: dict[str, Any]) -> None:
    """The drop-downs' callback reads no data: it turns strings into grid filters,
    keeps the column filters already set, and drops anything else."""
    def model(team: Any, therapist: Any, current: Any) -> Any:
        r = _callback(client_for(env, "therapist"), [("caseload-grid", "filterModel")],
                      [{"id": "caseload-team", "property": "value", "value": team},
                       {"id": "caseload-therapist", "property": "value", "value": therapist}],
                      [{"id": "caseload-grid", "property": "filterModel", "value": current}])
        assert secrets_["foreign"] not in r.get_data(as_text=True)
        return _rows(r, "caseload-grid", "filterModel")

    weeks = {"weeks": {"filterType": "number", "type": "greaterThan", "filter": 3}}
    assert model("North", None, weeks) == {**weeks, **_equals("team", "North")}
    assert model(None, "T1", None) == _equals("therapist_id", "T1")
    assert model(None, None, {**weeks, **_equals("team", "North")}) == weeks
    for crafted in (["North"], {"$ne": None}, 7, ""):
        assert model(crafted, crafted, "x") == {}


def _review(c: Any, episode: Any) -> Any:
    return _callback(c, [("client-review-result", "children"), ("client-flags", "children"),
                         ("client-reviews", "children")],
                     [{"id": "client-review-submit", "property": "n_clicks", "value": 1}],
                     [{"id": "client-episode", "property": "data", "value": episode},
                      {"id": "client-review-decision", "property": "value",
                       "value": "continue"},
                      {"id": "client-review-note", "property": "value", "value": "x"},
                      {"id": "client-review-next", "property": "date", "value": None},
                      {"id": "client-review-risk", "property": "value", "value": ["risk"]}])


def test_idor_review_form(env: dict[str, Any], secrets_: dict[str, Any]) -> None:
    foreign = secrets_["foreign"]
    before = len(env["store"].read_table("reviews"))
    for user in ("therapist", "researcher"):
        for episode in (foreign, f"{foreign}' OR '1'='1", "E999999", [foreign]):
            r = _review(client_for(env, user), episode)
            body = r.get_data(as_text=True)
            assert r.status_code == 200 and "Episode not found" in body, (user, episode)
            assert secrets_["names"][foreign] not in body
    assert len(env["store"].read_table("reviews")) == before


def test_idor_page_router(env: dict[str, Any], secrets_: dict[str, Any]) -> None:
    def page(user: str, path: str) -> str:
        r = _callback(client_for(env, user), [("_pages_content", "children"),
                                              ("_pages_store", "data")],
                      [{"id": "_pages_location", "property": "pathname", "value": path},
                       {"id": "_pages_location", "property": "search", "value": ""}], [])
        assert r.status_code == 200
        return r.get_data(as_text=True)

    foreign = secrets_["foreign"]
    for user in ("therapist", "researcher"):
        body = page(user, f"/client/{foreign}")
        assert "Episode not found" in body and secrets_["names"][foreign] not in body
        assert secrets_["client_ids"][foreign] not in body
    for user, path in (("therapist", "/service"), ("therapist", "/quality"),
                       ("therapist", "/export"), ("researcher", "/")):
        body = page(user, path)
        assert "do not have access" in body, (user, path)
        assert foreign not in body
    # A researcher signing in lands on "/": the notice links the pages they may open.
    body = json.dumps(json.loads(page("researcher", "/")))  # unescape "\u002f"
    for href in ('"/service"', '"/quality"', '"/export"'):
        assert href in body, href
    assert "Caseload" not in body
    # Positive controls: the owner and the director do see it.
    assert secrets_["names"][foreign] in page("other", f"/client/{foreign}")
    assert secrets_["names"][foreign] in page("director", f"/client/{foreign}")


def test_idor_quality_drill_down(env: dict[str, Any]) -> None:
    reasons = env["store"].read_table("quarantine")["reason"].unique().tolist()

    def drill(user: str, reason: Any) -> Any:
        return _rows(_callback(client_for(env, user), [("quality-records", "rowData")],
                               [{"id": "quality-reason", "property": "value",
                                 "value": reason}], []), "quality-records")

    for user in ("therapist", "researcher"):
        for reason in (None, reasons[0], "' OR 1=1 --", [reasons[0]]):
            assert drill(user, reason) == [], (user, reason)
    assert drill("director", reasons[0])  # positive control
    assert drill("director", {"reason": reasons[0]}) == []  # not a string: nothing


def test_idor_service_funnel(env: dict[str, Any]) -> None:
    def funnel(user: str, metric: Any) -> Any:
        return _callback(client_for(env, user), [("service-funnel", "figure")],
                         [{"id": "service-rate", "property": "value", "value": metric}], [])

    other_tid = env["tids"]["other"]
    for metric in ("recovered", "__class__", ["recovered"]):
        r = funnel("therapist", metric)
        assert r.status_code == 200, metric
        assert r.get_json()["response"]["service-funnel"]["figure"] == {}
        assert other_tid not in r.get_data(as_text=True)
    # Therapist-level funnels are for directors and researchers (aggregates, by design).
    assert funnel("director", "recovered").get_json()["response"]["service-funnel"]["figure"]


def test_idor_export_download(env: dict[str, Any]) -> None:
    before = len(env["store"].read_table("exports_log"))
    state: list[dict[str, Any]] = [
        {"id": "export-range", "property": "start_date", "value": None},
        {"id": "export-range", "property": "end_date", "value": None},
        {"id": "export-measures", "property": "value", "value": ["PHQ-9"]},
        {"id": "export-k", "property": "value", "value": 5},
        {"id": "export-format", "property": "value", "value": "csv"}]
    r = _callback(client_for(env, "therapist"),
                  [("export-summary", "children"), ("export-download", "data"),
                   ("export-log", "children")],
                  [{"id": "export-submit", "property": "n_clicks", "value": 1}], state)
    body = r.get_data(as_text=True)
    assert r.status_code == 200 and "do not have access" in body
    assert r.get_json()["response"]["export-download"]["data"] is None
    assert "base64" not in body and "researcher" not in body
    assert len(env["store"].read_table("exports_log")) == before


def test_clientside_callback_runs_nothing_on_the_server(env: dict[str, Any],
                                                        secrets_: dict[str, Any]) -> None:
    entry = env["app"].callback_map["_pages_dummy.children"]
    assert "callback" not in entry  # a clientside function: the browser runs it
    r = _callback(client_for(env, "therapist"), [("_pages_dummy", "children")],
                  [{"id": "_pages_store", "property": "data", "value": {"title": "x"}}], [])
    assert r.status_code == 500
    body = r.get_data(as_text=True)
    assert "Traceback" not in body and "KeyError" not in body
    _no_data(body, secrets_)


# ============================================================ (c) sign-in throttling


@pytest.fixture
def throttle(env: dict[str, Any]) -> Iterator[LoginThrottle]:
    store: Store = env["store"]
    if not username_exists(store, THROTTLE_USER):
        add_user(store, THROTTLE_USER, THROTTLE_PASSWORD, "director")
    t: LoginThrottle = env["app"].server.config[THROTTLE_KEY]
    t.reset()
    yield t
    t.reset()


def _sign_in(env: dict[str, Any], username: str, password: str, address: str) -> Any:
    c = env["app"].server.test_client()
    page = c.get("/login", environ_base={"REMOTE_ADDR": address}).get_data(as_text=True)
    token = re.search(r'name="csrf" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
    return c.post("/login", data={"username": username, "password": password,
                                  "csrf": token, "next": "/"},
                  environ_base={"REMOTE_ADDR": address})


def test_throttle_window_slides(throttle: LoginThrottle) -> None:
    now = [1000.0]
    t = LoginThrottle(max_failures=3, window_seconds=60, clock=lambda: now[0])
    keys = t.keys("Someone", "10.0.0.1")
    assert keys == ("user:someone", "addr:10.0.0.1")
    for _ in range(2):
        t.record_failure(keys)
        now[0] += 10
    assert t.retry_after(keys) == 0.0
    t.record_failure(keys)  # third failure at t=1020: blocked until 1000 + 60
    assert t.retry_after(keys) == pytest.approx(40)
    assert t.retry_after(t.keys("SOMEONE ", "10.0.0.2")) > 0  # same user, other address
    assert t.retry_after(t.keys("else", "10.0.0.1")) > 0  # same address, other user
    assert t.retry_after(t.keys("else", "10.0.0.2")) == 0.0
    assert t.first_refusal(keys) and not t.first_refusal(keys)
    now[0] = 1060.0  # the first failure leaves the window: one more try
    assert t.retry_after(keys) == 0.0
    t.record_failure(keys)
    assert t.retry_after(keys) == pytest.approx(1010 + 60 - 1060)  # now 1010 is oldest


def test_throttle_memory_is_bounded() -> None:
    now = [0.0]
    t = LoginThrottle(max_failures=2, window_seconds=60, clock=lambda: now[0], max_keys=10)
    for i in range(100):
        t.record_failure([f"addr:10.0.{i}.1"])
        now[0] += 0.01
    assert len(t._failures) <= 10
    t.record_failure(["addr:x"] * 5)
    assert len(t._failures["addr:x"]) == 2


def test_sixth_attempt_is_refused_even_with_the_right_password(
        env: dict[str, Any], throttle: LoginThrottle) -> None:
    for i in range(5):  # five failures for one username, from five addresses
        r = _sign_in(env, THROTTLE_USER, "wrong-password", f"10.9.1.{i}")
        assert r.status_code == 401
    r = _sign_in(env, THROTTLE_USER, THROTTLE_PASSWORD, "10.9.1.99")
    assert r.status_code == 429
    assert TOO_MANY in r.get_data(as_text=True)
    assert 0 < int(r.headers["Retry-After"]) <= 60
    assert client_for(env, "director")  # other users are not affected
    # The sign-in page itself still loads.
    assert env["app"].server.test_client().get(
        "/login", environ_base={"REMOTE_ADDR": "10.9.1.99"}).status_code == 200
    throttle.reset()
    assert _sign_in(env, THROTTLE_USER, THROTTLE_PASSWORD, "10.9.1.99").status_code == 302


def test_five_failures_from_one_address_block_that_address_only(
        env: dict[str, Any], throttle: LoginThrottle) -> None:
    for i in range(5):  # five different (unknown) usernames from one address
        assert _sign_in(env, f"nobody-{i}", "guess-guess", "10.9.9.9").status_code == 401
    r = _sign_in(env, THROTTLE_USER, THROTTLE_PASSWORD, "10.9.9.9")
    assert r.status_code == 429 and TOO_MANY in r.get_data(as_text=True)
    # The same user from another address signs in: the username was not the one guessed.
    assert _sign_in(env, THROTTLE_USER, THROTTLE_PASSWORD, "10.9.9.10").status_code == 302


def test_a_forged_forwarded_for_header_does_not_evade_the_address_limit(
        env: dict[str, Any], throttle: LoginThrottle) -> None:
    """No trusted proxy by default (proxy_hops = 0): X-Forwarded-For is ignored."""
    assert env["settings"].proxy_hops == 0
    c = env["app"].server.test_client()
    for i in range(5):
        page = c.get("/login", environ_base={"REMOTE_ADDR": "10.9.3.3"}).get_data(as_text=True)
        token = re.search(r'name="csrf" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
        r = c.post("/login", data={"username": f"nobody-{i}", "password": "guess-guess",
                                   "csrf": token},
                   headers={"X-Forwarded-For": f"192.0.2.{i}"},
                   environ_base={"REMOTE_ADDR": "10.9.3.3"})
        assert r.status_code == 401
    assert _sign_in(env, THROTTLE_USER, THROTTLE_PASSWORD, "10.9.3.3").status_code == 429
    assert load_settings(env={"ONTRACK_PROXY_HOPS": "1"}).proxy_hops == 1
    with pytest.raises(ConfigError):
        load_settings(env={"ONTRACK_PROXY_HOPS": "-1"})


def test_a_successful_sign_in_resets_no_counter(env: dict[str, Any],
                                                throttle: LoginThrottle) -> None:
    for i in range(4):
        assert _sign_in(env, f"nobody-{i}", "guess-guess", "10.9.7.7").status_code == 401
    assert _sign_in(env, THROTTLE_USER, THROTTLE_PASSWORD, "10.9.7.7").status_code == 302
    assert _sign_in(env, "nobody-5", "guess-guess", "10.9.7.7").status_code == 401
    r = _sign_in(env, THROTTLE_USER, THROTTLE_PASSWORD, "10.9.7.7")
    assert r.status_code == 429 and TOO_MANY in r.get_data(as_text=True)


def test_failed_and_throttled_sign_ins_are_audited_not_logged(
        env: dict[str, Any], throttle: LoginThrottle,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    before = int(env["store"].read_table("audit_log")["audit_id"].max() or 0)
    secret_typed = "my-Secret-Typed-As-Username"
    _sign_in(env, secret_typed, "pw-one-XYZ", "10.9.6.6")
    for _ in range(4):
        _sign_in(env, THROTTLE_USER, "pw-two-XYZ", "10.9.6.6")
    for _ in range(3):  # refused three times: audited once
        assert _sign_in(env, THROTTLE_USER, THROTTLE_PASSWORD, "10.9.6.6").status_code == 429
    text = caplog.text
    assert "failed sign-in" in text and "too many failed sign-ins" in text
    for word in (THROTTLE_USER, secret_typed, "pw-one-XYZ", "pw-two-XYZ", THROTTLE_PASSWORD):
        assert word not in text, word
    log = env["store"].read_table("audit_log")
    log = log[log["audit_id"] > before]
    failed = log[log["action"] == "login_failed"]
    assert list(failed["username"]) == ["(unknown)"] + [THROTTLE_USER] * 4
    assert set(failed["target"]) == {"address 10.9.6.6"}
    assert len(log[log["action"] == "login_throttled"]) == 1
    flat = log.astype(str).to_csv()
    for word in (secret_typed, "pw-one-XYZ", "pw-two-XYZ", THROTTLE_PASSWORD):
        assert word not in flat


def test_throttle_settings(env: dict[str, Any]) -> None:
    s = load_settings(env={"ONTRACK_LOGIN_MAX_FAILURES": "3",
                           "ONTRACK_LOGIN_WINDOW_SECONDS": "30"})
    assert (s.login_max_failures, s.login_window_seconds) == (3, 30.0)
    assert (Settings().login_max_failures, Settings().login_window_seconds) == (5, 60.0)
    for bad in ({"ONTRACK_LOGIN_MAX_FAILURES": "0"}, {"ONTRACK_LOGIN_WINDOW_SECONDS": "-1"},
                {"ONTRACK_LOGIN_MAX_FAILURES": "many"}):
        with pytest.raises(ConfigError):
            load_settings(env=bad)
    t: LoginThrottle = env["app"].server.config[THROTTLE_KEY]
    assert (t.max_failures, t.window) == (env["settings"].login_max_failures,
                                          env["settings"].login_window_seconds)


# ============================================================ (d) production mode


@pytest.mark.parametrize("key", ["", DEMO_SECRET, "s" * (MIN_SECRET_CHARS - 1)])
def test_production_refuses_a_missing_demo_or_short_key(key: str) -> None:
    with pytest.raises(ConfigError, match="ONTRACK_SECRET_KEY") as err:
        flask_config(Settings(environment="production", secret_key=key))
    if key:
        assert key not in str(err.value)  # never echo the key


def test_production_with_a_proper_key_sends_cookies_over_https_only() -> None:
    key = "k" * MIN_SECRET_CHARS
    conf = flask_config(Settings(environment="production", secret_key=key))
    assert conf["SECRET_KEY"] == key and conf["SESSION_COOKIE_SECURE"] is True
    assert conf["SESSION_COOKIE_HTTPONLY"] is True and conf["PROPAGATE_EXCEPTIONS"] is False


def test_development_falls_back_to_the_demo_key_with_a_warning(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    conf = flask_config(Settings())
    assert conf["SECRET_KEY"] == DEMO_SECRET and conf["SESSION_COOKIE_SECURE"] is False
    assert "never in production" in caplog.text


def test_environment_setting() -> None:
    assert load_settings(env={"ONTRACK_ENVIRONMENT": "production"}).environment == \
        "production"
    assert load_settings(env={}).environment == "development"
    with pytest.raises(ConfigError, match="ONTRACK_ENVIRONMENT"):
        load_settings(env={"ONTRACK_ENVIRONMENT": "staging"})


def test_secret_key_cannot_come_from_the_settings_file(tmp_path: Path) -> None:
    toml = tmp_path / "ontrack.toml"
    toml.write_text('environment = "production"\nsecret_key = "x"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="ONTRACK_SECRET_KEY"):
        load_settings(toml, env={})


def test_serve_in_production_without_a_key_exits_with_the_fix(tmp_path: Path) -> None:
    db = tmp_path / "serve.db"
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("ONTRACK_")}
    child_env.update(ONTRACK_ENVIRONMENT="production",
                     ONTRACK_DATABASE_URL=f"sqlite:///{db}", ONTRACK_SECRET_KEY=DEMO_SECRET,
                     PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-c",
                          "import sys; from pipeline.cli import main; sys.exit(main())",
                          "serve", "--port", "0"],
                         cwd=tmp_path, env=child_env, capture_output=True, text=True,
                         timeout=120, check=False)
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert "will not start in production" in res.stderr
    assert "Set ONTRACK_SECRET_KEY" in res.stderr and DEMO_SECRET not in res.stderr
    assert "Traceback" not in res.stderr
    assert not db.exists()  # refused before the store was opened


def test_serve_never_runs_dash_in_debug_mode(monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    import dashboard.app
    from pipeline import cli

    calls: dict[str, Any] = {}

    class FakeApp:
        def run(self, **kwargs: Any) -> None:
            calls.update(kwargs)

    monkeypatch.setattr(dashboard.app, "create_app", lambda settings: FakeApp())
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DASH_DEBUG", "true")
    monkeypatch.setenv("ONTRACK_DATABASE_URL", f"sqlite:///{tmp_path}/x.db")
    for name in ("ONTRACK_ENVIRONMENT", "ONTRACK_SECRET_KEY", "ONTRACK_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    ontrack_log = logging.getLogger("ontrack")
    handlers, level = list(ontrack_log.handlers), ontrack_log.level
    try:
        assert cli.main(["serve", "--port", "0"]) == 0
    finally:  # main() configures the "ontrack" logger: put it back
        ontrack_log.handlers[:] = handlers
        ontrack_log.setLevel(level)
    assert calls["debug"] is False and calls["dev_tools_ui"] is False


# ============================================================ (e) error pages and logs


def _db_error(episode_id: str) -> sa.exc.OperationalError:
    statement = f"SELECT * FROM episodes WHERE episode_id = '{episode_id}'"
    return sa.exc.OperationalError(statement, (episode_id,), Exception("database is locked"))


def _generic(r: Any, secrets_: dict[str, Any], episode_id: str) -> str:
    body = r.get_data(as_text=True)
    assert r.status_code == 500
    for word in (episode_id, "SELECT", "Traceback", "OperationalError", "database is locked",
                 "sqlalchemy", ".py"):
        assert word not in body, word
    _no_data(body, secrets_)
    assert re.search(r"reference (<strong>)?[0-9a-f]{8}", body)
    return body


def test_an_error_in_a_route_shows_a_generic_page(env: dict[str, Any],
                                                  secrets_: dict[str, Any],
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    foreign = secrets_["foreign"]

    def boom() -> Any:
        raise _db_error(foreign)

    monkeypatch.setitem(env["app"].server.view_functions, "login", boom)
    body = _generic(client_for(env, None).get(f"/login?next=/client/{foreign}"), secrets_,
                    foreign)
    assert "Something went wrong" in body
    ref = re.search(r"reference <strong>([0-9a-f]{8})", body).group(1)  # type: ignore[union-attr]
    # The operator's log has the reference, the kind of error and where, not its text.
    assert ref in caplog.text and "sqlalchemy.exc.OperationalError" in caplog.text
    for word in (foreign, "SELECT", "database is locked"):
        assert word not in caplog.text, word


def test_an_error_in_a_callback_returns_a_generic_error(env: dict[str, Any],
                                                       secrets_: dict[str, Any],
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture
                                                       ) -> None:
    caplog.set_level(logging.DEBUG)
    own = secrets_["own"]
    data = env["app"].server.config["ONTRACK_DATA"]

    def boom(*_: Any, **__: Any) -> Any:
        raise _db_error(own)

    monkeypatch.setattr(data, "caseload_page", boom)
    monkeypatch.setattr(data, "episode", boom)
    c = client_for(env, "therapist")
    _generic(_caseload(c), secrets_, own)
    _generic(_callback(c, [("_pages_content", "children"), ("_pages_store", "data")],
                       [{"id": "_pages_location", "property": "pathname",
                         "value": f"/client/{own}"},
                        {"id": "_pages_location", "property": "search", "value": ""}], []),
             secrets_, own)
    assert caplog.text.count("unhandled error") == 2
    for word in (own, "SELECT", "database is locked"):
        assert word not in caplog.text


def test_the_app_is_not_in_debug_mode(env: dict[str, Any]) -> None:
    server = env["app"].server
    assert server.debug is False and server.config["PROPAGATE_EXCEPTIONS"] is False


def test_process_log_of_a_failed_sign_in_and_a_client_view_has_no_identifiers(
        env: dict[str, Any], secrets_: dict[str, Any], throttle: LoginThrottle,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    _sign_in(env, "director", "not-the-password", "10.9.5.5")
    own = secrets_["own"]
    r = _callback(client_for(env, "therapist"), [("_pages_content", "children"),
                                                 ("_pages_store", "data")],
                  [{"id": "_pages_location", "property": "pathname",
                    "value": f"/client/{own}"},
                   {"id": "_pages_location", "property": "search", "value": ""}], [])
    assert secrets_["names"][own] in r.get_data(as_text=True)  # the view happened
    text = caplog.text
    assert "failed sign-in" in text
    for word in (own, secrets_["names"][own], secrets_["client_ids"][own], "director",
                 "not-the-password", PASSWORDS["therapist"]):
        assert word not in text, word


def test_access_log_lines_have_episode_ids_redacted(env: dict[str, Any],
                                                    secrets_: dict[str, Any],
                                                    caplog: pytest.LogCaptureFixture
                                                    ) -> None:
    """Through a real server: werkzeug logs every request line, URL included."""
    caplog.set_level(logging.INFO, logger="werkzeug")
    own = secrets_["own"]
    srv = make_server("127.0.0.1", 0, env["app"].server, threaded=True)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{srv.server_port}"
        for path in (f"/client/{own}", f"/login?next=%2Fclient%2F{own}"):
            try:
                urllib.request.urlopen(base + path, timeout=10).read()
            except urllib.error.HTTPError:
                pass
    finally:
        srv.shutdown()
        thread.join(5)
    lines = [r.getMessage() for r in caplog.records if r.name == "werkzeug"]
    assert any("/client/<episode>" in line for line in lines), lines
    assert not any(own in line for line in lines), lines
    assert any(isinstance(f, RedactClientPaths)
               for f in logging.getLogger("werkzeug").filters)


# ============================================================ (f) password hashes


def test_password_hashes_use_scrypt_and_are_salted(env: dict[str, Any],
                                                   tmp_path: Path) -> None:
    with env["store"].engine.connect() as conn:
        rows = conn.execute(sa.select(users.c.username, users.c.password_hash)).all()
    assert {"therapist", "other", "director", "researcher"} <= {r[0] for r in rows}
    for username, hashed in rows:
        assert hashed.startswith("scrypt:"), username
        n = int(hashed.split(":")[1])
        assert n >= 2 ** 15  # Werkzeug's default work factor, no weaker
        if username in PASSWORDS:
            assert PASSWORDS[username] not in hashed
            assert check_password_hash(hashed, PASSWORDS[username])
    # Salted: the same password twice gives two different hashes.
    store = Store(f"sqlite:///{tmp_path}/u.db")
    store.init()
    add_user(store, "a-user", "same-password-1", "director")
    add_user(store, "b-user", "same-password-1", "director")
    with store.engine.connect() as conn:
        hashes = conn.execute(sa.select(users.c.password_hash)).scalars().all()
    store.engine.dispose()
    assert len(set(hashes)) == 2


def test_login_page_reveals_nothing_about_usernames(env: dict[str, Any],
                                                    throttle: LoginThrottle) -> None:
    known = _sign_in(env, "director", "wrong-password", "10.9.4.4")
    unknown = _sign_in(env, "no-such-user", "wrong-password", "10.9.4.4")
    strip = re.compile(r'value="[^"]*"')
    assert known.status_code == unknown.status_code == 401
    assert strip.sub("", known.get_data(as_text=True)) == \
        strip.sub("", unknown.get_data(as_text=True))
    assert json.dumps(known.headers.get("Retry-After")) == "null"


def test_throttle_is_shared_by_worker_processes(env: dict[str, Any],
                                                throttle: LoginThrottle) -> None:
    """Two throttles on one store (two gunicorn workers) count failures together."""
    from dashboard.app import StoreThrottle

    a = StoreThrottle(env["store"], "worker-secret", max_failures=5, window_seconds=60)
    b = StoreThrottle(env["store"], "worker-secret", max_failures=5, window_seconds=60)
    keys = a.keys("shared-user", "10.9.8.7")
    for i in range(5):
        assert (a if i % 2 else b).retry_after(keys) == 0.0
        (a if i % 2 else b).record_failure(keys)
    assert 55 < a.retry_after(keys) <= 60 and 55 < b.retry_after(keys) <= 60
    # Keys are stored as HMACs: neither the typed name nor the address is readable.
    stored = env["store"].read_table("login_failures").to_csv()
    assert "shared-user" not in stored and "10.9.8.7" not in stored
    a.reset()
    assert b.retry_after(keys) == 0.0

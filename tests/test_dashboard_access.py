"""Server-side access control of the dashboard, without a browser."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from dashboard.access import Viewer
from dashboard.data import DataAccess
from tests.dashboard_helpers import PASSWORDS, episode_of


@pytest.fixture
def env(dash_env: dict[str, Any]) -> dict[str, Any]:
    return dash_env


def client_for(env: dict[str, Any], user: str | None) -> Any:
    c = env["app"].server.test_client()
    if user is None:
        return c
    page = c.get("/login").get_data(as_text=True)
    token = re.search(r'name="csrf" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
    r = c.post("/login", data={"username": user, "password": PASSWORDS[user], "csrf": token,
                               "next": "/"})
    assert r.status_code == 302, r.get_data(as_text=True)
    return c


@pytest.mark.parametrize("path", ["/_dash-layout", "/_dash-dependencies",
                                  "/_dash-component-suites/dash/dcc/dash_core_components.js"])
def test_dash_internals_need_a_session(env: dict[str, Any], path: str) -> None:
    assert client_for(env, None).get(path).status_code == 401


def test_callback_post_without_session_is_401(env: dict[str, Any]) -> None:
    r = client_for(env, None).post("/_dash-update-component", json={"output": "x"})
    assert r.status_code == 401
    assert b"episode" not in r.data


@pytest.mark.parametrize("path", ["/", "/client/E000001", "/service", "/quality",
                                  "/export"])
def test_pages_redirect_to_login(env: dict[str, Any], path: str) -> None:
    r = client_for(env, None).get(path)
    assert r.status_code == 302 and "/login" in r.headers["Location"]


def test_wrong_password_and_csrf(env: dict[str, Any]) -> None:
    c = client_for(env, None)
    page = c.get("/login").get_data(as_text=True)
    token = re.search(r'name="csrf" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
    r = c.post("/login", data={"username": "director", "password": "nope", "csrf": token})
    assert r.status_code == 401 and "wrong password" in r.get_data(as_text=True)
    r = c.post("/login", data={"username": "director", "password": PASSWORDS["director"],
                               "csrf": "forged"})
    assert r.status_code == 400


def test_login_cookie_flags_and_open_redirect(env: dict[str, Any]) -> None:
    c = client_for(env, None)
    page = c.get("/login?next=//evil.example/x").get_data(as_text=True)
    assert 'name="next" value="/"' in page  # off-site targets are dropped
    token = re.search(r'name="csrf" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
    r = c.post("/login", data={"username": "director", "password": PASSWORDS["director"],
                               "csrf": token, "next": "https://evil.example/"})
    assert r.headers["Location"] == "/"
    cookie = r.headers.get("Set-Cookie", "")
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie


def _viewer(env: dict[str, Any], user: str) -> Viewer:
    role = "therapist" if user in ("therapist", "other") else user
    return Viewer(username=user, role=role, therapist_id=env["tids"].get(user))


def test_therapist_caseload_is_only_their_own(env: dict[str, Any]) -> None:
    data: DataAccess = env["app"].server.config["ONTRACK_DATA"]
    own = data.caseload(_viewer(env, "therapist"))
    assert len(own) > 0
    assert set(own["therapist_id"]) == {env["tids"]["therapist"]}
    # A filter naming another therapist cannot widen the scope.
    other = data.caseload(_viewer(env, "therapist"), therapist=env["tids"]["other"])
    assert other.empty
    everyone = data.caseload(_viewer(env, "director"))
    assert len(everyone) > len(own)
    assert data.caseload(_viewer(env, "researcher")).empty


def test_client_page_of_another_therapist_is_not_found(env: dict[str, Any]) -> None:
    foreign = episode_of(env["store"], env["tids"]["other"])
    c = client_for(env, "therapist")
    body = json.dumps(c.get("/_dash-layout").get_json())
    assert foreign not in body
    data: DataAccess = env["app"].server.config["ONTRACK_DATA"]
    assert data.episode(_viewer(env, "therapist"), foreign) is None
    assert data.episode(_viewer(env, "other"), foreign) is not None
    assert data.episode(_viewer(env, "researcher"), foreign) is None


def _callback(c: Any, outputs: list[tuple[str, str]], inputs: list[dict[str, Any]],
              state: list[dict[str, Any]]) -> Any:
    """POST a callback request as the browser would, with whatever values we like."""
    if len(outputs) == 1:
        output = f"{outputs[0][0]}.{outputs[0][1]}"
        outs: Any = {"id": outputs[0][0], "property": outputs[0][1]}
    else:
        output = ".." + "...".join(f"{i}.{p}" for i, p in outputs) + ".."
        outs = [{"id": i, "property": p} for i, p in outputs]
    payload = {"output": output, "outputs": outs,
               "inputs": inputs, "state": state, "changedPropIds": [
                   f"{inputs[0]['id']}.{inputs[0]['property']}"]}
    return c.post("/_dash-update-component", json=payload)


def test_crafted_review_callback_for_foreign_episode_is_refused(env: dict[str, Any]) -> None:
    foreign = episode_of(env["store"], env["tids"]["other"])
    c = client_for(env, "therapist")
    out = [("client-review-result", "children"), ("client-flags", "children"),
           ("client-reviews", "children")]
    r = _callback(c, out,
                  [{"id": "client-review-submit", "property": "n_clicks", "value": 1}],
                  [{"id": "client-episode", "property": "data", "value": foreign},
                   {"id": "client-review-decision", "property": "value", "value": "continue"},
                   {"id": "client-review-note", "property": "value", "value": "x"},
                   {"id": "client-review-next", "property": "date", "value": None},
                   {"id": "client-review-risk", "property": "value", "value": ["risk"]}])
    assert r.status_code == 200
    assert "Episode not found" in r.get_data(as_text=True)
    assert env["store"].read_table("reviews").query("episode_id == @foreign").empty


def test_crafted_caseload_filter_for_foreign_therapist_returns_nothing(
        env: dict[str, Any]) -> None:
    c = client_for(env, "therapist")
    out = [("caseload-grid", "getRowsResponse"), ("caseload-count", "children")]
    request = {"startRow": 0, "endRow": 100, "sortModel": [], "filterModel": {
        "therapist_id": {"filterType": "text", "type": "equals",
                         "filter": env["tids"]["other"]}}}
    r = _callback(c, out, [{"id": "caseload-grid", "property": "getRowsRequest",
                            "value": request}], [])
    assert r.status_code == 200
    body = r.get_json()
    assert body["response"]["caseload-grid"]["getRowsResponse"] == {"rowData": [],
                                                                    "rowCount": 0}


def test_researcher_sees_no_quarantine_records(env: dict[str, Any]) -> None:
    data: DataAccess = env["app"].server.config["ONTRACK_DATA"]
    assert data.quarantined(_viewer(env, "researcher"), None).empty
    assert not data.quarantined(_viewer(env, "director"), None).empty


def test_client_view_is_audited_and_renders(env: dict[str, Any]) -> None:
    import flask_login

    from dashboard.pages import client as client_page
    from dashboard.session import LoginUser
    from pipeline.users import authenticate

    own = episode_of(env["store"], env["tids"]["therapist"])
    foreign = episode_of(env["store"], env["tids"]["other"])
    user = authenticate(env["store"], "therapist", PASSWORDS["therapist"])
    assert user is not None
    with env["app"].server.test_request_context("/"):
        flask_login.login_user(LoginUser(user))
        page = str(client_page.layout(episode_id=own))
        assert "client-graph-PHQ-9" in page and "Record a plan review" in page
        assert "Episode not found" in str(client_page.layout(episode_id=foreign))
    log = env["store"].read_table("audit_log")
    assert ((log["action"] == "view_client") & (log["target"] == own)).any()
    assert not ((log["target"] == foreign) & (log["username"] == "therapist")).any()


def test_service_page_numbers_equal_the_report(env: dict[str, Any]) -> None:
    from pipeline.report import service_report
    from pipeline.scales import load_registry

    data: DataAccess = env["app"].server.config["ONTRACK_DATA"]
    s = data.service(_viewer(env, "director"))
    assert s is not None
    rep = service_report(env["store"], env["settings"], load_registry())
    overall = s["overall"].iloc[0]
    for key in ("finished_episodes", "at_caseness", "recovered", "reliably_improved",
                "reliably_deteriorated", "reliably_recovered"):
        assert int(overall[key]) == rep[key], key
    assert float(overall["recovered_rate"]) == pytest.approx(rep["recovered_rate"])
    # Team rows add up to the whole.
    assert int(s["team"]["finished_episodes"].sum()) == rep["finished_episodes"]
    assert data.service(_viewer(env, "therapist")) is None


_EXPORT_OUT = [("export-summary", "children"), ("export-download", "data"),
               ("export-log", "children")]


def _export_state(k: Any = 5, measures: Any = ("PHQ-9", "GAD-7")) -> list[dict[str, Any]]:
    return [{"id": "export-range", "property": "start_date", "value": None},
            {"id": "export-range", "property": "end_date", "value": None},
            {"id": "export-measures", "property": "value", "value": list(measures)},
            {"id": "export-k", "property": "value", "value": k},
            {"id": "export-format", "property": "value", "value": "csv"}]


def test_export_callback_refuses_a_therapist(env: dict[str, Any]) -> None:
    before = len(env["store"].read_table("exports_log"))
    r = _callback(client_for(env, "therapist"), _EXPORT_OUT,
                  [{"id": "export-submit", "property": "n_clicks", "value": 1}],
                  _export_state())
    assert r.status_code == 200
    body = r.get_data(as_text=True)
    assert "do not have access" in body and "base64" not in body
    assert len(env["store"].read_table("exports_log")) == before
    # The page itself is refused too.
    from dashboard.access import may_export
    assert not may_export(_viewer(env, "therapist"))


def test_researcher_downloads_an_anonymous_zip_and_the_export_is_logged(
        env: dict[str, Any], tmp_path: Any) -> None:
    import base64
    import io
    import zipfile

    from tests.dashboard_helpers import assert_anonymous

    r = _callback(client_for(env, "researcher"), _EXPORT_OUT,
                  [{"id": "export-submit", "property": "n_clicks", "value": 1}],
                  _export_state(k=6))
    assert r.status_code == 200
    resp = r.get_json()["response"]
    data = resp["export-download"]["data"]
    assert data["filename"].startswith("ontrack-export-") and data["base64"]
    with zipfile.ZipFile(io.BytesIO(base64.b64decode(data["content"]))) as zf:
        zf.extractall(tmp_path)
    out = tmp_path / "ontrack-export"
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["parameters"]["k"] == 6 and manifest["k_achieved"] >= 6
    assert_anonymous(out)
    summary = json.dumps(resp["export-summary"]["children"])
    assert f"{manifest['rows']['episodes']} episodes" in summary
    assert f"{manifest['records_suppressed']} of 400 episodes" in summary
    log = env["store"].read_table("exports_log")
    row = log.iloc[-1]
    assert row["username"] == "researcher" and row["source"] == "dashboard"
    assert int(row["episodes"]) == manifest["rows"]["episodes"]
    assert json.loads(row["parameters"])["k"] == 6
    # The researcher's log shows their own exports only; the director sees everyone's.
    data_access: DataAccess = env["app"].server.config["ONTRACK_DATA"]
    assert set(data_access.export_log(_viewer(env, "researcher"))["username"]) == \
        {"researcher"}
    assert data_access.export_log(_viewer(env, "therapist")).empty


@pytest.mark.parametrize("k, measures, message", [
    (1, ["PHQ-9"], "k must be a whole number"),
    ("5; DROP TABLE", ["PHQ-9"], "k must be a whole number"),
    (5, [], "Choose at least one measure"),
    (5, ["NOPE"], "unknown measures"),
])
def test_export_callback_rejects_bad_options_clearly(env: dict[str, Any], k: Any,
                                                     measures: list[str],
                                                     message: str) -> None:
    r = _callback(client_for(env, "director"), _EXPORT_OUT,
                  [{"id": "export-submit", "property": "n_clicks", "value": 1}],
                  _export_state(k=k, measures=measures))
    assert r.status_code == 200
    body = r.get_data(as_text=True)
    assert message in body and "base64" not in body and "Traceback" not in body

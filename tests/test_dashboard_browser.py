"""Browser tests in headless Chromium (Debian's, driven by Playwright).

Screenshots of every page for each role go to ``artifacts/screenshots/`` (git-ignored).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import sqlalchemy as sa
from playwright.sync_api import Page, sync_playwright
from werkzeug.serving import make_server

from pipeline.store import caseload, episodes, utcnow
from tests.dashboard_helpers import PASSWORDS, episode_of

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
SHOTS = Path(__file__).resolve().parent.parent / "artifacts" / "screenshots"


@pytest.fixture(scope="module")
def server(dash_env: dict[str, Any]) -> Iterator[dict[str, Any]]:
    store, tids = dash_env["store"], dash_env["tids"]
    srv = make_server("127.0.0.1", 0, dash_env["app"].server, threaded=True)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield {"url": f"http://127.0.0.1:{srv.server_port}", "store": store, "tids": tids}
    srv.shutdown()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def login(browser: Any, url: str, user: str) -> tuple[Page, list[str]]:
    page = browser.new_page(viewport={"width": 1440, "height": 1000})
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{url}/")
    page.fill("#username", user)
    page.fill("#password", PASSWORDS[user])
    page.click("button[type=submit]")
    page.wait_for_load_state("networkidle")
    return page, errors


def shot(page: Page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def test_therapist_journey(server: dict[str, Any], browser: Any) -> None:
    url = server["url"]
    page, errors = login(browser, url, "therapist")
    page.wait_for_selector(".ag-center-cols-container .ag-row", timeout=15000)
    assert "My caseload" in page.inner_text("h2")
    rows = page.locator(".ag-center-cols-container .ag-row").count()
    assert rows > 0
    shot(page, "therapist-caseload")

    own = episode_of(server["store"], server["tids"]["therapist"])
    page.goto(f"{url}/client/{own}")
    page.wait_for_selector("#client-graph-PHQ-9 .main-svg", timeout=15000)
    # The chart has its severity bands (shapes) and the caseness line.
    shapes = page.locator("#client-graph-PHQ-9 .shapelayer path").count()
    assert shapes >= 6
    shot(page, "therapist-client")

    # Submitting a review acknowledges the open flags.
    open_before = server["store"].read_table("flags").query(
        "episode_id == @own and state == 'open' and kind != 'risk_item'")
    page.fill("#client-review-note", "Reviewed in supervision; adding behavioural activation")
    page.click("#client-review-submit")
    page.wait_for_selector("#review-ok", timeout=15000)
    assert f"{len(open_before)} flags acknowledged" in page.inner_text("#review-ok")
    assert "Reviewed in supervision" in page.inner_text("#client-reviews")
    after = server["store"].read_table("flags").query("episode_id == @own")
    assert not ((after["state"] == "open") & (after["kind"] != "risk_item")).any()
    shot(page, "therapist-client-after-review")

    # Another therapist's client: not found.
    foreign = episode_of(server["store"], server["tids"]["other"])
    page.goto(f"{url}/client/{foreign}")
    page.wait_for_selector("#client-not-found", timeout=15000)
    shot(page, "therapist-foreign-client")

    # Service pages are not for therapists.
    page.goto(f"{url}/service")
    page.wait_for_selector(".alert", timeout=15000)
    assert "do not have access" in page.inner_text(".alert")

    page.click("#nav-logout")
    page.wait_for_url(f"{url}/login", timeout=15000)
    page.goto(f"{url}/")
    assert "/login" in page.url
    assert errors == [], errors


def test_director_pages(server: dict[str, Any], browser: Any) -> None:
    url = server["url"]
    page, errors = login(browser, url, "director")
    page.wait_for_selector(".ag-center-cols-container .ag-row", timeout=15000)
    all_rows = page.inner_text("#caseload-count")
    shot(page, "director-caseload")
    # Filter by team.
    page.click("#caseload-team")
    page.keyboard.type("North")
    # Pick the option once the menu shows it: Enter pressed before the options are
    # rendered (a loaded CI machine) selects nothing.
    page.get_by_role("option", name="North", exact=True).click(timeout=15000)
    page.wait_for_function(
        f"document.querySelector('#caseload-count').innerText != {all_rows!r}", timeout=15000)
    assert int(page.inner_text("#caseload-count").split()[0]) < int(all_rows.split()[0])
    shot(page, "director-caseload-north")

    foreign = episode_of(server["store"], server["tids"]["other"])
    page.goto(f"{url}/client/{foreign}")
    page.wait_for_selector("#client-graph-PHQ-9 .main-svg", timeout=15000)
    shot(page, "director-client")

    page.goto(f"{url}/service")
    page.wait_for_selector("#service-funnel .main-svg", timeout=15000)
    shot(page, "director-service")
    page.goto(f"{url}/quality")
    page.wait_for_selector("#quality-records .ag-center-cols-container .ag-row", timeout=15000)
    shot(page, "director-quality")
    assert errors == [], errors


def test_director_sorts_and_filters_the_caseload_on_the_server(
        server: dict[str, Any], browser: Any) -> None:
    """The grid pages on the server: a header click and a column filter made in the
    browser reach the database as AG Grid's own sort and filter models."""
    with server["store"].engine.connect() as conn:
        open_eps = pd.DataFrame(conn.execute(sa.select(
            episodes.c.start_date, caseload.c.dep_latest)
            .join(caseload, caseload.c.episode_id == episodes.c.episode_id, isouter=True)
            .where(episodes.c.end_date.is_(None))).all())
    weeks = [(utcnow().date() - d).days // 7 for d in open_eps["start_date"]]
    page, errors = login(browser, server["url"], "director")
    page.wait_for_selector(".ag-center-cols-container .ag-row", timeout=15000)
    first = ".ag-center-cols-container .ag-row[row-index='0'] [col-id='{}']"
    header = ".ag-header-cell[col-id='dep_latest'] .ag-header-cell-label"
    page.click(header)  # ascending
    page.click(header)  # descending
    top = str(int(open_eps["dep_latest"].max()))
    page.wait_for_function(
        f"document.querySelector({first.format('dep_latest')!r})?.innerText == {top!r}",
        timeout=15000)
    shot(page, "director-caseload-sorted")
    # Weeks equal to the most common value, typed into the column's own filter.
    target = max(set(weeks), key=weeks.count)
    page.click(".ag-header-cell[col-id='weeks'] .ag-header-cell-filter-button")
    page.fill(".ag-filter-body input", str(target))
    want = f"{weeks.count(target):,} open episode"
    page.wait_for_function(
        f"document.querySelector('#caseload-count').innerText.startsWith({want!r})",
        timeout=15000)
    assert "match the filters" in page.inner_text("#caseload-count")
    assert page.inner_text(first.format("weeks")) == str(target)
    shot(page, "director-caseload-weeks-filter")
    assert errors == [], errors


def test_researcher_export_page(server: dict[str, Any], browser: Any, tmp_path: Path) -> None:
    import zipfile

    url = server["url"]
    page, errors = login(browser, url, "researcher")
    # Researchers have no caseload: the navigation offers only aggregates and exports.
    nav = page.inner_text("nav")
    assert "Caseload" not in nav and "Research export" in nav
    # Signing in lands on "/", the caseload, which is not theirs: the notice links theirs.
    page.wait_for_selector("text=Your pages", timeout=15000)
    shot(page, "researcher-landing")
    page.goto(f"{url}/export")
    page.wait_for_selector("#export-submit", timeout=15000)
    assert "Research export" in page.inner_text("h2")
    shot(page, "researcher-export")
    with page.expect_download(timeout=60000) as info:
        page.click("#export-submit")
    download = info.value
    target = tmp_path / download.suggested_filename
    download.save_as(target)
    with zipfile.ZipFile(target) as zf:
        assert "ontrack-export/manifest.json" in zf.namelist()
    page.wait_for_selector("#export-ok", timeout=15000)
    assert "episodes and" in page.inner_text("#export-ok")
    page.wait_for_function(
        "document.querySelector('#export-log').innerText.includes('dashboard')",
        timeout=15000)
    assert "researcher" in page.inner_text("#export-log")
    shot(page, "researcher-export-done")
    assert errors == [], errors

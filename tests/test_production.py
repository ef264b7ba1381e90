"""Production serving: the dashboard under gunicorn with several worker processes, on
the settings a deployment uses (production mode, secret from the environment)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pipeline.store import Store

GUNICORN = [sys.executable, "-m", "gunicorn"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONTRACK_")}
    env.update(ONTRACK_DATABASE_URL=f"sqlite:///{tmp}/prod.db", ONTRACK_DATA_DIR=str(tmp),
               ONTRACK_ENVIRONMENT="production", **extra)
    return env


def _get(url: str) -> tuple[int, str, dict[str, str]]:
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: object, **kwargs: object) -> None:
            return None

    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(url, timeout=10) as r:
            return r.status, r.read().decode(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace"), dict(e.headers)


def test_gunicorn_with_two_workers_serves_the_login_page(tmp_path: Path) -> None:
    Store(f"sqlite:///{tmp_path}/prod.db").init()
    port = _free_port()
    proc = subprocess.Popen(
        [*GUNICORN, "--workers", "2", "--bind", f"127.0.0.1:{port}",
         "dashboard.wsgi:create_server()"],
        env=_env(tmp_path, ONTRACK_SECRET_KEY="x" * 48), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        status = 0
        while time.monotonic() < deadline:
            try:
                status, body, _ = _get(f"http://127.0.0.1:{port}/login")
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.5)
        assert status == 200 and "Sign in" in body
        status, _, headers = _get(f"http://127.0.0.1:{port}/")
        assert status == 302 and "/login" in headers["Location"]
        status, body, _ = _get(f"http://127.0.0.1:{port}/_dash-layout")
        assert status == 401
        # Several requests, answered by the worker pool.
        assert all(_get(f"http://127.0.0.1:{port}/login")[0] == 200 for _ in range(6))
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert out.count("Booting worker") >= 2, out


def test_gunicorn_refuses_production_with_the_demo_secret(tmp_path: Path) -> None:
    from dashboard.app import DEMO_SECRET

    port = _free_port()
    r = subprocess.run([*GUNICORN, "--workers", "1", "--bind", f"127.0.0.1:{port}",
                        "dashboard.wsgi:create_server()"],
                       env=_env(tmp_path, ONTRACK_SECRET_KEY=DEMO_SECRET),
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert "ONTRACK_SECRET_KEY" in out and DEMO_SECRET not in out
    assert not (tmp_path / "prod.db").exists()  # refused before the store was opened


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_cli_runs_against_either_store(tmp_path: Path, kind: str) -> None:
    """The README's pipeline commands against the store named by ONTRACK_DATABASE_URL."""
    from tests.conftest import SAMPLE_INPUT, fresh_store

    with fresh_store(kind, tmp_path) as store:
        env = _env(tmp_path)
        env["ONTRACK_DATABASE_URL"] = store.url
        for args in (["ingest", str(SAMPLE_INPUT)], ["compute"], ["report"]):
            r = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], env=env,
                               capture_output=True, text=True, timeout=300, check=False)
            assert r.returncode == 0, r.stderr
        assert "recovered                 161   52.3%" in r.stdout
        assert store.counts()["administrations"] == 6968

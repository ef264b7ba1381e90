"""Settings: one object, from a TOML file and the environment.

Precedence, lowest first: built-in defaults, the TOML file (``ontrack.toml`` in the
working directory, or the file named by ``ONTRACK_CONFIG``), environment variables
``ONTRACK_<FIELD>`` (upper case). Secrets are read from the environment only.
Nothing is read at import time: call :func:`load_settings`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError

__all__ = ["Settings", "load_settings"]

_SECRET_FIELDS = frozenset({"secret_key", "export_key"})
#: Where things are and how they are served or guarded; none changes a result.
_OPERATIONAL = frozenset({"database_url", "data_dir", "inbox", "schedule_cron",
                          "environment", "login_max_failures", "login_window_seconds",
                          "proxy_hops", "max_file_bytes", "max_field_chars", "chunk_rows",
                          "compute_threads", "sqlite_bulk_cache_mb"})


@dataclass(frozen=True)
class Settings:
    """Every tunable of OnTrack, with the SPEC defaults."""

    #: SQLAlchemy URL of the store; default a SQLite file under ``data_dir``.
    database_url: str = ""
    #: Folder for the default store, the inbox and exports.
    data_dir: Path = Path("data")
    #: Time zone assumed for timestamps given without an offset (IANA name).
    timezone: str = "UTC"
    #: Administrations dated more than this many hours in the future are quarantined.
    future_tolerance_hours: float = 24.0
    #: GAD-7 caseness cut-off: 8 in NHS Talking Therapies, 10 in Spitzer et al. 2006.
    gad7_caseness: int = 8
    #: PCL-5 caseness cut-off: 31-33 in the literature; National Center for PTSD.
    pcl5_caseness: int = 33
    #: ``"fixed"`` (NHS Talking Therapies points) or ``"jt"`` (Jacobson & Truax RCI).
    reliable_change_method: str = "fixed"
    #: Significance level of the Jacobson-Truax RCI.
    rci_alpha: float = 0.05
    #: Depression and anxiety measures of the NHS Talking Therapies metrics (SPEC §5).
    depression_measure: str = "PHQ-9"
    anxiety_measure: str = "GAD-7"
    #: Expected recovery curves: upper tolerance percentile and minimum stratum size.
    curve_percentile: float = 0.75
    curve_min_stratum: int = 30
    #: Not on track is judged from this administration (k) on.
    not_on_track_from: int = 3
    #: Stalled: at least this many administrations over at least this many weeks ...
    stalled_min_administrations: int = 4
    stalled_min_weeks: float = 4.0
    #: ... and a slope above this (points per week; mirrored for higher-is-better).
    stalled_slope_per_week: float = -0.25
    #: Flags: a plan review is overdue after this many weeks without one.
    review_overdue_weeks: int = 6
    #: Flags: an open episode with no score for this many weeks.
    missing_measures_weeks: int = 4
    #: Response: at least this % reduction from baseline (NQF 1885).
    response_pct: float = 50.0
    #: Largest input file accepted, in bytes (hostile-input guard): a larger file is not
    #: parsed; its records are quarantined as ``file_too_large``.
    max_file_bytes: int = 2 * 1024**3
    #: Largest single field accepted, in characters (CSV or FHIR); a longer one is
    #: quarantined as ``field_too_large`` (as is one wider than its store column).
    max_field_chars: int = 10_000
    #: Rows per chunk when streaming a CSV through validation and scoring. Memory grows
    #: with it (~1.2 KB a row); each chunk's inserts touch most leaves of a large
    #: store's unique index, so fewer, larger chunks touch them fewer times (10M
    #: ingest: 200k rows 145-149 s, 500k 129-131 s, 1M 128 s).
    chunk_rows: int = 500_000
    #: Threads for the statistics of a full compute (parts of the episode x measure
    #: groups, computed side by side; the stored results do not depend on it). 0: one per CPU
    #: this process may use.
    compute_threads: int = 0
    #: SQLite page cache of an ingest's transaction, in MB, taken as pages are touched
    #: (the inserts into a large store's unique index re-read pages through SQLite's
    #: 2 MB default). Other transactions keep the default. 0: the default for ingest too.
    #: 512 MB holds the unique index of a 10M store's administrations.
    sqlite_bulk_cache_mb: int = 512
    #: Folder watched by ``ontrack run`` (processed/ and failed/ are made inside it).
    inbox: Path = Path("data/inbox")
    #: Cron expression of ``ontrack schedule`` (minute hour day month weekday).
    schedule_cron: str = "*/15 * * * *"
    #: Flask secret key for the dashboard (environment only).
    secret_key: str = field(default="", repr=False)
    #: ``"development"`` or ``"production"``: in production the dashboard refuses to start
    #: without its own secret key (>= 32 characters) and sends cookies over HTTPS only.
    environment: str = "development"
    #: Sign-in throttling: at most this many failed sign-ins per username and per client
    #: address within the window; further attempts are refused (HTTP 429) until it passes.
    login_max_failures: int = 5
    login_window_seconds: float = 60.0
    #: Reverse proxies in front of the dashboard whose ``X-Forwarded-For`` is trusted (0:
    #: none). Behind nginx set 1, or every user shares the proxy's address for throttling.
    proxy_hops: int = 0

    def threads(self) -> int:
        """:attr:`compute_threads`, or the CPUs this process may run on when 0."""
        if self.compute_threads > 0:
            return self.compute_threads
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
            os.cpu_count() or 1

    def caseness(self, setting: str | None, default: int | None) -> int | None:
        """A scale's caseness cut-off, overridden by the setting the registry names."""
        if setting and hasattr(self, setting):
            return int(getattr(self, setting))
        return default

    def fingerprint(self) -> str:
        """A digest of the settings that can change a statistic, a goal status or a flag
        (all but the secrets and :data:`_OPERATIONAL`): when it changes, the next compute
        is a full one. A new setting counts unless listed as operational, so forgetting
        to list one costs one full run, never a stale statistic or flag."""
        public = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.name not in _SECRET_FIELDS | _OPERATIONAL}
        text = json.dumps(public, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def resolved_database_url(self) -> str:
        """The database URL, defaulting to ``<data_dir>/ontrack.db`` (SQLite)."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'ontrack.db').as_posix()}"


def _coerce(name: str, raw: Any, target: Any) -> Any:
    try:
        if target is Path or target == "Path":
            return Path(raw)
        if target is bool or target == "bool":
            if isinstance(raw, bool):
                return raw
            return str(raw).strip().lower() in {"1", "true", "yes", "on"}
        if target is int or target == "int":
            return int(raw)
        if target is float or target == "float":
            return float(raw)
        return str(raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"setting {name!r} must be a {target}", value=raw, fix="correct the value"
        ) from exc


def load_settings(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """Build the settings from defaults, a TOML file, the environment and overrides.

    Parameters
    ----------
    path
        TOML file; default ``$ONTRACK_CONFIG`` or ``./ontrack.toml`` when it exists.
    env
        Environment mapping; default ``os.environ``.
    **overrides
        Explicit values (from the command line), applied last.
    """
    env = os.environ if env is None else env
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    values: dict[str, Any] = {}
    toml_path = Path(path) if path else Path(env.get("ONTRACK_CONFIG", "ontrack.toml"))
    if path and not toml_path.exists():
        raise ConfigError("settings file not found", file=str(toml_path))
    if toml_path.exists():
        try:
            data = tomllib.loads(toml_path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"settings file is not valid TOML: {exc}", file=str(toml_path)) from exc
        for key, raw in data.items():
            if key not in fields:
                raise ConfigError(
                    f"unknown setting {key!r}; known: {', '.join(sorted(fields))}",
                    file=str(toml_path),
                )
            if key in _SECRET_FIELDS:
                raise ConfigError(
                    f"{key!r} is a secret: set ONTRACK_{key.upper()} in the environment instead",
                    file=str(toml_path),
                )
            values[key] = _coerce(key, raw, fields[key].type)
    for name, f in fields.items():
        env_name = f"ONTRACK_{name.upper()}"
        if env_name in env:
            values[name] = _coerce(name, env[env_name], f.type)
    for name, raw in overrides.items():
        if name not in fields:
            raise ConfigError(f"unknown setting {name!r}")
        if raw is not None:
            values[name] = _coerce(name, raw, fields[name].type)
    settings = Settings(**values)
    if settings.reliable_change_method not in {"fixed", "jt"}:
        raise ConfigError(
            "reliable_change_method must be 'fixed' or 'jt'",
            value=settings.reliable_change_method,
        )
    if settings.environment not in {"development", "production"}:
        raise ConfigError("environment must be 'development' or 'production'",
                          value=settings.environment, fix="set ONTRACK_ENVIRONMENT")
    if settings.login_max_failures < 1 or not settings.login_window_seconds > 0:
        raise ConfigError("login_max_failures must be at least 1 and login_window_seconds "
                          "above 0", value=(settings.login_max_failures,
                                            settings.login_window_seconds))
    if settings.proxy_hops < 0:
        raise ConfigError("proxy_hops must be 0 or more", value=settings.proxy_hops)
    if settings.sqlite_bulk_cache_mb < 0:
        raise ConfigError("sqlite_bulk_cache_mb must be 0 (SQLite's default) or more",
                          value=settings.sqlite_bulk_cache_mb,
                          fix="set ONTRACK_SQLITE_BULK_CACHE_MB")
    if settings.compute_threads < 0:
        raise ConfigError("compute_threads must be 0 (one per CPU) or more",
                          value=settings.compute_threads, fix="set ONTRACK_COMPUTE_THREADS")
    # A zero or negative limit would reject every file or field (or loop on empty chunks).
    for name in ("max_file_bytes", "max_field_chars", "chunk_rows"):
        if getattr(settings, name) < 1:
            raise ConfigError(f"setting {name!r} must be a positive whole number",
                              value=getattr(settings, name), fix="correct the value")
    return settings

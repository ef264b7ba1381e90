"""The unattended cycle: inbox -> ingest -> compute -> flags, one at a time.

- :func:`run_cycle` takes every new file of the inbox, ingests it (a file whose content
  was already ingested is skipped and reported), moves it to ``processed/`` or
  ``failed/`` (with a ``.reason.txt`` beside it), recomputes the affected episodes and
  records the run in ``job_runs``.
- :class:`CycleLock` makes cycles exclusive across processes with ``flock``: the kernel
  drops the lock when its holder dies, even by SIGKILL, so a crashed cycle never blocks
  the next one.
- A cycle killed mid-file loses nothing: a file is moved only after its batch committed,
  and a batch is one transaction; the next cycle ingests the file again (or, if it was
  committed but not yet moved, recognises its content hash and moves it).
- :func:`schedule` runs cycles on a cron expression with APScheduler 3 (one instance at a
  time; a cycle still running when the next is due is skipped and logged). SIGTERM and
  SIGINT let the current file's transaction finish, then stop.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow
import sqlalchemy as sa

from pipeline.compute import compute
from pipeline.config import Settings
from pipeline.errors import AlreadyRunning, JobError, StoreError
from pipeline.ingest.batch import content_hash, ingest_paths, plan_files
from pipeline.scales import Registry
from pipeline.store import Store, batches, job_runs, utcnow

__all__ = ["CycleLock", "CycleResult", "inbox_files", "run_cycle", "schedule"]

log = logging.getLogger("ontrack.jobs")


@contextmanager
def CycleLock(path: Path, wait: bool = False) -> Iterator[None]:
    """Hold the cycle lock (``flock`` on ``path``) for the duration of the block.

    Raises
    ------
    AlreadyRunning
        When another process holds it and ``wait`` is False.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError as exc:
            raise AlreadyRunning("another cycle is running; try again later",
                                 lock=str(path)) from exc
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@dataclass
class CycleResult:
    """What one cycle did."""

    run_id: int
    status: str
    files: list[dict[str, Any]] = field(default_factory=list)
    records: int = 0
    accepted: int = 0
    duplicates: int = 0
    quarantined: int = 0
    flags_raised: int = 0
    compute_run_id: int | None = None
    error: str | None = None
    #: seconds: ``ingest`` (every file), ``compute`` (its steps, as ``ontrack compute``
    #: reports them; absent when nothing was ingested).
    timings: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def inbox_files(inbox: Path) -> list[Path]:
    """Files waiting in the inbox (not the processed/failed folders, dotfiles or reasons)."""
    return sorted(p for p in inbox.iterdir() if p.is_file() and not p.name.startswith(".")
                  and not p.name.endswith(".reason.txt"))


def _move(path: Path, folder: Path, reason: str | None) -> Path:
    folder.mkdir(exist_ok=True)
    target = folder / path.name
    n = 1
    while target.exists():  # never overwrite an earlier file of the same name
        target = folder / f"{path.stem}.{n}{path.suffix}"
        n += 1
    shutil.move(str(path), target)
    if reason:
        target.with_name(target.name + ".reason.txt").write_text(reason + "\n",
                                                                 encoding="utf-8")
    return target


def stop_on_signals(stop: threading.Event) -> None:
    """SIGTERM and SIGINT set ``stop``: the file being ingested is finished, then the
    job stops (call from the main thread).

    Arrow's own handlers are turned off for the process: while Arrow reads a CSV chunk
    they would take the signal and cancel the read (``ArrowCancelled``), failing the
    file instead of finishing it.
    """
    pyarrow.enable_signal_handlers(False)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())


def run_cycle(settings: Settings, registry: Registry, *, inbox: Path | None = None,
              stop: threading.Event | None = None, trigger: str = "manual",
              wait: bool = False, now: datetime | None = None,
              progress: Callable[[list[Path]], Any] | None = None) -> CycleResult:
    """One cycle. See the module docstring.

    Raises
    ------
    JobError
        Inbox missing or unreadable; AlreadyRunning when another cycle holds the lock.
    StoreError
        Store unreachable.
    """
    inbox = Path(inbox or settings.inbox)
    if not inbox.is_dir() or not os.access(inbox, os.R_OK | os.X_OK):
        raise JobError("inbox folder is missing or unreadable", inbox=str(inbox),
                       fix="create it or set ONTRACK_INBOX / --inbox")
    store = Store(settings.resolved_database_url, settings.sqlite_bulk_cache_mb)
    store.init()
    with CycleLock(settings.data_dir / "ontrack.lock", wait=wait):
        with store.transaction() as conn:
            run_id = int(conn.execute(job_runs.insert().values(
                started_at=utcnow(), status="running", trigger=trigger, records=0,
                accepted=0, duplicates=0, quarantined=0, flags_raised=0))
                .inserted_primary_key[0])  # type: ignore[index]
        result = CycleResult(run_id=run_id, status="running")
        log.info("cycle started", extra={"run_id": run_id, "inbox": str(inbox)})
        try:
            files = plan_files(inbox_files(inbox), settings, registry)
            iterator = progress(files) if progress else files
            ingested_any = False
            t0 = time.perf_counter()
            for path in iterator:
                if stop is not None and stop.is_set():
                    result.status = "stopped"
                    break
                result.files.append(_one_file(store, settings, registry, path, inbox,
                                              result, now))
                ingested_any |= result.files[-1]["outcome"] == "ingested"
            result.timings["ingest"] = round(time.perf_counter() - t0, 3)
            if ingested_any and result.status != "stopped":
                rep = compute(store, settings, registry, now=now)
                result.compute_run_id = rep.run_id
                result.flags_raised += rep.flags.get("raised", 0)
                result.timings["compute"] = rep.as_dict()["timings"]
            if result.status == "running":
                result.status = "done"
        except (StoreError, sa.exc.OperationalError) as exc:
            result.status, result.error = "failed", str(exc)
            raise
        finally:
            with store.transaction() as conn:
                conn.execute(job_runs.update().where(job_runs.c.run_id == run_id).values(
                    finished_at=utcnow(), status=result.status,
                    files=json.dumps(result.files), records=result.records,
                    accepted=result.accepted, duplicates=result.duplicates,
                    quarantined=result.quarantined, flags_raised=result.flags_raised,
                    compute_run_id=result.compute_run_id, error=result.error))
            log.info("cycle finished", extra={
                "run_id": run_id, "status": result.status, "files": len(result.files),
                "records": result.records, "accepted": result.accepted,
                "quarantined": result.quarantined, "flags_raised": result.flags_raised})
    return result


def _one_file(store: Store, settings: Settings, registry: Registry, path: Path, inbox: Path,
              result: CycleResult, now: datetime | None) -> dict[str, Any]:
    digest = content_hash(path)
    with store.engine.connect() as conn:
        seen = conn.execute(sa.select(batches.c.batch_id).where(
            (batches.c.content_hash == digest) & (batches.c.status == "committed"))
            .order_by(batches.c.batch_id).limit(1)).scalar()
    if seen is not None:
        moved = _move(path, inbox / "processed", f"already ingested as batch {seen}; skipped")
        log.info("file %s skipped: content already ingested", path.name,
                 extra={"file": path.name})
        return {"file": path.name, "outcome": "already_ingested", "batch_id": int(seen),
                "moved_to": str(moved)}
    rep = ingest_paths([path], store, settings, registry, now=now).files[0]
    result.records += rep.records
    result.accepted += rep.accepted
    result.duplicates += rep.duplicates
    result.quarantined += rep.quarantined
    result.flags_raised += rep.risk_flags
    if rep.status == "committed":
        moved = _move(path, inbox / "processed", None)
        outcome = "ingested"
    else:
        moved = _move(path, inbox / "failed", rep.error or "file could not be read")
        outcome = "failed"
    log.info("file %s %s: %d records, %d accepted, %d quarantined", path.name, outcome,
             rep.records, rep.accepted, rep.quarantined,
             extra={"file": path.name, "records": rep.records,
                                         "accepted": rep.accepted,
                                         "quarantined": rep.quarantined})
    return {"file": path.name, "outcome": outcome, "batch_id": rep.batch_id,
            "records": rep.records, "accepted": rep.accepted, "duplicates": rep.duplicates,
            "quarantined": rep.quarantined, "by_reason": dict(rep.by_reason),
            "moved_to": str(moved), "error": rep.error}


def schedule(settings: Settings, registry: Registry, *, trigger: Any = None,
             stop: threading.Event | None = None,
             cycle: Callable[[threading.Event], Any] | None = None) -> None:
    """Run cycles on ``settings.schedule_cron`` until SIGTERM/SIGINT (or ``stop``).

    ``trigger`` (an APScheduler trigger) and ``cycle`` replace the cron and the real
    cycle in tests.
    """
    from apscheduler.events import EVENT_JOB_MAX_INSTANCES
    from apscheduler.schedulers.background import BackgroundScheduler
    from apscheduler.triggers.cron import CronTrigger

    stop = stop or threading.Event()
    trig = trigger or CronTrigger.from_crontab(settings.schedule_cron)

    def job() -> None:
        try:
            if cycle is not None:
                cycle(stop)
            else:
                run_cycle(settings, registry, stop=stop, trigger="schedule")
        except AlreadyRunning:
            log.warning("cycle skipped: another cycle holds the lock")
        except JobError as exc:
            log.error("cycle could not run: %s", exc)

    sched = BackgroundScheduler(job_defaults={"max_instances": 1, "coalesce": True,
                                              "misfire_grace_time": 60})
    sched.add_listener(lambda _e: log.warning("cycle skipped: the previous one is still "
                                              "running"), EVENT_JOB_MAX_INSTANCES)
    sched.add_job(job, trig, id="cycle")
    if threading.current_thread() is threading.main_thread():
        stop_on_signals(stop)
    sched.start()
    log.info("scheduler started", extra={"cron": settings.schedule_cron})
    try:
        stop.wait()
    finally:
        sched.shutdown(wait=True)  # lets a running cycle finish its current file
        log.info("scheduler stopped")


def next_run(settings: Settings) -> datetime | None:
    """When ``ontrack schedule`` would next start a cycle (naive UTC)."""
    from apscheduler.triggers.cron import CronTrigger

    trig = CronTrigger.from_crontab(settings.schedule_cron, timezone="UTC")
    nxt = trig.get_next_fire_time(None, datetime.now(trig.timezone))
    return nxt.replace(tzinfo=None) if nxt else None


class JsonFormatter(logging.Formatter):
    """One JSON object per line for log shippers (identifiers are never logged)."""

    _SKIP = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message"}

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": datetime.fromtimestamp(record.created).isoformat(timespec="seconds"),
               "level": record.levelname, "logger": record.name,
               "message": record.getMessage()}
        out.update({k: v for k, v in record.__dict__.items() if k not in self._SKIP})
        return json.dumps(out, default=str)


def configure_logging(fmt: str = "text") -> None:
    """Log to stderr: plain lines, or JSON lines with ``fmt="json"``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("ontrack")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)

"""The ``ontrack`` command line: a thin layer over the pipeline modules."""

from __future__ import annotations

import argparse
import gc
import getpass
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.config import Settings, load_settings
from pipeline.errors import OnTrackError, UsageError
from pipeline.scales import load_registry
from pipeline.store import Store

__all__ = ["main"]


def _store(settings: Settings) -> Store:
    store = Store(settings.resolved_database_url, settings.sqlite_bulk_cache_mb)
    store.init()
    return store


def cmd_init(args: argparse.Namespace, settings: Settings) -> int:
    store = Store(settings.resolved_database_url, settings.sqlite_bulk_cache_mb)
    version = store.init()
    print(f"store ready: {store.safe_url} (schema version {version})")
    return 0


def cmd_scales(args: argparse.Namespace, settings: Settings) -> int:
    reg = load_registry()
    if args.json:
        print(json.dumps([{
            "code": s.code, "name": s.name, "items": s.items,
            "item_range": [s.item_min, s.item_max], "total_range": [s.total_min, s.total_max],
            "direction": s.direction, "caseness": s.caseness_cutoff,
            "caseness_comparison": s.caseness_comparison,
            "reliable_change_points": s.reliable_change_points,
            "reliability": s.reliability, "risk_items": list(s.risk_items),
            "max_missing": s.max_missing, "bands": [b.label for b in s.bands],
        } for s in reg.values()], indent=2))
        return 0
    print(f"{'code':8} {'items':>5} {'range':>7} {'direction':17} {'caseness':>9} "
          f"{'RC pts':>6} {'r':>5}  risk items")
    for s in reg.values():
        cas = f"{s.caseness_comparison}{s.caseness_cutoff}" if s.caseness_cutoff is not None \
            else "-"
        rc = str(s.reliable_change_points) if s.reliable_change_points is not None else "-"
        rel = f"{s.reliability:.2f}" if s.reliability is not None else "-"
        risk = ",".join(map(str, s.risk_items)) or "-"
        print(f"{s.code:8} {s.items:>5} {s.total_min:>3}-{s.total_max:<3} {s.direction:17} "
              f"{cas:>9} {rc:>6} {rel:>5}  {risk}")
    return 0


def cmd_ingest(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.ingest.batch import ingest_paths

    store = _store(settings)
    t0 = time.perf_counter()
    report = ingest_paths(args.paths, store, settings, load_registry())
    elapsed = time.perf_counter() - t0
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
        return 0
    d = report.as_dict()
    for f in d["files"]:
        line = (f"{f['status']:9} {f['kind'] or '?':15} {f['records']:>7} records: "
                f"{f['accepted']} accepted, {f['duplicates']} duplicate, "
                f"{f['quarantined']} quarantined  {f['file']}")
        print(line)
        if f["error"]:
            print(f"          error: {f['error']}")
        if f["extra_columns"]:
            print(f"          extra columns kept aside (not used): {f['extra_columns']}")
    print(f"total: {d['records']} records = {d['accepted']} accepted + {d['duplicates']} "
          f"duplicates + {d['quarantined']} quarantined ({elapsed:.1f} s)")
    if d["by_reason"]:
        print("quarantined by reason: " + ", ".join(f"{k} {v}" for k, v in d["by_reason"].items()))
    if d["warnings"]:
        print("warnings: " + ", ".join(f"{k} {v}" for k, v in d["warnings"].items()))
    return 0


def cmd_synth(args: argparse.Namespace, settings: Settings) -> int:
    from dataclasses import replace

    from pipeline.synth import SynthConfig, default_sample_config, write_sample

    cfg = default_sample_config() if args.sample else SynthConfig()
    changes = {k: v for k, v in (("episodes", args.episodes), ("seed", args.seed),
                                 ("therapists", args.therapists),
                                 ("faulty_rows", args.faulty_rows)) if v is not None}
    cfg = replace(cfg, **changes)
    data = write_sample(Path(args.out), cfg)
    print(f"wrote {len(data.episodes)} episodes, {len(data.administrations)} administrations "
          f"to {args.out}/input (truth in {args.out}/truth)")
    return 0


def cmd_summary(args: argparse.Namespace, settings: Settings) -> int:
    store = _store(settings)
    counts = store.counts()
    if args.json:
        print(json.dumps(counts, indent=2))
    else:
        print(f"store {store.safe_url}")
        for k, v in counts.items():
            print(f"  {k:16} {v:>9}")
    return 0


def cmd_compute(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.compute import compute

    if args.engine == "dask" or args.parquet:
        return _compute_parquet(args, settings)
    store = _store(settings)
    rep = compute(store, settings, load_registry(), full=args.full,
                  keep_reference=args.keep_reference)
    if args.json:
        print(json.dumps(rep.as_dict(), indent=2))
    else:
        t = rep.timings
        print(f"compute run {rep.run_id} ({rep.mode}): {rep.episodes} episodes, "
              f"{rep.outcome_rows} episode x measure outcomes, {rep.sudden_rows} sudden "
              f"gains/losses; reference {'rebuilt' if rep.reference_rebuilt else 'kept'}; "
              f"{t['total']:.2f} s (read {t['read']:.2f}, group {t['group']:.2f}, "
              f"reference {t['reference']:.2f}, "
              f"statistics {t['statistics']:.2f}, write {t['write']:.2f}, "
              f"flags {t['flags']:.2f})")
        fl = rep.flags
        print(f"flags: {fl.get('raised', 0)} raised, {fl.get('reopened', 0)} reopened, "
              f"{fl.get('updated', 0)} still firing, {fl.get('resolved', 0)} resolved "
              "(ontrack flags lists the open ones)")
    return 0


def _compute_parquet(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.distributed import compute_parquet

    if args.engine == "dask":
        try:
            import distributed  # noqa: F401
        except ImportError as exc:
            raise UsageError("the Dask engine needs dask and distributed",
                             fix="pip install 'ontrack[dask]'") from exc
    dataset = Path(args.parquet) if args.parquet else settings.data_dir / "parquet"
    if not args.parquet:
        _write_dataset(settings, dataset, args.partitions)
    out = Path(args.out) if args.out else settings.data_dir / "results"
    res = compute_parquet(dataset, out, settings, load_registry(), engine=args.engine,
                          scheduler=args.scheduler, workers=args.workers)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        t = res["timings"]
        print(f"{res['engine']} engine over {res['partitions']} partitions: "
              f"{res['outcome_rows']} episode x measure outcomes, {res['sudden_rows']} "
              f"sudden gains/losses in {out} (reference {t['reference']:.2f} s, outcomes "
              f"{t['outcomes']:.2f} s)")
    return 0


def _write_dataset(settings: Settings, out: Path, partitions: int) -> None:
    from pipeline.parquet import write_parquet_dataset

    meta = write_parquet_dataset(_store(settings), out, partitions=partitions)
    print(f"wrote {meta['rows']} administrations of {meta['episodes']} episodes to "
          f"{out} ({meta['partitions']} partitions by episode)")


def cmd_export_parquet(args: argparse.Namespace, settings: Settings) -> int:
    _write_dataset(settings, Path(args.out), args.partitions)
    return 0


def cmd_report(args: argparse.Namespace, settings: Settings) -> int:
    from datetime import date

    from pipeline.report import service_report

    store = _store(settings)
    rep = service_report(store, settings, load_registry(), team=args.team,
                         therapist=args.therapist,
                         date_from=date.fromisoformat(args.date_from) if args.date_from else None,
                         date_to=date.fromisoformat(args.date_to) if args.date_to else None)
    if args.json:
        print(json.dumps(rep, indent=2))
        return 0
    print(f"finished episodes {rep['finished_episodes']}, at caseness {rep['at_caseness']}")
    for m in ("recovered", "reliably_improved", "reliably_deteriorated", "reliably_recovered"):
        rate = rep[f"{m}_rate"]
        if rate is None:
            print(f"  {m:22} {rep[m]:>6}   -")
            continue
        print(f"  {m:22} {rep[m]:>6}  {100 * rate:5.1f}%  (95% CI "
              f"{100 * rep[m + '_ci_low']:.1f}-{100 * rep[m + '_ci_high']:.1f}%)")
    return 0


def cmd_review(args: argparse.Namespace, settings: Settings) -> int:
    import getpass
    from datetime import date

    from pipeline.reviews import record_review

    store = _store(settings)
    new_goals = None
    if args.goals:
        import pandas as pd

        raw = pd.read_csv(args.goals, dtype="str", keep_default_na=False)
        due = raw.get("due", pd.Series("", index=raw.index))
        new_goals = raw.assign(
            due_date=due.where(~due.str.startswith("session:"), None).replace("", None),
            due_session=pd.to_numeric(due.str.removeprefix("session:")
                                      .where(due.str.startswith("session:")), errors="coerce"),
            target=pd.to_numeric(raw["target"]))
    res = record_review(store, args.episode, reviewer=args.reviewer or getpass.getuser(),
                        decision=args.decision, note=args.note,
                        next_review=date.fromisoformat(args.next_review)
                        if args.next_review else None,
                        risk_assessed=args.risk_assessed, new_goals=new_goals)
    out = {"review_id": res.review_id, "episode_id": args.episode,
           "flags_acknowledged": res.flags_acknowledged, "plan_version": res.plan_version}
    print(json.dumps(out) if args.json else
          f"review {res.review_id} recorded for episode {args.episode}: "
          f"{res.flags_acknowledged} open flags acknowledged"
          + (f"; plan version {res.plan_version}" if res.plan_version else ""))
    return 0


def cmd_flags(args: argparse.Namespace, settings: Settings) -> int:
    import sqlalchemy as sa

    from pipeline.compute import last_clock
    from pipeline.store import episodes, flags

    store = _store(settings)
    q = sa.select(flags, episodes.c.therapist_id).join(
        episodes, episodes.c.episode_id == flags.c.episode_id)
    if not args.all:
        q = q.where(flags.c.state == "open")
    if args.episode:
        q = q.where(flags.c.episode_id == args.episode)
    if args.therapist:
        q = q.where(episodes.c.therapist_id == args.therapist)
    order = sa.case({"urgent": 0, "review": 1, "info": 2}, value=flags.c.severity)
    q = q.order_by(order, flags.c.episode_id, flags.c.kind, flags.c.key)
    with store.engine.connect() as conn:
        rows = conn.execute(q).mappings().all()
        as_of = last_clock(conn)

    def last_seen(r: Any) -> str:
        # A live flag holds as of the latest run; its stored last_seen is its last write.
        seen = r["last_seen"]
        if r["state"] != "resolved" and as_of is not None and as_of > seen:
            seen = as_of
        return str(seen.isoformat())

    items = [{
        "flag_id": r["flag_id"], "kind": r["kind"], "severity": r["severity"],
        "episode_id": r["episode_id"], "therapist_id": r["therapist_id"],
        "measure": r["measure"] or None, "state": r["state"], "rule": r["rule"],
        "message": r["message"], "evidence": json.loads(r["evidence"]),
        "first_raised": r["first_raised"].isoformat(), "last_seen": last_seen(r),
    } for r in rows]
    if args.json:
        print(json.dumps(items, indent=2))
    else:
        for it in items:
            print(f"{it['severity']:7} {it['kind']:22} {it['episode_id']:10} "
                  f"{it['measure'] or '':8} {it['message']}")
        print(f"{len(items)} flags")
    return 0


def cmd_evaluate_flags(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.evaluation import evaluate_flags

    res = evaluate_flags(load_registry(), settings, episodes=args.episodes, seed=args.seed)
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    c = res["cohort"]
    print(f"synthetic cohort: {c['episodes']} episodes (seed {c['seed']}), {c['cases']} cases "
          f"(non-responders + deteriorators), {c['therapists']} therapists over "
          f"{c['weeks']} weeks; reference from seed {c['training_seed']}")
    print(f"{'rule':24} {'sens':>6} {'spec':>6} {'TP':>5} {'FN':>5} {'FP':>5} {'TN':>5} "
          f"{'lead (sessions)':>16} {'flags/therapist/week':>21}")
    for r in res["rules"]:
        lead = r["median_sessions_before_end"]
        print(f"{r['rule']:24} {r['sensitivity']:6.2f} {r['specificity']:6.2f} {r['tp']:5d} "
              f"{r['fn']:5d} {r['fp']:5d} {r['tn']:5d} "
              f"{'-' if lead is None else f'{lead:.0f}':>16} "
              f"{r['flags_per_therapist_week']:21.2f}")
    return 0


def cmd_default_curves(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.evaluation import write_default_curves
    from pipeline.stats.curves import DEFAULT_CURVES

    out = args.out or str(DEFAULT_CURVES)
    curves = write_default_curves(out, load_registry(), settings)
    print(f"wrote {len(curves)} curve points to {out}")
    return 0


def cmd_users(args: argparse.Namespace, settings: Settings) -> int:
    import getpass
    import os

    from pipeline import users

    store = _store(settings)
    if args.action == "list":
        for u in users.list_users(store):
            print(f"{u.username:20} {u.role:10} {u.therapist_id or '-':10} "
                  f"{'active' if u.active else 'disabled'}")
        return 0
    if not args.username:
        raise UsageError("a username is required")
    if args.action == "add":
        password = os.environ.get("ONTRACK_NEW_PASSWORD") or getpass.getpass(
            f"password for {args.username}: ")
        u = users.add_user(store, args.username, password, args.role, args.therapist_id)
        print(f"user {u.username} added ({u.role})")
    else:
        users.set_active(store, args.username, args.action == "enable")
        print(f"user {args.username} {args.action}d")
    return 0


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from dashboard.app import create_app

    # In production without a proper secret key this raises ConfigError (exit 2) before
    # the store is opened or a port bound.
    app = create_app(settings)
    print(f"OnTrack dashboard on http://{args.host}:{args.port} ({settings.environment})")
    # Never Dash's debug mode or dev tools (whatever DASH_* variables say): they send
    # tracebacks to the browser.
    app.run(host=args.host, port=args.port, debug=False, dev_tools_ui=False,
            dev_tools_props_check=False, dev_tools_hot_reload=False,
            dev_tools_serve_dev_bundles=False)
    return 0


def cmd_demo_users(args: argparse.Namespace, settings: Settings) -> int:
    import sqlalchemy as sa

    from pipeline import users
    from pipeline.store import episodes

    store = _store(settings)
    with store.engine.connect() as conn:
        therapist = conn.execute(sa.select(episodes.c.therapist_id).where(
            episodes.c.end_date.is_(None)).group_by(episodes.c.therapist_id)
            .order_by(sa.func.count().desc()).limit(1)).scalar()
    existing = {u.username for u in users.list_users(store)}
    print("demo users (for the synthetic sample only):")
    for name, role, tid in (("therapist", "therapist", therapist), ("director", "director", None),
                            ("researcher", "researcher", None), ("admin", "admin", None)):
        password = f"demo-{name}-password"
        if name not in existing:
            users.add_user(store, name, password, role, tid)
        print(f"  {name:11} / {password}" + (f"  (therapist {tid})" if tid else ""))
    return 0


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.errors import AlreadyRunning
    from pipeline.jobs import run_cycle, stop_on_signals

    def progress(files: list[Path]) -> Any:
        if not sys.stderr.isatty():
            return files
        from tqdm import tqdm

        return tqdm(files, desc="ingest", unit="file")

    import threading

    stop = threading.Event()  # SIGTERM/SIGINT: finish the current file, then stop
    stop_on_signals(stop)
    try:
        res = run_cycle(settings, load_registry(), inbox=Path(args.inbox) if args.inbox
                        else None, wait=args.wait, progress=progress, stop=stop)
    except AlreadyRunning as exc:
        print(f"ontrack: already running: {exc}", file=sys.stderr)
        return 3
    if args.json:
        print(json.dumps(res.as_dict(), indent=2))
    else:
        print(f"cycle {res.run_id} {res.status}: {len(res.files)} files, {res.records} "
              f"records = {res.accepted} accepted + {res.duplicates} duplicates + "
              f"{res.quarantined} quarantined; {res.flags_raised} flags raised")
        for f in res.files:
            print(f"  {f['outcome']:17} {f['file']}" + (f"  ({f['error']})"
                                                        if f.get("error") else ""))
    return 0


def cmd_schedule(args: argparse.Namespace, settings: Settings) -> int:
    from dataclasses import replace

    from pipeline.jobs import schedule

    if args.cron:
        settings = replace(settings, schedule_cron=args.cron)
    print(f"scheduling cycles on '{settings.schedule_cron}' (inbox {settings.inbox}); "
          "SIGTERM or Ctrl-C stops after the current file", file=sys.stderr)
    schedule(settings, load_registry())
    return 0


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    import sqlalchemy as sa

    from pipeline.jobs import inbox_files, next_run
    from pipeline.store import flags, job_runs

    store = _store(settings)
    with store.engine.connect() as conn:
        runs = conn.execute(sa.select(job_runs).order_by(job_runs.c.run_id.desc()).limit(5)) \
            .mappings().all()
        by_kind: dict[Any, Any] = dict(conn.execute(sa.select(flags.c.kind, sa.func.count()).where(
            flags.c.state == "open").group_by(flags.c.kind)).all())
    inbox = Path(settings.inbox)
    waiting = len(inbox_files(inbox)) if inbox.is_dir() else None
    db = settings.data_dir / "ontrack.db"
    size = db.stat().st_size if store.dialect == "sqlite" and db.exists() else None
    nxt = next_run(settings)
    out: dict[str, Any] = {
        "last_runs": [{"run_id": r["run_id"], "status": r["status"], "trigger": r["trigger"],
                       "started_at": r["started_at"].isoformat(),
                       "finished_at": r["finished_at"].isoformat() if r["finished_at"]
                       else None, "files": len(json.loads(r["files"] or "[]")),
                       "records": r["records"], "accepted": r["accepted"],
                       "quarantined": r["quarantined"], "flags_raised": r["flags_raised"],
                       "error": r["error"]} for r in runs],
        "next_scheduled_run": nxt.isoformat() if nxt else None,
        "schedule_cron": settings.schedule_cron,
        "inbox": str(inbox), "files_waiting": waiting,
        "open_flags_by_kind": {str(k): int(v) for k, v in sorted(by_kind.items())},
        "store": store.safe_url, "store_bytes": size,
    }
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"store {out['store']}" + (f" ({size / 1e6:.1f} MB)" if size else ""))
    print(f"inbox {inbox}: {waiting if waiting is not None else 'missing'} files waiting")
    print(f"next scheduled run {out['next_scheduled_run']} ('{settings.schedule_cron}')")
    print("open flags: " + (", ".join(f"{k} {v}" for k, v in out["open_flags_by_kind"].items())
                            or "none"))
    for r in out["last_runs"]:
        print(f"  run {r['run_id']:>4} {r['status']:8} {r['started_at']} {r['files']} files, "
              f"{r['records']} records, {r['flags_raised']} flags raised")
    return 0


def cmd_export(args: argparse.Namespace, settings: Settings) -> int:
    from datetime import date

    from pipeline.export import export_dataset

    store = _store(settings)
    res = export_dataset(
        store, settings, load_registry(), Path(args.out),
        date_from=date.fromisoformat(args.date_from) if args.date_from else None,
        date_to=date.fromisoformat(args.date_to) if args.date_to else None,
        measures=args.measures.split(",") if args.measures else None, k=args.k,
        fmt=args.format, requested_by=args.user or f"cli:{getpass.getuser()}", source="cli")
    m = res.manifest
    print(f"exported {m['rows']['episodes']} episodes and {m['rows']['administrations']} "
          f"administrations to {args.out}; k={m['parameters']['k']} achieved "
          f"{m['k_achieved']}; generalised: {', '.join(m['generalisation']) or 'nothing'}; "
          f"{m['records_suppressed']} records suppressed")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ontrack", description=(
        "OnTrack: outcome monitoring for measurement-based psychotherapy."))
    p.add_argument("--version", action="version", version=f"ontrack {__version__}")
    p.add_argument("--config", help="settings TOML file (default ./ontrack.toml)")
    p.add_argument("--log-format", choices=["text", "json"], default="text",
                   help="log lines on stderr: plain text or JSON (for log shippers)")
    p.add_argument("--database-url", help="SQLAlchemy URL (default env ONTRACK_DATABASE_URL "
                   "or sqlite:///data/ontrack.db)")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("init", help="create the store schema (idempotent)")
    s.set_defaults(func=cmd_init)

    s = sub.add_parser("scales", help="list the scale registry")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_scales)

    s = sub.add_parser("ingest", help="ingest CSV / FHIR files or directories")
    s.add_argument("paths", nargs="+")
    s.add_argument("--json", action="store_true", help="print exactly one JSON object")
    s.set_defaults(func=cmd_ingest)

    s = sub.add_parser("synth", help="write a seeded synthetic dataset")
    s.add_argument("--out", required=True)
    s.add_argument("--episodes", type=int)
    s.add_argument("--therapists", type=int)
    s.add_argument("--seed", type=int)
    s.add_argument("--faulty-rows", type=int)
    s.add_argument("--sample", action="store_true",
                   help="the configuration of the committed data/sample")
    s.set_defaults(func=cmd_synth)

    s = sub.add_parser("compute", help="compute outcomes (incremental unless --full)")
    s.add_argument("--full", action="store_true", help="recompute every episode and "
                   "rebuild the reference (baseline SDs, expected recovery curves)")
    s.add_argument("--keep-reference", action="store_true",
                   help="with --full: keep the stored reference")
    s.add_argument("--engine", choices=["pandas", "dask"], default="pandas",
                   help="dask: the statistics over a Parquet dataset partitioned by "
                   "episode, on a dask.distributed cluster (results to --out)")
    s.add_argument("--parquet", help="dataset folder (ontrack export-parquet); default: "
                   "written from the store into <data_dir>/parquet")
    s.add_argument("--out", help="results folder for --engine dask or --parquet "
                   "(default <data_dir>/results)")
    s.add_argument("--scheduler", help="address of a Dask scheduler, e.g. "
                   "tcp://10.0.0.5:8786 (default: a LocalCluster)")
    s.add_argument("--workers", type=int, default=2,
                   help="LocalCluster worker processes (default 2)")
    s.add_argument("--partitions", type=int, default=8,
                   help="partitions when writing the dataset from the store")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_compute)

    s = sub.add_parser("export-parquet", help="scored administrations as Parquet "
                       "partitioned by episode (input of compute --engine dask)")
    s.add_argument("--out", required=True)
    s.add_argument("--partitions", type=int, default=8)
    s.set_defaults(func=cmd_export_parquet)

    s = sub.add_parser("report", help="service outcomes (SPEC §5) with Wilson intervals")
    s.add_argument("--json", action="store_true")
    s.add_argument("--team")
    s.add_argument("--therapist")
    s.add_argument("--from", dest="date_from", help="episodes ended on/after (YYYY-MM-DD)")
    s.add_argument("--to", dest="date_to", help="episodes ended on/before (YYYY-MM-DD)")
    s.set_defaults(func=cmd_report)

    s = sub.add_parser("review", help="record a plan review (acknowledges open flags)")
    s.add_argument("episode")
    s.add_argument("--decision", required=True,
                   choices=["continue", "revise", "step_up", "step_down", "refer", "discharge"])
    s.add_argument("--note")
    s.add_argument("--next-review", help="YYYY-MM-DD")
    s.add_argument("--reviewer", help="default: the login name")
    s.add_argument("--risk-assessed", action="store_true",
                   help="risk was assessed: also acknowledge open risk-item flags")
    s.add_argument("--goals", help="with --decision revise: CSV of the new goals "
                   "(goal_id, measure, kind, target, due[, sustain, description])")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_review)

    s = sub.add_parser("flags", help="list flags (open by default)")
    s.add_argument("--json", action="store_true")
    s.add_argument("--episode")
    s.add_argument("--therapist")
    s.add_argument("--all", action="store_true", help="include acknowledged and resolved")
    s.set_defaults(func=cmd_flags)

    s = sub.add_parser("evaluate-flags", help="sensitivity/specificity of the flag rules "
                       "on a synthetic cohort with known trajectories")
    s.add_argument("--episodes", type=int, default=1500)
    s.add_argument("--seed", type=int, default=4242)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_evaluate_flags)

    s = sub.add_parser("default-curves", help="rebuild the shipped default expected "
                       "recovery curves from a synthetic cohort")
    s.add_argument("--out", help="default: the package's default_curves.csv")
    s.set_defaults(func=cmd_default_curves)

    s = sub.add_parser("users", help="manage dashboard users (password from a prompt or "
                       "ONTRACK_NEW_PASSWORD, never an argument)")
    s.add_argument("action", choices=["add", "list", "disable", "enable"])
    s.add_argument("username", nargs="?")
    s.add_argument("--role", choices=["therapist", "director", "researcher", "admin"],
                   default="therapist")
    s.add_argument("--therapist-id")
    s.set_defaults(func=cmd_users)

    s = sub.add_parser("serve", help="serve the dashboard")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8050)
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("demo-users", help="create one demo user per role (sample data only)")
    s.set_defaults(func=cmd_demo_users)

    s = sub.add_parser("run", help="one cycle: ingest the inbox, compute, refresh flags")
    s.add_argument("--inbox", help="default ONTRACK_INBOX or data/inbox")
    s.add_argument("--wait", action="store_true", help="wait for a running cycle instead "
                   "of exiting with 'already running' (exit code 3)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("schedule", help="run cycles on a cron expression (APScheduler)")
    s.add_argument("--cron", help="default: the schedule_cron setting, '*/15 * * * *'")
    s.set_defaults(func=cmd_schedule)

    s = sub.add_parser("status", help="last runs, next run, files waiting, open flags")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("export", help="anonymised research export (SPEC §10); key from "
                       "ONTRACK_EXPORT_KEY, else random and never stored")
    s.add_argument("--out", required=True)
    s.add_argument("--from", dest="date_from", help="episodes started on/after YYYY-MM-DD")
    s.add_argument("--to", dest="date_to", help="episodes started on/before YYYY-MM-DD")
    s.add_argument("--measures", help="comma-separated codes (default PHQ-9,GAD-7)")
    s.add_argument("--k", type=int, default=5)
    s.add_argument("--format", choices=["csv", "parquet"], default="csv")
    s.add_argument("--user", help="who asks, for the export log (default cli:<OS user>)")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("summary", help="row counts of the store")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_summary)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ontrack`` console script."""
    args = build_parser().parse_args(argv)
    from pipeline.jobs import configure_logging

    if argv is None:
        # A process of its own (the console script): the objects of the modules loaded
        # by now live as long as it does, so the collector's full passes and its pass at
        # exit need not walk them again (a cycle on a 10M store: ~0.2 s of ~6 s).
        # Not when called in-process (tests): garbage not yet collected would be kept.
        gc.freeze()
    configure_logging(args.log_format)
    try:
        settings = load_settings(args.config, database_url=args.database_url)
        return int(args.func(args, settings))
    except OnTrackError as exc:
        print(f"ontrack: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""Fault injection for the crash-safety tests (issue #9).

``ONTRACK_CRASH_AT=<point>`` makes the process kill itself with SIGKILL when it reaches
that named point, in the middle of a transaction or a file write: the tests then check
that the store and the files are as if the interrupted work had never started, and that
the next run completes it. A real SIGKILL (not an exception) so no ``finally`` or
rollback code of ours runs: only the database's own atomicity protects the data.
Unset in production; reading one environment variable at a handful of places per run
costs nothing.

Points: ``ingest.chunk`` (after a chunk of a file's records is written, before its batch
commits), ``compute.written`` (outcomes replaced, flags not yet), ``compute.commit``
(everything written, not committed), ``review.inserted`` (review row written, flags not
yet acknowledged), ``export.files`` (some export files written, manifest not yet).
"""

from __future__ import annotations

import os
import signal

__all__ = ["CRASH_POINTS", "crash_point"]

CRASH_POINTS = ("ingest.chunk", "compute.written", "compute.commit", "review.inserted",
                "export.files")


def crash_point(name: str) -> None:
    """SIGKILL this process if ``ONTRACK_CRASH_AT`` names this point (tests only)."""
    if os.environ.get("ONTRACK_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)

"""Who may see which rows: the one place it is decided.

- ``therapist``: their own episodes (by ``therapist_id``), with client names.
- ``director`` and ``admin``: every episode, with client names.
- ``researcher``: no client-level page at all; aggregates and anonymised exports only.

Every query of :mod:`dashboard.data` takes a :class:`Viewer` and applies
:func:`episode_clause`; a request for an episode outside it gets "not found".
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa

from pipeline.store import episodes

__all__ = ["Viewer", "episode_clause", "may_export", "may_see_clients", "may_see_service"]


@dataclass(frozen=True)
class Viewer:
    """The logged-in user, as the access rules see them."""

    username: str
    role: str
    therapist_id: str | None = None


def may_see_clients(viewer: Viewer) -> bool:
    """Caseload and client pages (identifiable data)."""
    return viewer.role in ("therapist", "director", "admin")


def may_see_service(viewer: Viewer) -> bool:
    """Service outcomes and data quality (aggregates, batches, quarantine)."""
    return viewer.role in ("director", "admin", "researcher")


def may_export(viewer: Viewer) -> bool:
    """Anonymised research exports (SPEC §10): researchers and directors."""
    return viewer.role in ("director", "admin", "researcher")


def episode_clause(viewer: Viewer) -> sa.ColumnElement[bool]:
    """SQL condition on ``episodes`` selecting the episodes the viewer may see."""
    if viewer.role in ("director", "admin"):
        return sa.true()
    if viewer.role == "therapist" and viewer.therapist_id:
        return episodes.c.therapist_id == viewer.therapist_id
    return sa.false()

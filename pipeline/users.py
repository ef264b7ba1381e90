"""Dashboard users: roles, salted password hashes (Werkzeug's scrypt KDF), audit log."""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from werkzeug.security import check_password_hash, generate_password_hash

from pipeline.errors import UsageError
from pipeline.store import Store, audit_log, therapists, users, utcnow

__all__ = ["ROLES", "User", "add_user", "audit", "authenticate", "get_user", "list_users",
           "set_active", "username_exists"]

ROLES = ("therapist", "director", "researcher", "admin")
MIN_PASSWORD = 10


@dataclass(frozen=True)
class User:
    """A dashboard user (never carries the password hash out of this module)."""

    user_id: int
    username: str
    role: str
    therapist_id: str | None
    active: bool


def _user(row: sa.RowMapping) -> User:
    return User(user_id=row["user_id"], username=row["username"], role=row["role"],
                therapist_id=row["therapist_id"], active=bool(row["active"]))


def add_user(store: Store, username: str, password: str, role: str,
             therapist_id: str | None = None) -> User:
    """Create a user; a therapist must be linked to a known therapist id."""
    if role not in ROLES:
        raise UsageError(f"role must be one of {', '.join(ROLES)}", value=role)
    if len(password) < MIN_PASSWORD:
        raise UsageError(f"password must have at least {MIN_PASSWORD} characters")
    if role == "therapist" and not therapist_id:
        raise UsageError("a therapist user needs --therapist-id")
    with store.transaction() as conn:
        if therapist_id and conn.execute(sa.select(therapists.c.therapist_id).where(
                therapists.c.therapist_id == therapist_id)).first() is None:
            raise UsageError("unknown therapist id", value=therapist_id)
        if conn.execute(sa.select(users.c.user_id).where(users.c.username == username)) \
                .first() is not None:
            raise UsageError("username already exists", value=username)
        conn.execute(users.insert().values(
            username=username, password_hash=generate_password_hash(password, "scrypt"),
            role=role, therapist_id=therapist_id, active=True, created_at=utcnow()))
        row = conn.execute(sa.select(users).where(users.c.username == username)).mappings().one()
    return _user(row)


def get_user(store: Store, user_id: int) -> User | None:
    with store.engine.connect() as conn:
        row = conn.execute(sa.select(users).where(users.c.user_id == user_id)).mappings().first()
    return _user(row) if row is not None and row["active"] else None


def authenticate(store: Store, username: str, password: str) -> User | None:
    """The active user with that name and password, or None (same cost either way)."""
    with store.engine.connect() as conn:
        row = conn.execute(sa.select(users).where(users.c.username == username)) \
            .mappings().first()
    if row is None:
        # Spend the same KDF time so a timing attack cannot enumerate usernames.
        check_password_hash(_DUMMY_HASH, password)
        return None
    if not check_password_hash(row["password_hash"], password) or not row["active"]:
        return None
    return _user(row)


def username_exists(store: Store, username: str) -> bool:
    """Whether a user (active or not) has that name: the audit log records failed
    sign-ins under real usernames only, never whatever was typed (it may be a password)."""
    with store.engine.connect() as conn:
        return conn.execute(sa.select(users.c.user_id).where(users.c.username == username)) \
            .first() is not None


def list_users(store: Store) -> list[User]:
    with store.engine.connect() as conn:
        rows = conn.execute(sa.select(users).order_by(users.c.username)).mappings().all()
    return [_user(r) for r in rows]


def set_active(store: Store, username: str, active: bool) -> None:
    with store.transaction() as conn:
        res = conn.execute(users.update().where(users.c.username == username)
                           .values(active=active))
        if not res.rowcount:
            raise UsageError("no such user", value=username)


def audit(store: Store, username: str, action: str, target: str | None = None) -> None:
    """Record who did what to which record (never scores or names)."""
    with store.transaction() as conn:
        conn.execute(audit_log.insert().values(at=utcnow(), username=username, action=action,
                                               target=target))


_DUMMY_HASH = generate_password_hash("not a real password", "scrypt")

"""The logged-in user of the current request."""

from __future__ import annotations

import flask_login

from dashboard.access import Viewer
from pipeline.users import User

__all__ = ["LoginUser", "current_viewer"]


class LoginUser(flask_login.UserMixin):
    """Flask-Login's view of a :class:`pipeline.users.User`."""

    def __init__(self, user: User) -> None:
        self.id = str(user.user_id)
        self.user = user


def current_viewer() -> Viewer | None:
    """The logged-in user as a :class:`Viewer` (None when anonymous)."""
    u = flask_login.current_user
    if not getattr(u, "is_authenticated", False):
        return None
    return Viewer(username=u.user.username, role=u.user.role, therapist_id=u.user.therapist_id)

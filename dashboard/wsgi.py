"""WSGI entry point for a production server (several worker processes)::

    ONTRACK_ENVIRONMENT=production ONTRACK_SECRET_KEY=... \\
    ONTRACK_DATABASE_URL=postgresql+psycopg://... \\
    gunicorn --workers 4 --bind 127.0.0.1:8050 'dashboard.wsgi:create_server()'

A factory rather than a module-level app: nothing is built at import time, and each
worker reads its settings from the environment (and ``ONTRACK_CONFIG``) when it starts.
"""

from __future__ import annotations

import flask

from dashboard.app import create_app
from pipeline.config import load_settings

__all__ = ["create_server"]


def create_server() -> flask.Flask:
    """The dashboard's Flask server, configured from the environment."""
    return create_app(load_settings()).server

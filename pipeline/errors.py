"""The one exception hierarchy of OnTrack.

::

    OnTrackError
     ├── ConfigError          settings file or environment variable is wrong
     ├── RegistryError        a scale definition file is malformed
     ├── IngestError          an input file cannot be read at all
     │    └── UnreadableFileError
     ├── ValidationError      data broke a boundary contract (a bug, not bad input:
     │                        bad input records are quarantined, never raised)
     ├── ScoringError         a score cannot be computed from what was given
     ├── StoreError           the database cannot be reached or has the wrong schema
     ├── UsageError           a command was called with arguments that cannot work
     └── JobError             a scheduled cycle could not run
          └── AlreadyRunning  another cycle holds the lock

Every exception takes its context as keyword arguments and renders a message that says
what was wrong and how to fix it.
"""

from __future__ import annotations

__all__ = [
    "AlreadyRunning",
    "ConfigError",
    "JobError",
    "IngestError",
    "OnTrackError",
    "RegistryError",
    "ScoringError",
    "StoreError",
    "UnreadableFileError",
    "UsageError",
    "ValidationError",
]


class OnTrackError(Exception):
    """Base class of every error OnTrack raises on purpose."""

    def __init__(self, message: str, **context: object) -> None:
        self.context = context
        details = ", ".join(f"{k}={v!r}" for k, v in context.items() if v is not None)
        super().__init__(f"{message} ({details})" if details else message)


class ConfigError(OnTrackError):
    """A setting in the TOML file or the environment is missing or invalid."""


class RegistryError(OnTrackError):
    """A scale definition file is malformed (names the file and the field)."""


class IngestError(OnTrackError):
    """An input could not be ingested at all."""


class UnreadableFileError(IngestError):
    """A file is not a CSV/JSON in a known format, or cannot be decoded."""


class ValidationError(OnTrackError):
    """Data crossing a module boundary broke its schema."""


class ScoringError(OnTrackError):
    """A questionnaire could not be scored."""


class StoreError(OnTrackError):
    """The store is unreachable, or its schema version is not the one expected."""


class UsageError(OnTrackError):
    """A command-line or API call cannot work as given."""


class JobError(OnTrackError):
    """A cycle could not run (inbox unreadable, store unreachable)."""


class AlreadyRunning(JobError):
    """Another cycle holds the lock; this one did nothing."""

"""Errors a user can catch. Every message says what was wrong and how to fix it.

The CLI maps every :class:`FedbenchError` to exit code 2 and prints only its message.
"""

from __future__ import annotations


class FedbenchError(Exception):
    """Base class of every error fedbench raises on purpose."""

    exit_code = 2


class UnknownNameError(FedbenchError, KeyError):
    """A method, task, backbone or metric name that is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class SpecError(FedbenchError, ValueError):
    """A run specification that cannot run: bad option, wrong type, out of range."""


class DataError(FedbenchError):
    """Task data that is missing, malformed, or too small for the requested partition."""


class BackboneUnavailableError(FedbenchError):
    """Backbone weights that cannot be had here (no local copy, no network)."""


class CacheError(FedbenchError):
    """A feature-cache entry that failed verification and could not be rebuilt."""


class ResultsError(FedbenchError):
    """A results directory that cannot be written, or a record that is not valid."""


class PrivacyError(FedbenchError):
    """A method that reached across the privacy boundary (server-private state or another client's data)."""


class PluginError(FedbenchError):
    """A plugin file or entry point that failed to load."""


class DuplicateNameError(PluginError):
    """A method, task, backbone or metric name registered twice by different code."""

    def __init__(self, message: str, *, taken_name: str = "", existing: str = "", new: str = "") -> None:
        super().__init__(message)
        self.taken_name = taken_name  # the name both claim
        self.existing = existing  # where the registered entry comes from
        self.new = new  # where the refused registration comes from


class DivergedError(FedbenchError):
    """A run whose loss became non-finite: it stopped, and its record is marked ``diverged``."""


class CheckpointError(FedbenchError):
    """A checkpoint that cannot be resumed from (corrupt, or written for other code or data)."""

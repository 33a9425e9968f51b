"""One exception tree for everything AutoSearch raises on purpose.

Only :class:`CandidateError` becomes a failed trial during a search (Optuna's
``catch=``); every other error is either a user's input problem
(:class:`ConfigError`, raised before any work starts) or a bug, and stops the
run loudly.
"""

from __future__ import annotations

__all__ = ["AutosearchError", "CandidateError", "ConfigError", "DiskFullError", "StudyMismatchError"]


class AutosearchError(Exception):
    """Base class of every error AutoSearch raises on purpose."""


class ConfigError(AutosearchError, ValueError):
    """Bad user input: a file, a key, a value. The message names it and the fix."""


class CandidateError(AutosearchError):
    """A candidate could not be built, run or scored; the search records it as a failed trial."""


class StudyMismatchError(ConfigError):
    """A study was resumed with a different model, search space or target."""


class DiskFullError(AutosearchError):
    """The disk the study writes to is full: the search stops (its finished trials are kept)."""

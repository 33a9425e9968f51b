"""One exception tree for everything AutoSearch raises on purpose.

Only :class:`CandidateError` becomes a failed trial during a search (Optuna's
``catch=``); every other error is either a user's input problem
(:class:`ConfigError`, raised before any work starts) or a bug, and stops the
run loudly.
"""

from __future__ import annotations

__all__ = ["AutosearchError", "CandidateError", "ConfigError", "DiskFullError", "SearchStopped", "Stopped", "StudyMismatchError"]


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
class SearchStopped(AutosearchError):
    """The search stopped for a cause outside any candidate (a profiler that stopped answering for the whole
    bounded wait): the trial it stopped is FAIL with the reason, every finished trial is kept, a resume goes on."""


class Stopped(KeyboardInterrupt):
    """The process was asked to stop (SIGTERM): handled like Ctrl-C, the running trial FAIL with the reason."""

    def __init__(self, signal_name: str = "SIGTERM") -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name

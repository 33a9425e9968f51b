"""AutoSearch: search per-layer pruning, low-rank and precision with latency measured on the target.

Example:
    >>> import autosearch
    >>> study = autosearch.search("model.onnx", study_name="mine", n_trials=10)  # doctest: +SKIP
    >>> study.front()                                                         # doctest: +SKIP
"""

from __future__ import annotations

from autosearch.candidate import Candidate
from autosearch.errors import AutosearchError, CandidateError, ConfigError, StudyMismatchError
from autosearch.evaluate import Evaluator, FidelityEvaluator, LabelledEvaluator
from autosearch.export import ExportReport, export_trial, pick_trial
from autosearch.space import SearchSpace, load_space
from autosearch.study import Study, search, work
from autosearch.target import LatencyStats, Target

__version__ = "0.1.0"

__all__ = [
    "AutosearchError",
    "Candidate",
    "CandidateError",
    "ConfigError",
    "Evaluator",
    "ExportReport",
    "FidelityEvaluator",
    "LabelledEvaluator",
    "LatencyStats",
    "SearchSpace",
    "Study",
    "StudyMismatchError",
    "Target",
    "export_trial",
    "load_space",
    "pick_trial",
    "search",
    "work",
]

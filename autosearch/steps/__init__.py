"""The steps of a search, in the order :func:`autosearch.study.search` runs them.

1. :mod:`~autosearch.steps.units` - which units of the model each knob of the space can change;
2. :mod:`~autosearch.steps.baseline` - the float model, scored and timed on the target;
3. :mod:`~autosearch.steps.warm_start` - the analysis (latency shares, uniform variants, sensitivities) and the
   candidates the study starts from, queued as trials; options the measurements rule out are fixed;
4. :mod:`~autosearch.steps.objective` - one trial: sample, build, score, time (through :mod:`autosearch.store`);
5. :mod:`~autosearch.steps.remeasure` - the front re-timed interleaved with the float model.

Every step takes the :class:`SearchContext` of the run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna

from autosearch.candidate import SpaceUnits
from autosearch.evaluate import Evaluator
from autosearch.model import SourceModel
from autosearch.space import SearchSpace
from autosearch.target import Target

__all__ = ["SearchContext", "quiet_optuna"]


@dataclass
class SearchContext:
    """What every step of one search run shares.

    Attributes:
        space: The validated search space.
        source: The imported model.
        units: Knob -> the units it changes in this model.
        evaluator: Scores a session (higher is better).
        target: Where sessions are timed.
        study_dir: The study's folder (baseline, candidates).
        calibration: Feeds for calibration (quantization, BatchNorm recalibration, distillation).
        say: Prints a line (a no-op when the search is quiet).
        verbose: Whether progress is printed.
        also: Further targets (label -> target): every candidate is timed on each too (``latency_ms@<label>``);
            ``target`` stays the one the objectives use.
    """

    space: SearchSpace
    source: SourceModel
    units: SpaceUnits
    evaluator: Evaluator
    target: Target
    study_dir: Path
    calibration: list[dict[str, np.ndarray]]
    say: Callable[[str], None]
    verbose: bool = True
    also: dict[str, Any] = field(default_factory=dict)  # label -> further target every candidate is timed on


@contextlib.contextmanager
def quiet_optuna(level: int = optuna.logging.WARNING) -> Iterator[None]:
    """Optuna's own per-trial logs repeat what the progress lines say; keep them down while searching."""
    old = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(level)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(old)

"""The embedded default problem: the digits CNN, its labelled test split, and the demo run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from autosearch.evaluate import LabelledEvaluator

__all__ = ["default_problem", "run_demo"]


def default_problem() -> tuple[Any, LabelledEvaluator, np.ndarray]:
    """(trained digits CNN, evaluator on the 450 held-out images, one example input).

    Calibration (quantization, BatchNorm recalibration) uses training images only.
    """
    from autosearch.zoo import load_digits_data, pretrained_digits_cnn

    data = load_digits_data()
    model = pretrained_digits_cnn()
    evaluator = LabelledEvaluator(data.x_test, data.y_test, calibration=data.x_train)
    return model, evaluator, data.x_test[:1]


def run_demo(*, study_name: str = "demo", n_trials: int | None = None, space: str = "cnn", studies_dir: str | Path = "studies", threads: int = 1) -> Any:
    """Search the default model and print the Pareto front."""
    from autosearch.report import print_front
    from autosearch.study import search
    from autosearch.target import Target

    model, evaluator, example = default_problem()
    target = Target(threads=threads, lock_path=str(Path(studies_dir) / ".profile.lock"))
    study = search(
        model, evaluator, example_inputs=example, space=space, target=target, study_name=study_name,
        n_trials=n_trials, studies_dir=studies_dir, cli_spec={"kind": "default", "space": space},
    )
    print_front(study)
    return study

"""The embedded default problem: the digits CNN and its labelled test split (``autosearch demo`` searches it)."""

from __future__ import annotations

from typing import Any

import numpy as np

from autosearch.evaluate import LabelledEvaluator

__all__ = ["default_problem"]


def default_problem() -> tuple[Any, LabelledEvaluator, np.ndarray]:
    """(trained digits CNN, evaluator on the 450 held-out images, one example input).

    Calibration (quantization, BatchNorm recalibration) uses training images only.
    """
    from autosearch.zoo import load_digits_data, pretrained_digits_cnn

    data = load_digits_data()
    model = pretrained_digits_cnn()
    evaluator = LabelledEvaluator(data.x_test, data.y_test, calibration=data.x_train)
    return model, evaluator, data.x_test[:1]

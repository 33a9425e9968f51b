"""Small models that ship with AutoSearch, built and trained locally (no downloads)."""

from __future__ import annotations

from autosearch.zoo.digits import DigitsData, DigitsResNet, load_digits_data, pretrained_digits_cnn

__all__ = ["DigitsData", "DigitsResNet", "load_digits_data", "pretrained_digits_cnn"]

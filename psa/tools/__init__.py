"""Fidelity and calibration tools: record attention inputs from a model (`capture`), measure psa
against dense and binary block-sparse attention at equal compute (`evaluate`), and search a config
for a target density or error (`calibrate`)."""

from .calibrate import calibrate, configs_from_json, configs_to_json
from .capture import Capture, capture, load, save
from .evaluate import evaluate, format_table

__all__ = ["Capture", "calibrate", "capture", "configs_from_json", "configs_to_json", "evaluate", "format_table",
           "load", "save"]

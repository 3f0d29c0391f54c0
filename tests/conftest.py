"""Suite-wide fixtures and markers.

Markers: `multirank` (2 real gloo processes), `e2e` (the tiny pipeline end to end) and `reliability`
(crashes, signals, bad input with real processes) are set by the tests themselves; every other test is a
fast single-process `unit` test, marked here, so `pytest -m unit` is the quick inner loop.

Launch helpers live beside this file: launch_utils.py (a training run through the real launchers),
dist_utils.py (a function on N gloo ranks) and inference_utils.py (tiny models, tokenizer, checkpoints).
"""
from __future__ import annotations

import pytest

from launch_utils import build_data

SLOW_MARKERS = ("multirank", "e2e", "reliability")


def pytest_collection_modifyitems(items):
    for item in items:
        if not any(item.get_closest_marker(m) for m in SLOW_MARKERS):
            item.add_marker(pytest.mark.unit)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict:
    """One tiny corpus, 400-token BPE tokenizer, pretraining and SFT datasets for every module that trains
    (built once: each build trains a tokenizer and runs the preprocessing tool twice)."""
    return build_data(tmp_path_factory.mktemp("tiny_data"), sft=True)

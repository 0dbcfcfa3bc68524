"""Fixtures shared by several test modules."""

from __future__ import annotations

import pytest


@pytest.fixture
def empty_compress_cache(tmp_path, monkeypatch):
    """``$DSE_CACHE_DIR`` pointed at a cache root that shares the converted model, text and tasks but has no
    compressed layers or scan results; returns its (empty) ``compress`` folder.

    The CI machine keeps ``~/.cache/dse`` between runs, so tests that must see work being computed (or not)
    cannot use the shared compression cache.
    """
    from evaluators.models import DEFAULT_MODEL, load_config
    from evaluators.paths import cache_root

    load_config(DEFAULT_MODEL)  # convert the model into the shared cache first
    shared, root = cache_root(), tmp_path / "cache-root"
    root.mkdir()
    for entry in shared.iterdir():
        if entry.name != "compress":
            (root / entry.name).symlink_to(entry)
    monkeypatch.setenv("DSE_CACHE_DIR", str(root))
    return root / "compress"

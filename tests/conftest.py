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


@pytest.fixture(scope="session")
def sqlite_study(tmp_path_factory):
    """A small real study (helpers.small_spec: 4 trials, final promotion) run by the driver on SQLite, once per
    session; returns (study, storage URL). Tests that change the storage work on a copy."""
    import ray

    from dse.spec import parse_spec
    from dse.study import run_study
    from helpers import small_spec

    db = tmp_path_factory.mktemp("study") / "studies.db"
    url = f"sqlite:///{db}"
    try:
        study = run_study(parse_spec(small_spec(url, "e2e-sqlite")), progress=False)
    finally:
        ray.shutdown()
    return study, url

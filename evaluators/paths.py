"""Where the service keeps what it builds once: converted models, text, lm-eval tasks, layer caches.

The root is ``$DSE_CACHE_DIR`` if set, else ``~/.cache/dse``.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """The cache root folder (created on first use)."""
    root = Path(os.environ.get("DSE_CACHE_DIR") or Path.home() / ".cache" / "dse").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def cache_dir(*parts: str) -> Path:
    """A sub-folder of the cache root, e.g. ``cache_dir('models')`` (created on first use)."""
    path = cache_root().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path

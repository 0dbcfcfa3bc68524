"""Text output every package shares (vocabulary layer: stdlib only): atomic file and directory writes and
aligned tables."""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path


def sha256_of(path: Path) -> str:
    """The hex SHA-256 of a file's bytes (what ``sha256sum`` prints), read 1 MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary sibling of ``path`` to write to; it replaces ``path`` (``os.replace``) when the block
    ends without an error, so readers never see half a file. On an error the sibling is removed."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


@contextmanager
def replacing_directory(path: Path) -> Iterator[Path]:
    """A new empty sibling directory of ``path`` to write into; when the block ends without an error it takes the
    place of ``path`` (renamed into place; a directory already there is first renamed aside, then removed), so
    ``path`` holds either its old contents or the complete new ones, never a mix. On an error (or an interrupt)
    the sibling is removed and ``path`` is untouched. OSError when the parent does not exist or is not writable.
    ``path`` itself, when it exists, must be a directory (the caller decides whether replacing it is wanted)."""
    path = Path(os.path.abspath(path))
    token = f"{os.getpid()}-{secrets.token_hex(4)}"
    tmp = path.with_name(f".{path.name}.tmp{token}")
    os.mkdir(tmp)  # honours the umask, unlike tempfile.mkdtemp's 0700
    try:
        yield tmp
        _rename_into_place(tmp, path, path.with_name(f".{path.name}.old{token}"))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _rename_into_place(new: Path, path: Path, aside: Path) -> None:
    """``new`` becomes ``path``; an existing non-empty ``path`` directory goes to ``aside`` first and is removed."""
    try:
        os.rename(new, path)  # path missing, or an empty directory
        return
    except OSError as err:
        if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
    os.rename(path, aside)
    try:
        os.rename(new, path)
    except BaseException:
        os.rename(aside, path)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write a file (text as UTF-8 with ``\\n`` line ends) via :func:`replacing`."""
    with replacing(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8", newline="\n")
        else:
            tmp.write_bytes(data)


def format_table(rows: Sequence[Sequence[object]], headers: Sequence[str], right: set[int] | None = None,
                 strip: bool = True) -> str:
    """Plain aligned text table: a header line, a line of dashes, one line per row, two spaces between
    columns; columns in ``right`` (indices) are right-aligned, and ``strip`` drops trailing blanks."""
    right = right or set()
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: list[str]) -> str:
        text = "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
        return text.rstrip() if strip else text

    return "\n".join([line(cells[0]), line(["-" * w for w in widths])] + [line(r) for r in cells[1:]])

"""Filesystem helpers: atomic writes and content hashes.

Every file refbench publishes (shards, manifests, checkpoints, result records, exports) is
written to a temporary name in the destination folder, flushed and fsync'd, then renamed over
the final name with `os.replace`. A reader therefore sees either nothing or the whole file,
never a half-written one, even if the writer is killed with SIGKILL.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator

TMP_PREFIX = ".tmp-"  # temporary files start with this; readers and globbing skip them


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give a new file (mkstemp's is 0600)


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside `path`; on clean exit fsync it and rename it to `path`.

    On an exception the temporary file is removed and `path` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fchmod(f.fileno(), _FILE_MODE)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_write(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def remove_stale_temps(folder: str | os.PathLike) -> int:
    """Delete temporary files left in `folder` by a killed writer; returns how many."""
    n = 0
    for p in Path(folder).glob(f"{TMP_PREFIX}*"):
        p.unlink(missing_ok=True)
        n += 1
    return n


def check_output_folder(path: str | os.PathLike, flag: str) -> None:
    """Refuse, before any work, an output folder path that is a file (or lies under one)."""
    from refbench.errors import RefbenchError

    path = Path(path)
    for p in [path, *path.parents]:
        if p.exists() and not p.is_dir():
            where = "is" if p == path else f"lies under {p}, which is"
            raise RefbenchError(f"{flag} {path} {where} a file, not a folder", hint=f"give {flag} a folder path")


def check_output_file(path: str | os.PathLike, flag: str) -> None:
    """Refuse, before any work, an output file path that is a folder (or lies under a file)."""
    from refbench.errors import RefbenchError

    path = Path(path)
    if path.is_dir():
        raise RefbenchError(f"{flag} {path} is a folder, not a file", hint=f"give {flag} a file path, e.g. {path / 'out'}")
    check_output_folder(path.parent, f"{flag}'s folder")

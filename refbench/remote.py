"""Where shards live: a local folder or a URL, read as a stream.

`refbench train|eval|predictions|score|sentences --shards LOCATION` takes a folder or a URL of the shard root:
`http://` / `https://` (read with the standard library, no extra dependency) or any protocol
fsspec knows (`s3://`, `gs://`, `az://`, ...: fsspec and that protocol's package, e.g. s3fs,
must be installed). The manifest is read from the same place (`<root>/<dataset>/manifest.json`),
and each shard is streamed: tar members are parsed as the bytes arrive, never downloaded whole
first, and the sha256 is computed on the same bytes (data.py checks it at the shard's end).

A connection that breaks mid-shard is reopened at the byte where it broke (an HTTP Range
request; a seek for fsspec), up to `retries` times, so the stream (and its hash) continues
exactly where it stopped; when the retries are spent, or the server cannot be reached, the
error names the shard's URL. Nothing is ever skipped.

Locations stay strings for URLs (a `Path` would fold `//`); `join` builds both kinds.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

from refbench.errors import RefbenchError

RETRIES = 3  # reconnections per shard after a broken read, each resuming at the byte reached
BACKOFF_S = 0.5  # wait before reconnection k: BACKOFF_S * 2**k seconds
TIMEOUT_S = 60.0  # socket timeout of one HTTP read
NETWORK_HINT = "check that the URL is reachable from this machine (and the server is up), then run the command again"


def is_url(location: Any) -> bool:
    """True for "<scheme>://..." (except file://), False for a local path."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def join(base: str | Path, *parts: str) -> str | Path:
    """`base / parts` for a folder, `base/parts` (one slash each) for a URL."""
    if not is_url(base):
        return Path(base).joinpath(*parts)
    return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])


def read_bytes(location: str | Path) -> bytes:
    """The whole content of a (small) file or URL; FileNotFoundError when it does not exist."""
    if not is_url(location):
        return Path(location).read_bytes()
    with open_stream(str(location), retries=RETRIES) as f:
        return f.read()


def sha256(location: str | Path) -> str:
    """Hex sha256 of a file or URL, streamed."""
    h = hashlib.sha256()
    if not is_url(location):
        with open(location, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        return h.hexdigest()
    with open_stream(str(location), retries=RETRIES) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def open_stream(location: str | Path, retries: int = RETRIES):
    """A read-only binary stream of a file or URL (a context manager with `read(n)`).

    Local files open as usual. URLs give a `ResumingStream`. Raises FileNotFoundError (HTTP 404,
    or the object does not exist) or OSError (unreachable) before any byte is read.
    """
    if not is_url(location):
        return open(location, "rb")
    return ResumingStream(str(location), retries=retries)


class ResumingStream:
    """A streamed URL that reconnects at the byte it reached when a read fails (bounded retries)."""

    def __init__(self, url: str, retries: int = RETRIES):
        self.url, self.retries, self.offset, self.reconnects = url, retries, 0, 0
        self.total: int | None = None  # the size the server announced (Content-Length), when it did
        self._f = self._open(0)

    def _open(self, offset: int):
        if self.url.startswith(("http://", "https://")):
            f, total = _open_http(self.url, offset)
            if self.total is None:
                self.total = total
            return f
        try:
            import fsspec
        except ImportError:  # pragma: no cover - fsspec is a dependency of webdataset's extras
            raise RefbenchError(f"{self.url}: reading this URL needs fsspec", hint="pip install fsspec (and the protocol's package, e.g. s3fs)") from None
        try:
            f = fsspec.open(self.url, "rb").open()
        except (ImportError, ValueError) as e:  # an unknown protocol, or its package missing
            raise RefbenchError(f"{self.url}: fsspec cannot open this URL ({e})",
                                hint="install the protocol's fsspec package (s3fs, gcsfs, adlfs, ...)") from None
        if offset:
            f.seek(offset)
        return f

    def read(self, n: int = -1) -> bytes:
        while True:
            try:
                data = self._f.read(n) if n is not None and n >= 0 else self._f.read()
                if not data and n != 0 and self.total is not None and self.offset < self.total:
                    # http.client returns b"" when the connection closes early: that is a break, not the end
                    raise EOFError(f"the connection closed after {self.offset} of {self.total} bytes")
                self.offset += len(data)
                return data
            except (OSError, EOFError, ValueError) as e:  # ConnectionError, IncompleteRead, timeouts, ...
                if isinstance(e, FileNotFoundError) or self.reconnects >= self.retries:
                    raise RefbenchError(
                        f"shard {self.url}: the connection broke at byte {self.offset} and {self.reconnects} "
                        f"reconnection(s) did not help ({type(e).__name__}: {e})", hint=NETWORK_HINT) from None
                self.close()
                time.sleep(BACKOFF_S * 2 ** self.reconnects)
                self.reconnects += 1
                try:
                    self._f = self._open(self.offset)
                except OSError:
                    continue  # counted as a failed reconnection on the next round

    def close(self) -> None:
        try:
            self._f.close()
        except Exception:  # closing a broken connection may fail again; nothing is left to release
            pass

    def __enter__(self) -> "ResumingStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Skipped:
    """A response whose first `skip` bytes are dropped (a server that ignored the Range header)."""

    def __init__(self, f, skip: int):
        self.f, self.skip = f, skip

    def read(self, n: int = -1) -> bytes:
        while self.skip:
            dropped = self.f.read(min(self.skip, 1 << 20))
            if not dropped:
                raise EOFError("the server sent fewer bytes than before")
            self.skip -= len(dropped)
        return self.f.read(n)

    def close(self) -> None:
        self.f.close()


def _open_http(url: str, offset: int):
    """(a response streaming `url` from byte `offset`, the file's whole size if announced)."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code == 404:
            raise FileNotFoundError(f"{url}: HTTP 404 not found") from None
        raise OSError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, TimeoutError) as e:
        raise OSError(f"{url}: {getattr(e, 'reason', e)}") from None
    length = response.headers.get("Content-Length")
    if offset and response.status != 206:  # the whole file again: drop what was read already
        return _Skipped(response, offset), int(length) if length else None
    return response, (offset + int(length)) if length else None

"""A result record's per-sentence sidecar (docs/results.md) read back and checked: the record names
a file beside it, its bytes match the stored sha256, it is parquet, its columns are the ones
expected and no sent_id repeats. refbench.eval.results and refbench.eval.gres_records read their
sidecars through `read_sidecar`.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Callable

import polars as pl

from refbench import fsutil
from refbench.errors import RefbenchError


def read_sidecar(path: Path, meta: dict, columns: list[str], bad: Callable[[str], RefbenchError]) -> pl.DataFrame:
    """The sidecar of the record at `path` (its JSON `meta`), checked; `bad(what)` makes the
    one-line error naming the record."""
    side = meta.get("sentences")
    if not isinstance(side, dict) or not isinstance(side.get("file"), str) or Path(side["file"]).name != side["file"]:
        raise bad("the 'sentences' field does not name a sidecar file")
    sidecar = path.parent / side["file"]
    try:
        payload = sidecar.read_bytes()
    except FileNotFoundError:
        raise bad(f"its per-sentence sidecar {sidecar.name} is missing") from None
    if side.get("sha256") != fsutil.sha256_bytes(payload):
        raise bad(f"its per-sentence sidecar {sidecar.name} does not match the stored sha256")
    try:
        df = pl.read_parquet(io.BytesIO(payload))
    except Exception as e:  # polars raises several types for a bad parquet file
        raise bad(f"its sidecar {sidecar.name} is not readable parquet ({type(e).__name__})") from None
    if list(df.columns) != list(columns):
        raise bad(f"sidecar columns {df.columns}, expected {list(columns)}")
    if df["sent_id"].is_duplicated().any():
        raise bad("sidecar has repeated sent_ids")
    return df

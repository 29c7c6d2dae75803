"""Result records: the versioned, append-only files `refbench eval` publishes, and `refbench compare`.

One record = one model scored on one split of one dataset under one protocol. It is two files
in `<results_root>/<dataset>/<split>/`:

    <model>-<run>-<time>.json                 the record (below)
    <model>-<run>-<time>.sentences.parquet    one row per sentence (the sidecar)

`<time>` is the UTC time to the microsecond plus a random hex suffix, so two processes
writing at once never pick the same name. The sidecar is written first and the JSON last,
each atomically (temp file + rename, `refbench.fsutil`): a record whose JSON exists is
complete, and readers only ever look for `*.json`.

Schema v2 (`"schema": "refbench-result", "schema_version": 2`), also in docs/results.md:

    source         "measured" (refbench ran the model: `refbench eval`) or "submitted"
                   (binary masks scored by `refbench score`)
    submission     null, or for a submitted record {file, format, sha256, entries, note}:
                   the predictions as given, their layout (refbench.eval.score.FORMATS), the
                   sha256 of their bytes, how many masks they held, the submitter's note
    dataset        "refcoco_unc" (<dataset>_<splitby>, as the shard folder)
    split          "testB"
    protocol       {name, version, threshold, description, pr_strict}   see refbench.eval.metrics.PROTOCOLS;
                   threshold is null for submitted binary masks
    metrics        {n, mIoU, oIoU, Pr@0.5 .. Pr@0.9,          fractions in [0, 1]
                    ci95: {mIoU: [lo, hi], oIoU: [lo, hi]},
                    bootstrap: {samples, seed, level}}
    model          {name, variant, config, run, checkpoint, checkpoint_sha256, step}
    data           {manifest_sha256, sentences_expected}
    provenance     {refbench_version, git_commit (null outside a git checkout),
                    date (UTC ISO 8601), command}
    breakdowns     {length, category, location_words}          see refbench.eval.metrics.breakdowns
    sentences      {file, format: "parquet", sha256, rows, columns}
                   columns: sent_id, ref_id, image_id, category_id, sent, I, U, IoU
    extras         optional {name: JSON object}: model-specific figures measured in the same pass,
                   e.g. query_diversity (refbench.eval.diversity) for models with queries and
                   sentence_sensitivity (refbench.eval.sensitivity); absent in
                   records written before it existed, which read as {}

v1 records (no `source`, no `submission`) still load, as measured records.

`write_record` refuses (RefbenchError, nothing written) a record whose sentence count differs
from `sentences_expected`, whose sent_ids repeat, or whose I/U are not valid pixel counts.
`load_record` checks the schema, the sidecar's presence and hash, and recomputes every metric
from the sidecar's I/U: a record that disagrees with its own sentences is refused.
"""

from __future__ import annotations

import io
import json
import math
import re
import secrets
import shlex
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import polars as pl

from refbench import fsutil
from refbench.errors import RefbenchError
from refbench.eval import metrics
from refbench.eval.sidecar import read_sidecar

SCHEMA = "refbench-result"
SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)  # v1 lacks `source` and `submission` (a measured record)
SOURCES = ("measured", "submitted")
SIDECAR_SUFFIX = ".sentences.parquet"
CI_LEVEL = 0.95  # the record's confidence intervals (metrics.ci95)

# The sidecar's columns and their types; `IoU` is computed here from I and U.
SENTENCE_COLUMNS: dict[str, Any] = {
    "sent_id": pl.Int64,
    "ref_id": pl.Int64,
    "image_id": pl.Int64,
    "category_id": pl.Int64,
    "sent": pl.String,
    "I": pl.Int64,
    "U": pl.Int64,
    "IoU": pl.Float64,
}
INPUT_COLUMNS = tuple(c for c in SENTENCE_COLUMNS if c != "IoU")  # what callers hand in

_TOP_KEYS = ("dataset", "split", "protocol", "metrics", "model", "data", "provenance", "breakdowns", "sentences")
_SAFE = re.compile(r"[^A-Za-z0-9_.+-]")


@dataclass(frozen=True)
class ModelInfo:
    name: str  # registry name, e.g. "eavl"
    variant: str  # variant the model was built from, e.g. "tiny", "rn101"
    config: dict = field(default_factory=dict)  # the full model config (dataclasses.asdict), enough to rebuild it
    run: str = "run"  # run name (default in `refbench eval`: the checkpoint's run folder)
    checkpoint: str | None = None  # checkpoint path as given on the command line
    checkpoint_sha256: str | None = None  # hex sha256 of the checkpoint file's bytes
    step: int | None = None  # optimizer step the checkpoint was saved at


@dataclass(frozen=True)
class DataInfo:
    manifest_sha256: str  # sha256 of the prepared dataset's manifest.json
    sentences_expected: int  # sentences in this split according to the manifest
    synthetic: bool = False  # the shards were prepared from `refbench synth` data, not the real dataset


@dataclass(frozen=True)
class Record:
    """A loaded, validated result record."""

    path: Path  # the record's JSON file
    meta: dict  # the parsed JSON (schema v1, see the module docstring)
    sentences: pl.DataFrame  # the sidecar, columns SENTENCE_COLUMNS, one row per sentence

    @property
    def dataset(self) -> str:
        return self.meta["dataset"]

    @property
    def split(self) -> str:
        return self.meta["split"]

    @property
    def protocol(self) -> dict:
        return self.meta["protocol"]

    @property
    def source(self) -> str:
        """ "measured" (refbench ran the model) or "submitted" (`refbench score`)."""
        return self.meta.get("source", "measured")

    @property
    def submission(self) -> dict | None:
        return self.meta.get("submission")

    @property
    def metrics(self) -> dict:
        return self.meta["metrics"]

    @property
    def model(self) -> dict:
        return self.meta["model"]

    @property
    def extras(self) -> dict:
        """Model-specific figures (e.g. query_diversity); {} in records without any."""
        return self.meta.get("extras") or {}

    @property
    def date(self) -> str:
        return self.meta["provenance"]["date"]

    def describe(self) -> str:
        """`dataset/split protocol vN` for messages and titles."""
        p = self.protocol
        return f"{self.dataset}/{self.split} protocol {p['name']} v{p['version']}"


# --------------------------------------------------------------------------- writing


def sentence_frame(sentences: pl.DataFrame | Mapping[str, Any]) -> pl.DataFrame:
    """The sidecar table from per-sentence columns (a polars DataFrame or a dict of sequences).

    Needs the columns sent_id, ref_id, image_id, category_id, sent, I, U; adds IoU (0 for an
    empty union). Raises RefbenchError if a column is missing or I/U are not valid counts.
    """
    df = sentences if isinstance(sentences, pl.DataFrame) else pl.DataFrame(dict(sentences))
    missing = [c for c in INPUT_COLUMNS if c not in df.columns]
    if missing:
        raise RefbenchError(f"per-sentence records lack column(s) {', '.join(missing)}")
    try:
        df = df.select([pl.col(c).cast(SENTENCE_COLUMNS[c], strict=True) for c in INPUT_COLUMNS])
    except pl.exceptions.PolarsError as e:
        raise RefbenchError(f"per-sentence records have a column of the wrong type: {str(e).splitlines()[0]}") from e
    inter, union = metrics.as_counts(df["I"].to_numpy(), df["U"].to_numpy())
    return df.with_columns(pl.Series("IoU", metrics.iou(inter, union), dtype=pl.Float64))


def build_record(
    *,
    dataset: str,
    split: str,
    protocol: str,
    threshold: float | None,
    model: ModelInfo,
    data: DataInfo,
    sentences: pl.DataFrame,
    command: str | None = None,
    samples: int = 1000,
    seed: int = 0,
    date: datetime | None = None,
    source: str = "measured",
    submission: dict | None = None,
    extras: Mapping[str, Any] | None = None,
) -> dict:
    """The record's JSON object for a `sentence_frame` table (no file written, no checks on counts).

    The `sentences` entry gets its file name and hash from `write_record`.
    """
    proto = metrics.get_protocol(protocol)
    inter = sentences["I"].to_numpy()
    union = sentences["U"].to_numpy()
    ci = metrics.bootstrap_ci(inter, union, samples=samples, seed=seed, level=CI_LEVEL)
    date = date or datetime.now(timezone.utc)
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "source": source,
        "submission": submission,
        "dataset": dataset,
        "split": split,
        "protocol": {
            "name": proto.name,
            "version": proto.version,
            "threshold": None if threshold is None else float(threshold),
            "description": proto.description,
            "pr_strict": proto.pr_strict,
        },
        "metrics": {
            **metrics.summarize(inter, union, strict=proto.pr_strict),
            "ci95": {k: list(v) for k, v in ci.items()},
            "bootstrap": {"samples": samples, "seed": seed, "level": CI_LEVEL},
        },
        "model": asdict(model),
        "data": asdict(data),
        "provenance": {
            "refbench_version": _refbench_version(),
            "git_commit": git_commit(),
            "date": date.isoformat(timespec="microseconds"),
            "command": command if command is not None else shlex.join(sys.argv),
        },
        "breakdowns": metrics.breakdowns(
            sentences["sent"].to_list(), sentences["category_id"].to_list(), inter, union
        ),
        "sentences": None,  # filled in by write_record
        **({"extras": dict(extras)} if extras else {}),
    }


def write_record(
    results_root: str | Path,
    *,
    dataset: str,
    split: str,
    protocol: str,
    threshold: float | None,
    model: ModelInfo,
    data: DataInfo,
    sentences: pl.DataFrame | Mapping[str, Any],
    command: str | None = None,
    samples: int = 1000,
    seed: int = 0,
    source: str = "measured",
    submission: dict | None = None,
    extras: Mapping[str, Any] | None = None,
) -> Path:
    """Publish a result record; returns the path of its JSON file.

    `sentences`: per-sentence columns sent_id, ref_id, image_id, category_id, sent, I, U (a
    polars DataFrame or a dict of equal-length sequences), every sentence of the split once.
    `extras`: optional JSON-able figures kept under the record's `extras` (e.g. query_diversity).
    Refuses (RefbenchError, nothing written) if the count differs from
    `data.sentences_expected`, if a sent_id repeats, or if I/U are not valid counts.
    Writes `<results_root>/<dataset>/<split>/<model>-<run>-<time>.json` and its sidecar:
    sidecar first, JSON last, both atomic. `source` "submitted" needs a `submission` entry
    {file, format, sha256, entries, note}; a measured record has none.
    """
    if source not in SOURCES:
        raise RefbenchError(f"record source must be one of {', '.join(SOURCES)}, got {source!r}")
    if (source == "submitted") != (submission is not None):
        raise RefbenchError("a submitted record needs its submission entry (file, format, sha256), a measured one none")
    for what, value in (("dataset", dataset), ("split", split)):
        if not value or _SAFE.search(value):
            raise RefbenchError(f"{what} name {value!r} is not usable as a folder name")
    df = sentence_frame(sentences)
    where = f"{model.name}/{model.run} on {dataset}/{split}"
    if df.height != data.sentences_expected:
        raise RefbenchError(
            f"refusing to publish {where}: {df.height} sentences scored, the manifest lists "
            f"{data.sentences_expected}",
            hint="every sentence of every ref must be scored exactly once; check the shards",
        )
    dup = df.filter(pl.col("sent_id").is_duplicated())["sent_id"].unique().sort()
    if dup.len():
        raise RefbenchError(
            f"refusing to publish {where}: {dup.len()} sent_id(s) scored more than once "
            f"(first: {dup[0]})",
            hint="every sentence of every ref must be scored exactly once",
        )

    date = datetime.now(timezone.utc)
    record = build_record(
        dataset=dataset, split=split, protocol=protocol, threshold=threshold, model=model,
        data=data, sentences=df, command=command, samples=samples, seed=seed, date=date,
        source=source, submission=submission, extras=extras,
    )
    folder = Path(results_root) / dataset / split
    while True:  # the random suffix makes a clash vanishingly rare; never overwrite one anyway
        stem = f"{_safe(model.name)}-{_safe(model.run)}-{date.strftime('%Y%m%dT%H%M%S%fZ')}-{secrets.token_hex(4)}"
        json_path = folder / f"{stem}.json"
        sidecar = folder / f"{stem}{SIDECAR_SUFFIX}"
        if not json_path.exists() and not sidecar.exists():
            break

    buf = io.BytesIO()
    df.write_parquet(buf)
    payload = buf.getvalue()
    record["sentences"] = {
        "file": sidecar.name,
        "format": "parquet",
        "sha256": fsutil.sha256_bytes(payload),
        "rows": df.height,
        "columns": list(SENTENCE_COLUMNS),
    }
    fsutil.atomic_write_bytes(sidecar, payload)  # first: the JSON must never point at nothing
    fsutil.atomic_write_json(json_path, record)  # last: its presence means the record is complete
    return json_path


def withdraw_record(json_path: str | Path) -> None:
    """Remove a record this process just published: its JSON first (so it is never seen half
    gone), then its sidecar, then its split and dataset folders if that left them empty."""
    json_path = Path(json_path)
    json_path.unlink(missing_ok=True)
    json_path.with_name(json_path.name[: -len(".json")] + SIDECAR_SUFFIX).unlink(missing_ok=True)
    for folder in (json_path.parent, json_path.parent.parent):
        try:
            folder.rmdir()
        except OSError:
            break


def _safe(name: str) -> str:
    return _SAFE.sub("_", str(name)) or "_"


def _refbench_version() -> str:
    import refbench

    return refbench.__version__


def git_commit() -> str | None:
    """The commit of the checkout refbench runs from, or None (an installed wheel, not a git checkout, no git).

    The one git lookup of refbench (records, ablation reports and bench logs use it). It answers
    only when this package lies in the checkout's `refbench/` folder, so an installed copy inside
    some other repository (a virtual environment in a project) never reports that project's commit.
    """
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "--show-toplevel", "HEAD"],
            capture_output=True, text=True, timeout=10, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.split()
    if out.returncode != 0 or len(lines) != 2 or Path(lines[0]).resolve() / "refbench" != here:
        return None
    return lines[1] if re.fullmatch(r"[0-9a-f]{40,64}", lines[1]) else None


# --------------------------------------------------------------------------- reading


def load_record(path: str | Path) -> Record:
    """Read and validate one record; every problem is one line naming the file.

    Checks: JSON parses, schema and version, required keys, sidecar present with the stored
    sha256 and columns, sent_ids unique, and every stored metric (n, mIoU, oIoU, Pr@X and the
    breakdowns) equal to the value recomputed from the sidecar's I and U.
    """
    path = Path(path)

    def bad(what: str) -> RefbenchError:
        return RefbenchError(f"result record {path}: {what}")

    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise bad("no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"not readable JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("schema") != SCHEMA:
        raise bad(f"not a refbench result (schema is not {SCHEMA!r})")
    version = meta.get("schema_version")
    if version not in READABLE_VERSIONS:
        raise bad(
            f"schema version {version!r}, this refbench reads versions {', '.join(map(str, READABLE_VERSIONS))}"
        )
    if version >= 2:
        source, sub = meta.get("source"), meta.get("submission")
        if source not in SOURCES:
            raise bad(f"source {source!r} is not one of {', '.join(SOURCES)}")
        if source == "submitted" and not (isinstance(sub, dict) and isinstance(sub.get("sha256"), str)):
            raise bad("a submitted record without its submission's sha256")
    missing = [k for k in _TOP_KEYS if not isinstance(meta.get(k), (dict, str))]
    if missing:
        raise bad(f"missing or malformed field(s) {', '.join(missing)}")
    if meta.get("task") == "gres":  # gRefCOCO: its own metrics and sidecar columns (refbench.eval.gres_records)
        from refbench.eval import gres_records

        return Record(path=path, meta=meta, sentences=gres_records.check_record(path, meta))

    df = read_sidecar(path, meta, list(SENTENCE_COLUMNS), bad)

    try:
        strict = bool(meta["protocol"].get("pr_strict", False)) if isinstance(meta["protocol"], dict) else False
        recomputed = metrics.summarize(df["I"].to_numpy(), df["U"].to_numpy(), strict=strict)
        recomputed_breakdowns = metrics.breakdowns(
            df["sent"].to_list(), df["category_id"].to_list(), df["I"].to_numpy(), df["U"].to_numpy()
        )
    except RefbenchError as e:
        raise bad(f"sidecar I/U invalid: {e.message}") from None
    stored = meta["metrics"]
    for key, value in recomputed.items():
        if not _agree(stored.get(key), value):
            raise bad(f"stored {key} = {stored.get(key)!r} but its sentences give {value!r}")
    ci = stored.get("ci95")
    for key in ("mIoU", "oIoU"):
        pair = ci.get(key) if isinstance(ci, dict) else None
        if not (isinstance(pair, list) and len(pair) == 2 and 0.0 <= pair[0] <= pair[1] <= 1.0):
            raise bad(f"metrics.ci95.{key} is not an interval [lo, hi] within [0, 1]")
    if not isinstance(meta.get("extras", {}), dict):
        raise bad("the 'extras' field is not a JSON object")
    if not _agree_tree(meta["breakdowns"], recomputed_breakdowns):
        raise bad("stored breakdowns disagree with its sentences")
    if not np.allclose(df["IoU"].to_numpy(), metrics.iou(df["I"].to_numpy(), df["U"].to_numpy()), rtol=0, atol=1e-12):
        raise bad("sidecar IoU column disagrees with its I and U")
    return Record(path=path, meta=meta, sentences=df)


def _agree(stored: Any, value: Any) -> bool:
    if isinstance(value, int):
        return isinstance(stored, int) and stored == value
    return isinstance(stored, (int, float)) and math.isclose(stored, value, rel_tol=1e-12, abs_tol=1e-12)


def _agree_tree(stored: Any, value: Any) -> bool:
    if isinstance(value, dict):
        return isinstance(stored, dict) and stored.keys() == value.keys() and all(
            _agree_tree(stored[k], value[k]) for k in value
        )
    return _agree(stored, value)


def iter_records(results_root: str | Path) -> Iterator[Record]:
    """Every record under `results_root` (any depth), validated, in path order.

    Temporary files of writers in progress are skipped; a bad record raises RefbenchError
    naming it. A missing root yields nothing.
    """
    root = Path(results_root)
    if not root.is_dir():
        return
    for path in sorted(root.rglob("*.json")):
        if path.name.startswith(fsutil.TMP_PREFIX):
            continue
        yield load_record(path)


# --------------------------------------------------------------------------- compare


def compare_records(a: Record, b: Record, samples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Paired bootstrap B - A on the sentences both records scored (paired by sent_id).

    Refuses records of a different dataset, split or protocol (name or version), or records
    that scored different sentences. Returns {"n", "mIoU": paired result, "oIoU": paired result}
    (see `metrics.paired_bootstrap`).
    """
    key_a = (a.dataset, a.split, a.protocol["name"], a.protocol["version"])
    key_b = (b.dataset, b.split, b.protocol["name"], b.protocol["version"])
    if key_a != key_b:
        raise RefbenchError(
            f"cannot compare {a.path.name} ({a.describe()}) with {b.path.name} ({b.describe()}): "
            "dataset, split and protocol must match"
        )
    cols = ["sent_id", "I", "U", "IoU"]
    joined = a.sentences.select(cols).join(b.sentences.select(cols), on="sent_id", how="inner", suffix="_b")
    only_a = a.sentences.height - joined.height
    only_b = b.sentences.height - joined.height
    if only_a or only_b:
        raise RefbenchError(
            f"cannot compare {a.path.name} with {b.path.name}: they scored different sentences "
            f"({only_a} only in A, {only_b} only in B)"
        )
    joined = joined.sort("sent_id")
    miou = metrics.paired_bootstrap(joined["IoU"].to_numpy(), joined["IoU_b"].to_numpy(), samples=samples, seed=seed)
    oiou = metrics.paired_bootstrap_oiou(
        joined["I"].to_numpy(), joined["U"].to_numpy(), joined["I_b"].to_numpy(), joined["U_b"].to_numpy(),
        samples=samples, seed=seed,
    )
    return {"n": joined.height, "mIoU": miou, "oIoU": oiou}


def main_compare(result_a: str | Path, result_b: str | Path, samples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """`refbench compare A B`: print mIoU/oIoU of A and B, B - A and its 95% paired-bootstrap interval."""
    from rich.console import Console
    from rich.table import Table

    if Path(result_a).exists() and Path(result_b).exists() and Path(result_a).resolve() == Path(result_b).resolve():
        raise RefbenchError(f"A and B are the same file ({result_a}): nothing to compare",
                            hint="give two records of the same split, e.g. two runs' records under leaderboard/results/<dataset>/<split>/")
    a, b = load_record(result_a), load_record(result_b)
    if a.meta.get("sentences", {}).get("sha256") == b.meta.get("sentences", {}).get("sha256") and a.meta == b.meta:
        raise RefbenchError(f"{result_a} and {result_b} are copies of one record: nothing to compare")
    out = compare_records(a, b, samples=samples, seed=seed)
    console = Console()
    table = Table(
        title=f"{a.describe()}, n = {out['n']} sentences paired by sent_id; "
        f"paired bootstrap, {samples} resamples, seed {seed}; values in %",
    )
    table.add_column("metric")
    table.add_column(f"A: {a.model['name']}/{a.model['run']}", justify="right")
    table.add_column(f"B: {b.model['name']}/{b.model['run']}", justify="right")
    table.add_column("B - A", justify="right")
    table.add_column("95% CI of B - A", justify="right")
    table.add_column("reading")
    for metric in ("mIoU", "oIoU"):
        r = out[metric]
        lo, hi = r["ci"]
        reading = "B better" if lo > 0 else "A better" if hi < 0 else "no clear difference"
        table.add_row(
            f"{metric} (%)", f"{100 * r['a']:.2f}", f"{100 * r['b']:.2f}", f"{100 * r['diff']:+.2f}",
            f"[{100 * lo:+.2f}, {100 * hi:+.2f}]", reading,
        )
    console.print(table)
    console.print(f"A: {a.path}\nB: {b.path}")
    if a.meta["data"].get("manifest_sha256") != b.meta["data"].get("manifest_sha256"):
        console.print("note: A and B were scored on shards with different manifests (same sent_ids).")
    return out

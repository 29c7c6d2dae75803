"""The leaderboard: measured result records and reported paper rows in one polars table.

`refbench leaderboard` gathers every record under `leaderboard/results/` (validated by
`refbench.eval.results.load_record`) and the reported rows of `leaderboard/reported/*.csv`
(format: leaderboard/reported/README.md) into one wide table:

    source | method | variant | run | dataset | protocol | protocol_version |
    <split> <metric> (%, <protocol>) ... | date | reference | note

- one row per (source, method, variant, run, dataset, protocol, protocol_version); `source`
  is "measured" (refbench ran the model), "submitted" (someone's binary masks scored by
  `refbench score`; the note carries the submission's sha256), either with " (synthetic)"
  when scored on `refbench synth` data, or "reported";
- every value column names its split, its metric and its protocol, e.g.
  "testB mIoU (%, original)": mIoU and oIoU never share a column, nor do two protocols;
- values are percent (0-100); an empty cell means "not measured / not published";
- each measured run of a model gets its own row (runs are told apart by `run`); when the same
  run was scored several times on a split under a protocol, the latest record (by its UTC
  date) fills the cell and `reference` lists the record files used.
- gRefCOCO records (`"task": "gres"`) and `leaderboard/reported/gres/*.csv` fill columns of
  their own ("val gIoU (%, rela)"; gIoU, cIoU, N-acc, T-acc, Pr@0.7-0.9), after RefCOCO's and
  never shared with them: refbench.report.gres_board.

Exports: md, csv, json (rows plus a header saying what the numbers are) and html: one static
page (inline CSS, JS and data, no network) that shows one dataset and protocol at a time
(both selectable), numbers first and compact, columns sortable by clicking, each source
styled apart (measured, submitted, reported; synthetic hatched), and a row's provenance
(records, notes, sources, a submission's sha256) in a panel one click away. With no
`--out`, md prints as a rich table and the other formats print their text; with `--out` the
file is written atomically.
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
import markupsafe
import polars as pl

from refbench import fsutil
from refbench.errors import RefbenchError
from refbench.eval import metrics
from refbench.report import gres_board

KEY = ("source", "method", "variant", "run", "dataset", "protocol", "protocol_version")
SPLIT_ORDER = ("val", "testA", "testB", "test")  # others follow, alphabetically
DATASET_ORDER = ("refcoco_unc", "refcoco+_unc", "refcocog_umd", "refcocog_google")  # others follow
METRICS = ("mIoU", "oIoU")
UNITS = "percent (0-100)"

# The reported-rows CSV schema (leaderboard/reported/README.md).
REPORTED_SCHEMA: dict[str, Any] = {
    "method": pl.String,
    "variant": pl.String,
    "dataset": pl.String,
    "split": pl.String,
    "metric": pl.String,
    "protocol": pl.String,
    "value": pl.Float64,
    "source": pl.String,
    "note": pl.String,
}
ABLATION_SCHEMA: dict[str, Any] = {
    "table": pl.Int64,
    "num_queries": pl.Int64,
    "aligner": pl.String,
    "global_feature": pl.Boolean,
    "mqe": pl.Boolean,
    "method": pl.String,
    "variant": pl.String,
    "dataset": pl.String,
    "split": pl.String,
    "epochs": pl.Int64,
    "protocol": pl.String,
    **{m: pl.Float64 for m in ("mIoU", *metrics.PR_KEYS)},
    "source": pl.String,
    "note": pl.String,
}


VALUE_COLUMN = "{} {} (%, {})"  # split, metric, protocol: "testB mIoU (%, original)"


def value_column(split: str, metric: str, protocol: str) -> str:
    """The leaderboard column of one number: "testB mIoU (%, original)"."""
    return VALUE_COLUMN.format(split, metric, protocol)


# --------------------------------------------------------------------------- reported rows


def default_reported() -> Path:
    """The reported rows shipped with refbench (package data `refbench.reported`)."""
    folder = resources.files("refbench.reported")
    if not isinstance(folder, Path) or not (folder / "refcoco_family.csv").is_file():
        raise RefbenchError(
            f"the reported rows shipped with refbench are missing from {folder}",
            hint="reinstall refbench, or pass --reported PATH",
        )
    return folder


def _read_csv(path: Path, schema: dict[str, Any], protocols: Any = metrics.PROTOCOLS) -> pl.DataFrame:
    try:
        df = pl.read_csv(path, infer_schema=False)  # every column as text; cast below
    except (OSError, pl.exceptions.PolarsError) as e:
        raise RefbenchError(f"reported rows {path}: not readable CSV ({str(e).splitlines()[0]})") from None
    if list(df.columns) != list(schema):
        raise RefbenchError(f"reported rows {path}: columns {df.columns}, expected {list(schema)}")
    for col, dtype in schema.items():
        if dtype == pl.String:
            continue
        if dtype == pl.Boolean:
            cast = pl.col(col).str.to_lowercase().replace_strict({"true": True, "false": False}, default=None)
        else:
            cast = pl.col(col).cast(dtype, strict=False)
        bad = df.with_row_index("row").filter(cast.is_null() | pl.col(col).is_null())
        if bad.height:
            line = bad["row"][0] + 2  # 1-based, after the header
            raise RefbenchError(f"reported rows {path}, line {line}: {col} = {bad[col][0]!r} is not a {dtype}")
        df = df.with_columns(cast.cast(dtype).alias(col))
    empty = [c for c in ("method", "variant", "dataset", "split", "protocol", "source") if df[c].str.len_chars().min() == 0 or df[c].null_count()]
    if empty:
        raise RefbenchError(f"reported rows {path}: empty value(s) in column(s) {', '.join(empty)}")
    unknown = sorted(set(df["protocol"]) - set(protocols))
    if unknown:
        raise RefbenchError(f"reported rows {path}: unknown protocol(s) {unknown}; known: {list(protocols)}")
    return df


def _check_percent(path: Path, df: pl.DataFrame, columns: tuple[str, ...]) -> None:
    for col in columns:
        bad = df.with_row_index("row").filter((pl.col(col) < 0) | (pl.col(col) > 100))
        if bad.height:
            raise RefbenchError(
                f"reported rows {path}, line {bad['row'][0] + 2}: {col} = {bad[col][0]} is not a percentage in [0, 100]"
            )


def load_reported(folder: str | Path | None = None) -> pl.DataFrame:
    """All reported rows of `folder/*.csv` (default: leaderboard/reported), validated.

    Columns as REPORTED_SCHEMA, one published number per row, values in percent.
    """
    folder = Path(folder) if folder is not None else default_reported()
    if not folder.is_dir():
        raise RefbenchError(f"reported rows folder {folder} does not exist")
    frames = []
    for path in sorted(folder.glob("*.csv")):
        df = _read_csv(path, REPORTED_SCHEMA)
        metric_bad = sorted(set(df["metric"]) - set(METRICS))
        if metric_bad:
            raise RefbenchError(f"reported rows {path}: metric(s) {metric_bad}; a row is exactly one of {list(METRICS)}")
        _check_percent(path, df, ("value",))
        frames.append(df)
    return _no_duplicates(frames, folder)


def _no_duplicates(frames: list[pl.DataFrame], folder: Path) -> pl.DataFrame:
    if not frames:
        return pl.DataFrame(schema=REPORTED_SCHEMA)
    out = pl.concat(frames)
    ident = ["method", "variant", "dataset", "split", "metric", "protocol"]
    dup = out.filter(pl.struct(ident).is_duplicated())
    if dup.height:
        r = dup.row(0, named=True)
        raise RefbenchError(
            f"reported rows in {folder}: {r['method']} {r['variant']} {r['dataset']}/{r['split']} "
            f"{r['metric']} ({r['protocol']}) appears more than once"
        )
    return out


def load_reported_gres(folder: str | Path | None = None) -> pl.DataFrame:
    """The gRefCOCO reported rows of `folder/gres/*.csv` (default: leaderboard/reported), validated:
    REPORTED_SCHEMA's columns, a GRES metric (gIoU, cIoU, N-acc, T-acc, Pr@0.7..0.9) and protocol
    (`original`, `rela`), percent. No such folder: no rows."""
    folder = (Path(folder) if folder is not None else default_reported()) / gres_board.REPORTED_FOLDER
    frames = []
    for path in sorted(folder.glob("*.csv")) if folder.is_dir() else []:
        df = _read_csv(path, REPORTED_SCHEMA, gres_board.PROTOCOLS)
        gres_board.check_reported(path, df)
        _check_percent(path, df, ("value",))
        frames.append(df)
    return _no_duplicates(frames, folder)


def load_ablations(path: str | Path | None = None) -> pl.DataFrame:
    """The EAVL paper's ablation rows (Tables 2-4), validated; see leaderboard/reported/README.md.

    Default path: leaderboard/reported/ablations/eavl.csv. Values in percent.
    """
    path = Path(path) if path is not None else default_reported() / "ablations" / "eavl.csv"
    if not path.is_file():
        raise RefbenchError(f"ablation rows {path} do not exist")
    df = _read_csv(path, ABLATION_SCHEMA)
    _check_percent(path, df, ("mIoU", *metrics.PR_KEYS))
    bad = sorted(set(df["aligner"]) - {"dynamic", "fixed"})
    if bad:
        raise RefbenchError(f"ablation rows {path}: aligner must be 'dynamic' or 'fixed', got {bad}")
    return df


# --------------------------------------------------------------------------- the table


def _measured_long(results_root: Path) -> pl.DataFrame:
    from refbench.eval.results import iter_records

    rows = []
    for rec in iter_records(results_root):
        gres = gres_board.is_record(rec)  # gRefCOCO: its own metrics and columns (refbench.report.gres_board)
        source = rec.source + (" (synthetic)" if rec.meta["data"].get("synthetic") else "")
        note = "" if gres else f"n={rec.metrics['n']} sentences; " + (
            f"threshold {rec.protocol['threshold']:g}" if rec.protocol.get("threshold") is not None else "binary masks"
        )
        if rec.submission is not None:
            sub = rec.submission
            note += f"; {rec.split}: submission {Path(sub['file']).name} ({sub['format']}) sha256 {sub['sha256']}"
            note += f"; {rec.split}: note: {sub['note']}" if sub.get("note") else ""
        if gres:
            base = {"source": source, "method": rec.model["name"], "variant": rec.model["variant"], "run": rec.model["run"],
                    "dataset": rec.dataset, "protocol": rec.protocol["name"], "protocol_version": rec.protocol["version"],
                    "split": rec.split, "date": rec.date, "reference": str(rec.path.relative_to(results_root))}
            rows += gres_board.long_rows(rec, base, note)
            continue
        for metric in METRICS:
            rows.append(
                {
                    "source": source,
                    "method": rec.model["name"],
                    "variant": rec.model["variant"],
                    "run": rec.model["run"],
                    "dataset": rec.dataset,
                    "protocol": rec.protocol["name"],
                    "protocol_version": rec.protocol["version"],
                    "split": rec.split,
                    "metric": metric,
                    "value": 100.0 * rec.metrics[metric],
                    "date": rec.date,
                    "reference": str(rec.path.relative_to(results_root)),
                    "note": note,
                }
            )
    return pl.DataFrame(rows, schema=_LONG_SCHEMA)


_LONG_SCHEMA = {
    "source": pl.String,
    "method": pl.String,
    "variant": pl.String,
    "run": pl.String,
    "dataset": pl.String,
    "protocol": pl.String,
    "protocol_version": pl.Int64,
    "split": pl.String,
    "metric": pl.String,
    "value": pl.Float64,
    "date": pl.String,
    "reference": pl.String,
    "note": pl.String,
}


def _reported_long(reported: pl.DataFrame) -> pl.DataFrame:
    return reported.select(
        pl.lit("reported").alias("source"),
        "method",
        "variant",
        pl.lit(None, pl.String).alias("run"),
        "dataset",
        "protocol",
        pl.lit(None, pl.Int64).alias("protocol_version"),  # computed by the authors' code, not ours
        "split",
        "metric",
        "value",
        pl.lit(None, pl.String).alias("date"),
        pl.col("source").alias("reference"),
        "note",
    )


def _split_rank(split: str) -> tuple[int, str]:
    return (SPLIT_ORDER.index(split), "") if split in SPLIT_ORDER else (len(SPLIT_ORDER), split)


def build_table(
    results_root: str | Path, reported: str | Path | None = None, dataset: str | None = None
) -> pl.DataFrame:
    """The leaderboard as a wide polars DataFrame (see the module docstring for its columns)."""
    results_root = Path(results_root)
    long = pl.concat([_measured_long(results_root), _reported_long(load_reported(reported)),
                      _reported_long(load_reported_gres(reported))])
    if dataset is not None:
        known = sorted(set(long["dataset"]))
        long = long.filter(pl.col("dataset") == dataset)
        if long.is_empty():
            raise RefbenchError(
                f"no leaderboard rows for dataset {dataset!r}; datasets with rows: {', '.join(known) or 'none'}"
            )
    if long.is_empty():
        raise RefbenchError(f"no result records under {results_root} and no reported rows")

    long = long.with_columns(
        pl.format(VALUE_COLUMN, "split", "metric", "protocol").alias("column")
    )
    # the latest record wins where one run was scored several times on the same split
    latest = long.sort("date", descending=True, nulls_last=True).unique(
        subset=[*KEY, "column"], keep="first", maintain_order=True
    )
    wide = latest.pivot(on="column", index=list(KEY), values="value")
    meta = latest.group_by(list(KEY)).agg(
        pl.col("date").max(),
        pl.col("reference").unique().sort().str.join("; "),
        pl.col("note").unique().sort().str.join("; "),
    )
    wide = wide.join(meta, on=list(KEY), how="left", nulls_equal=True)

    protocol_rank = {name: i for i, name in enumerate(metrics.PROTOCOLS)}
    cells = latest.select("column", "split", "metric", "protocol").unique()
    def rank(c: dict) -> tuple:  # RefCOCO's columns first, then gRefCOCO's (never shared: other metrics)
        if gres_board.is_column(c["metric"]):
            return gres_board.column_rank(c["protocol"], _split_rank(c["split"]), c["metric"])
        return (0, protocol_rank.get(c["protocol"], 99), _split_rank(c["split"]), METRICS.index(c["metric"]))

    ordered = sorted(cells.iter_rows(named=True), key=rank)
    value_cols = [c["column"] for c in ordered]
    return (
        wide.with_columns(
            pl.col("dataset").replace_strict({d: i for i, d in enumerate(DATASET_ORDER)}, default=99).alias("_d"),
            pl.col("protocol").replace_strict(protocol_rank, default=99).alias("_p"),
        )
        .sort(["_d", "dataset", "_p", "source", "method", "variant", "run"], nulls_last=True)
        .select(*KEY, *value_cols, "date", "reference", "note")
    )


def value_columns(table: pl.DataFrame) -> list[str]:
    """The value columns of a leaderboard table (each names split, metric and protocol)."""
    return [c for c in table.columns if c.endswith(")") and " (%, " in c]


# --------------------------------------------------------------------------- exports


def _legend(table: pl.DataFrame | None = None) -> list[str]:
    lines = [
        f"Values are {UNITS}. mIoU = mean of per-sentence IoU; oIoU = sum of intersections / sum of unions.",
        "source: measured = refbench ran the model (a result record); submitted = a method's own binary masks scored by"
        " `refbench score` against the same ground truth (the note gives the submission's sha256); reported = as"
        " published (see reference); (synthetic) = scored on refbench's synthetic stand-in (`refbench synth`) that"
        " shares the dataset's name and format, not on the real images: not comparable with reported rows.",
        "Each column names its split, metric and protocol; measured cells hold the latest record of the run.",
    ]
    lines += [f"protocol {p.name} (v{p.version}): {p.description}." for p in metrics.PROTOCOLS.values()]
    return lines + (gres_board.legend(table) if table is not None else [])


def _display(table: pl.DataFrame) -> pl.DataFrame:
    """All cells as text: values with 2 decimals, empty cells as '-'."""
    vals = value_columns(table)
    return table.select(
        [
            (pl.col(c).round(2).map_elements(lambda v: f"{v:.2f}", return_dtype=pl.String) if c in vals else pl.col(c).cast(pl.String))
            .fill_null("-")
            .alias(c)
            for c in table.columns
        ]
    )


def to_markdown(table: pl.DataFrame, title: str) -> str:
    shown = _display(table)
    vals = set(value_columns(table))

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "/") for c in cells) + " |"

    rows = [line(shown.columns), "|" + "|".join("---:" if c in vals else "---" for c in shown.columns) + "|"]
    rows += [line(list(r)) for r in shown.iter_rows()]
    legend = "\n".join(f"- {text}" for text in _legend(table))
    return f"# {title}\n\n{legend}\n\n" + "\n".join(rows) + "\n"


def to_csv(table: pl.DataFrame) -> str:
    return table.write_csv()


def to_json(table: pl.DataFrame, title: str) -> str:
    doc = {
        "schema": "refbench-leaderboard",
        "schema_version": 1,
        "title": title,
        "units": UNITS,
        "legend": _legend(table),
        "protocols": {p.name: {"version": p.version, "description": p.description} for p in metrics.PROTOCOLS.values()},
        **({"gres_protocols": gres_board.protocols_doc()} if gres_board.gres_datasets(table) else {}),
        "columns": table.columns,
        "rows": table.to_dicts(),
    }
    return json.dumps(doc, indent=2) + "\n"


@functools.lru_cache(maxsize=1)
def _page_template() -> jinja2.Template:
    """The page (templates/leaderboard.html, package data), autoescaped: a method name or note
    holding markup renders as text."""
    text = resources.files("refbench.report").joinpath("templates", "leaderboard.html").read_text(encoding="utf-8")
    env = jinja2.Environment(autoescape=True, keep_trailing_newline=True, undefined=jinja2.StrictUndefined)
    return env.from_string(text)


def _page_data(table: pl.DataFrame) -> dict:
    """What the HTML page's script draws: rows (values by column), columns, datasets, protocols."""
    vals = value_columns(table)
    rows = []
    for i, row in enumerate(table.iter_rows(named=True)):
        rows.append({
            "id": i,
            **{k: row[k] for k in KEY},
            "values": {c: row[c] for c in vals if row[c] is not None},
            "date": row["date"],
            "references": list(dict.fromkeys(t for t in (row["reference"] or "").split("; ") if t)),
            "notes": list(dict.fromkeys(t for t in (row["note"] or "").split("; ") if t)),
        })
    columns = []
    for c in vals:
        split, metric, rest = c.split(" ", 2)
        columns.append({"name": c, "split": split, "metric": metric, "protocol": rest[len("(%, "):-1]})
    protocols = [p for p in metrics.PROTOCOLS if p in set(table["protocol"])]
    protocols += sorted(set(table["protocol"]) - set(protocols))
    return {
        "rows": rows,
        "columns": columns,
        "datasets": list(dict.fromkeys(table["dataset"])),
        "protocols": protocols,
        "protocol_notes": {p.name: f"v{p.version}, {p.description}" for p in metrics.PROTOCOLS.values()},
        **gres_board.page_extra(table),
    }


def to_html(table: pl.DataFrame, title: str) -> str:
    """One static page, no network: numbers first, dataset and protocol selectable, sortable
    columns, each source styled apart, a row's provenance (records, notes, hashes) on a click."""
    # The data is JSON inside a <script> element, which HTML does not unescape: it is written as
    # JSON with <, > and & as \u escapes (so no "</script>" can end it early), not HTML-escaped.
    page = _page_data(table)
    data = json.dumps(page, ensure_ascii=True).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return _page_template().render(title=title, legend=_legend(table), data=markupsafe.Markup(data), gres="gres_datasets" in page)


def print_table(table: pl.DataFrame, title: str) -> None:
    """The table on the terminal: one rich table per (dataset, protocol), sources as footnotes."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]{title}[/bold]")
    for line in _legend(table):
        console.print(f"  {line}", highlight=False)
    notes: list[str] = []
    for (dataset, protocol), part in table.group_by(["dataset", "protocol"], maintain_order=True):
        suffix = value_column("", "", protocol).strip()  # "(%, <protocol>)"
        cols = [c for c in value_columns(part) if c.endswith(suffix) and part[c].null_count() < part.height]
        rt = Table(title=f"{dataset}, protocol {protocol}: values in %")
        for c in ("source", "method", "variant", "run"):
            rt.add_column(c)
        for c in cols:
            split, metric = c.split(" ")[:2]
            rt.add_column(f"{split}\n{metric}", justify="right")
        rt.add_column("ref")
        for row in part.iter_rows(named=True):
            text = "; ".join(t for t in (row["reference"], row["note"]) if t)
            if text and text not in notes:
                notes.append(text)
            rt.add_row(
                row["source"], row["method"], row["variant"], row["run"] or "-",
                *("-" if row[c] is None else f"{row[c]:.2f}" for c in cols),
                f"[{notes.index(text) + 1}]" if text else "",
            )
        console.print(rt)
    for i, text in enumerate(notes, 1):
        console.print(f"[{i}] {text}", highlight=False, markup=False)


def render(table: pl.DataFrame, fmt: str, title: str) -> str:
    """The table as text in `fmt` (md, csv, json or html)."""
    renderers = {
        "md": lambda: to_markdown(table, title),
        "csv": lambda: to_csv(table),
        "json": lambda: to_json(table, title),
        "html": lambda: to_html(table, title),
    }
    if fmt not in renderers:
        raise RefbenchError(f"unknown leaderboard format {fmt!r}; formats: {', '.join(renderers)}")
    return renderers[fmt]()


def main(
    dataset: str | None = None,
    fmt: str = "md",
    out: str | Path | None = None,
    results: str | Path = "leaderboard/results",
    reported: str | Path | None = None,
    results_required: bool = False,
) -> pl.DataFrame:
    """`refbench leaderboard`: build the table; print it, or write it to `out` atomically.

    A missing `results` folder is an error when `results_required` (the user named it), else a
    note; an empty one is a note: the table then holds the reported rows only, and says so.
    Returns the table (a polars DataFrame) for callers such as the quickstart.
    """
    import sys

    if out is not None:
        fsutil.check_output_file(out, "--out")  # before any work
    results = Path(results)
    if not results.is_dir():
        if results.exists() or results_required:
            what = "is not a folder" if results.exists() else "does not exist"
            raise RefbenchError(f"--results {results} {what}", hint="give the folder `refbench eval --results` wrote to")
        print(f"note: no measured records: {results} does not exist (`refbench eval` writes them); "
              "showing the reported rows only", file=sys.stderr)
    elif not any(p.suffix == ".json" and not p.name.startswith(fsutil.TMP_PREFIX) for p in results.rglob("*.json")):
        print(f"note: no measured records: {results} holds no result record; showing the reported rows only",
              file=sys.stderr)
    table = build_table(results, reported, dataset)
    title = f"refbench leaderboard: {dataset or 'all datasets'}"
    if out is None:
        if fmt == "md":
            print_table(table, title)
        else:
            print(render(table, fmt, title), end="")
        return table
    fsutil.atomic_write_text(out, render(table, fmt, title))
    from rich.console import Console

    Console().print(f"leaderboard ({fmt}, {table.height} rows, values in %) written to {out}")
    return table

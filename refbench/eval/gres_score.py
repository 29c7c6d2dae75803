"""gRefCOCO scoring of submissions: `refbench sentences` / `refbench score` on a `grefcoco_*` dataset.

A submission is the RefCOCO one (refbench.eval.score: RLE JSONL, PNG JSONL or a PNG folder, one mask
per sentence) where each JSONL line may also carry `"no_target": true|false`. Without it the
decision is "the mask is empty"; a value that is not a JSON boolean is a bad submission (refused,
one line, nothing written). The masks are at the image's own size under `--protocol original`
(the default) and 480x480 under `--protocol rela` (ReLA's output size; another size is refused
with one line naming 480x480). Rules and protocols: refbench.eval.gres_metrics.

Ground truth comes from the shards (refbench.data.sources.grefer's fields): the merged mask at the image's
size for `original`; for `rela` the non-crowd target polygons scaled by (480/w, 480/h), as
detectron2's ResizeTransform.apply_coords does, and rasterised at 480x480 with pycocotools
(frPyObjects, union), as ReLA's mapper does.

The record is a refbench result record (schema v2, docs/results.md) with `"task": "gres"`: its
metrics are gRefCOCO's (`gIoU`, `cIoU`, `N-acc`, `T-acc`, `Pr@0.7..0.9`, the case counts, ci95),
its breakdowns by GT target count (`n_targets`: "0", "1", "2", "3+"), and its sidecar keeps per
sentence I, U (raw, before the rules), the GT target count and the no-target decision
(`GRES_COLUMNS`); refbench.eval.gres_records recomputes all of it from the sidecar on load. The
leaderboard shows such records in gRefCOCO columns of their own (refbench.report.gres_board), so
RefCOCO and gRefCOCO numbers never share a column.

`refbench sentences` lists every sentence, no-target ones included, with the fields
`SENTENCE_FIELDS` only (no ann_id, category_id or ref_id, which would tell a no-target sentence),
sorted by (image_id, sent_id).
"""

from __future__ import annotations

import io
import json
import secrets
import shlex
import sys
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import polars as pl

from refbench import fsutil, remote
from refbench.errors import RefbenchError
from refbench.eval import gres_metrics, score
from refbench.eval.gres_records import GRES_COLUMNS, TASK, record_body
from refbench.eval.truth import SentenceColumns, check_sentence_count, split_refs
from refbench.memory import collector_paused

SENTENCE_FIELDS = ("sent_id", "image_id", "file_name", "height", "width", "sentence")


@dataclass
class GresTruth(SentenceColumns):
    """Every sentence of one gRefCOCO split, in the shards' order; `rle` is the merged GT at the
    image's size (empty for a no-target ref).

    Only these columns outlive the read: the shard refs (targets, polygons, tokens) are dropped as
    each image is read, so scoring a split never keeps its JSON alive."""

    n_targets: list[int] = field(default_factory=list)
    no_target: list[bool] = field(default_factory=list)
    rela_rle: list[dict] = field(default_factory=list)  # GT at 480x480 as ReLA makes it; read with protocol="rela" only


def ground_truth(dataset_dir, manifest: dict | None = None, *, split: str, protocol: str = gres_metrics.DEFAULT_PROTOCOL) -> GresTruth:
    """The sentences of a gRefCOCO split with their GT, read from the shards (no JPEG decoded);
    under `protocol` "rela" also each ref's GT rasterised at 480x480 (`rela_gt_rle`)."""
    from refbench.data import shards as data
    from refbench.data.sources import grefer

    rela = gres_metrics.get_protocol(protocol).name == "rela"
    dataset_dir = dataset_dir if remote.is_url(dataset_dir) else Path(dataset_dir)
    manifest = data.load_manifest(dataset_dir) if manifest is None else manifest
    t = GresTruth()
    for meta, ref, gt in split_refs(dataset_dir, manifest, split, lambda r: None if "targets" in r else "is not a gRefCOCO ref"):
        k, nt = grefer.n_targets(ref), bool(ref["no_target"])
        at480 = rela_gt_rle(ref, meta["height"], meta["width"]) if rela else None  # one per ref, shared by its sentences
        for s in ref["sentences"]:
            t.add(meta, ref, s, gt)
            t.n_targets.append(k)
            t.no_target.append(nt)
            if rela:
                t.rela_rle.append(at480)
    check_sentence_count(dataset_dir, manifest, split, len(t))
    return t


def sentence_lines(truth: GresTruth):
    """One JSON line per sentence, SENTENCE_FIELDS only, sorted by (image_id, sent_id): nothing tells a no-target one."""
    order = sorted(range(len(truth)), key=lambda i: (truth.image_id[i], truth.sent_id[i]))
    cols = [getattr(truth, f) for f in SENTENCE_FIELDS]
    for i in order:
        yield json.dumps({f: c[i] for f, c in zip(SENTENCE_FIELDS, cols)}, ensure_ascii=False) + "\n"


def main_sentences(dataset: str, split: str, shards, out: Path | None) -> int:
    """`refbench sentences` for a gRefCOCO dataset."""
    truth = ground_truth(remote.join(shards, dataset), split=split)
    if out is None:
        sys.stdout.writelines(sentence_lines(truth))
    else:
        score.write_jsonl(out, sentence_lines(truth))
        print(f"{len(truth)} sentences of {dataset}/{split} (gRefCOCO: no-target ones included, not marked) written to {out}",
              file=sys.stderr)
    return len(truth)


# --------------------------------------------------------------------------- the rela protocol's GT


def rela_gt_rle(ref: dict, height: int, width: int, size: int = gres_metrics.RELA_SIZE) -> dict:
    """A ref's GT as ReLA's mapper makes it: non-crowd polygons scaled by (size/w, size/h) in float64
    (detectron2 ResizeTransform.apply_coords), rasterised at size x size (pycocotools frPyObjects,
    union over polygons and instances). pycocotools RLE with bytes counts."""
    from pycocotools import mask as mask_utils

    polys = []
    for t in ref["targets"]:
        if t.get("iscrowd"):
            continue
        seg = t.get("segmentation")
        if not isinstance(seg, list):
            raise RefbenchError(f"ref {ref['ref_id']}: target {t.get('ann_id')} has no polygons; the rela protocol "
                                "rasterises polygons at 480x480 as ReLA does (it reads polygons only)",
                                hint="re-run `refbench prepare` for this dataset, or score with --protocol original")
        sx, sy = size * 1.0 / width, size * 1.0 / height
        for p in seg:
            a = np.asarray(p, dtype=np.float64).reshape(-1, 2)
            a[:, 0] *= sx
            a[:, 1] *= sy
            polys.append(a.reshape(-1).tolist())
    if not polys:
        return mask_utils.encode(np.zeros((size, size), np.uint8, order="F"))
    return mask_utils.merge(mask_utils.frPyObjects(polys, size, size))


def _gt_for(truth: GresTruth, protocol: str) -> list[dict]:
    if protocol != "rela":
        return truth.rle
    if len(truth.rela_rle) != len(truth):
        raise ValueError("the truth was read without protocol='rela': ground_truth(..., protocol='rela') rasterises its 480x480 GT")
    return truth.rela_rle


# --------------------------------------------------------------------------- scoring


def count(sub, truth: GresTruth, protocol: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(I, U, predicted no-target) per sentence of `truth`, the submission validated first."""
    gres_metrics.get_protocol(protocol)
    sized = truth
    if protocol == "rela":
        s = gres_metrics.RELA_SIZE
        wrong = [f"{e['where']}: {e['rle']['size']}" for e in sub.entries if "rle" in e and list(e["rle"]["size"]) != [s, s]]
        if wrong:
            raise RefbenchError(f"submission {sub.path}: protocol rela scores {s}x{s} masks (ReLA's output size), "
                                f"{len(wrong)} of {len(sub.entries)} entries have another size (first: {', '.join(wrong[:score.SHOW])}); "
                                "nothing was written", hint="resize your masks to 480x480, or score at the image's size with --protocol original")
        n = len(truth)
        sized = GresTruth(sent_id=truth.sent_id, height=[s] * n, width=[s] * n)
    pred = score.match(sub, sized)  # the submission's RLEs in truth's order, every check passed
    inter, union, area = score.count_iu_areas(pred, _gt_for(truth, protocol))
    pred_nt = area == 0  # the empty-mask rule, where a line says nothing
    index = {sid: i for i, sid in enumerate(truth.sent_id)}
    for e in sub.entries:
        if "no_target" in e:
            pred_nt[index[e["sent_id"]]] = e["no_target"]
    return inter, union, pred_nt


def write_record(results_root, *, dataset: str, split: str, protocol: str, model, data, columns: dict,
                 command: str | None = None, source: str = "submitted", submission: dict | None = None) -> Path:
    """Publish a gRefCOCO result record (sidecar first, JSON last, both atomic); returns its JSON path."""
    from refbench.eval import results

    df = pl.DataFrame({c: columns[c] for c in GRES_COLUMNS}, schema=GRES_COLUMNS)
    if df.height != data.sentences_expected:
        raise RefbenchError(f"refusing to publish {model.name} on {dataset}/{split}: {df.height} sentences scored, "
                            f"the manifest lists {data.sentences_expected}")
    if df["sent_id"].is_duplicated().any():
        raise RefbenchError(f"refusing to publish {model.name} on {dataset}/{split}: a sent_id is scored twice")
    gt_nt = (df["n_targets"] == 0).to_numpy()
    body = record_body(protocol=protocol, inter=df["I"].to_numpy(), union=df["U"].to_numpy(), gt_nt=gt_nt,
                       pred_nt=df["pred_no_target"].to_numpy(), n_targets=df["n_targets"].to_list())
    date = datetime.now(timezone.utc)
    record = {
        "schema": results.SCHEMA, "schema_version": results.SCHEMA_VERSION, "task": TASK,
        "source": source, "submission": submission, "dataset": dataset, "split": split,
        **body, "model": asdict(model), "data": asdict(data),
        "provenance": {"refbench_version": results._refbench_version(), "git_commit": results.git_commit(),
                       "date": date.isoformat(timespec="microseconds"),
                       "command": command if command is not None else shlex.join(sys.argv)},
        "sentences": None,
    }
    folder = Path(results_root) / dataset / split
    while True:
        stem = f"{results._safe(model.name)}-{results._safe(model.run)}-{date.strftime('%Y%m%dT%H%M%S%fZ')}-{secrets.token_hex(4)}"
        json_path, sidecar = folder / f"{stem}.json", folder / f"{stem}{results.SIDECAR_SUFFIX}"
        if not json_path.exists() and not sidecar.exists():
            break
    buf = io.BytesIO()
    df.write_parquet(buf)
    payload = buf.getvalue()
    record["sentences"] = {"file": sidecar.name, "format": "parquet", "sha256": fsutil.sha256_bytes(payload),
                           "rows": df.height, "columns": list(GRES_COLUMNS)}
    fsutil.atomic_write_bytes(sidecar, payload)
    fsutil.atomic_write_json(json_path, record)
    return json_path


def score_submission(predictions, *, dataset: str, split: str, method: str, variant: str = "default", shards="shards",
                     protocol: str = gres_metrics.DEFAULT_PROTOCOL, results="leaderboard/results", note: str = "",
                     command: str | None = None):
    """Validate a gRefCOCO submission, count I/U and decisions, publish the record; a refbench.eval.score.Scored."""
    from refbench.data import shards as data
    from refbench.eval import results as results_mod
    gres_metrics.get_protocol(protocol)
    if not method or not method.strip():
        raise RefbenchError("--method must name the method (e.g. ReLA)")
    dataset_dir = remote.join(shards, dataset)
    manifest = data.load_manifest(dataset_dir)
    with collector_paused():  # the submission and the split's GT: many small objects kept alive, no cycles
        sub = score.read_submission(predictions)
        truth = ground_truth(dataset_dir, manifest, split=split, protocol=protocol)
        inter, union, pred_nt = count(sub, truth, protocol)
    columns = {"sent_id": truth.sent_id, "ref_id": truth.ref_id, "image_id": truth.image_id, "n_targets": truth.n_targets,
               "sent": truth.sent, "I": inter, "U": union, "pred_no_target": pred_nt}
    path = write_record(
        results, dataset=dataset, split=split, protocol=protocol,
        model=results_mod.ModelInfo(name=method, variant=variant, run="submitted"),
        data=results_mod.DataInfo(manifest_sha256=remote.sha256(remote.join(dataset_dir, "manifest.json")),
                                  sentences_expected=manifest["splits"][split]["sentences"],
                                  synthetic=bool(manifest.get("synthetic", False))),
        columns=columns, command=command, source="submitted",
        submission={"file": str(sub.path), "format": sub.format, "sha256": sub.sha256, "entries": len(sub.entries), "note": note},
    )
    m = gres_metrics.summarize(inter, union, np.asarray(truth.no_target, bool), pred_nt, protocol)
    return score.Scored(record=path, submission=sub, sentences=columns, metrics=m)


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}"


def main(predictions, dataset, split, method, variant, shards, protocol, results, note):
    """`refbench score` on a gRefCOCO dataset: score, publish, print what the record says."""
    from rich.console import Console
    from rich.table import Table

    from refbench.eval import results as results_mod

    out = score_submission(predictions, dataset=dataset, split=split, method=method, variant=variant, shards=shards,
                           protocol=protocol, results=results, note=note)
    rec = results_mod.load_record(out.record)
    m, p = rec.metrics, rec.protocol
    synthetic = " (synthetic data)" if rec.meta["data"].get("synthetic") else ""
    table = Table(title=f"submitted {method}/{variant} on {dataset}/{split}{synthetic} (gRefCOCO), protocol {p['name']} "
                        f"v{p['version']}: {p['description']}", title_justify="left")
    cols = ["n (no-target)", "gIoU % [95% CI]", "cIoU % [95% CI]", "N-acc %", "T-acc %", *[f"{k} %" for k in gres_metrics.PR_KEYS],
            "TP/FN/FP/TN"]
    for c in cols:
        table.add_column(c, justify="right")
    ci = m["ci95"]

    def with_ci(k):
        return _pct(m[k]) + (f" [{_pct(ci[k][0])}, {_pct(ci[k][1])}]" if ci.get(k) else "")

    table.add_row(f"{m['n']} ({m['n_no_target']})", with_ci("gIoU"), with_ci("cIoU"), _pct(m["N-acc"]), _pct(m["T-acc"]),
                  *[_pct(m[k]) for k in gres_metrics.PR_KEYS], f"{m['TP']}/{m['FN']}/{m['FP']}/{m['TN']}")
    console = Console()
    console.print(table)
    console.print("\n".join(f"  {dataset}/{split} {p['name']}: {label} target(s): n={b['n']} gIoU {_pct(b['gIoU'])} %, "
                            f"N-acc {_pct(b['N-acc'])} %, T-acc {_pct(b['T-acc'])} %"
                            for label, b in rec.meta["breakdowns"]["n_targets"].items()))
    console.print(f"submission: {out.submission.path} ({out.submission.format}, sha256 {out.submission.sha256})")
    console.print(f"record: {out.record}")
    return out

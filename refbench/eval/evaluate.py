"""`refbench eval`: score a checkpoint on a split, every sentence of every ref exactly once.

    checkpoint.load -> build the model -> eval_stream.eval_loader (this rank's part of the split)
    -> forward -> sigmoid -> map back (protocol) -> binarise at the model's threshold
    -> I and U per sentence -> gather over ranks -> results.write_record -> rich table
    (and, beside I and U, a second forward with each sentence swapped for one of another ref of
    the same image: refbench.eval.sensitivity's figures, kept in the record's extras)

The same `score_split` serves training-time validation (`validate`), so the numbers a run
selects its best checkpoint on are computed exactly as the published ones.

Protocols (refbench.eval.metrics.PROTOCOLS); without --protocol a checkpoint is scored under the one
it was trained for (`checkpoint_protocol`: its recipe's, `cris` for converted CRIS weights):
- `original` (default; CRIS/EAVL): the probability map over the letterboxed input is mapped
  back to the original image (crop the letterbox, bilinear resize) and compared with the
  original-size GT (the union of the annotation's polygons).
- `input` (LAVT-style): the probability map is resized to the network input (S x S) and
  compared with the GT moved into the same letterboxed frame (nearest).
- `cris`: CRIS's own chain (refbench.data.cvwarp), its preprocessing included: the loader makes the
  input with OpenCV's cubic affine letterbox, and the map goes back by bicubic upsampling
  (align_corners) and OpenCV's cubic inverse warp; then > threshold at the original size.

Under torchrun every rank scores its own part of the split's sentences (eval_stream.eval_plan: cut
below shard granularity, so every rank works even on a split of fewer shards than ranks) and
the per-sentence I/U are gathered, so the metrics are exact at any world size. A record missing any sentence is never published.

Precision: scoring always runs the model in float32 (`EVAL_PRECISION`; as CRIS evaluates), on
GPU as on CPU, also in training-time validation of a bf16 run: under bf16 autocast, pixels near
the threshold flip with the precision and with which sentences share a batch, so a record's
numbers would depend on the device and on the batch size.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from refbench import checkpoint as ckpt_mod
from refbench import remote
from refbench.data import cvwarp, eval_stream
from refbench.data import shards as data
from refbench.data import transforms
from refbench.data.datasets import is_gres
from refbench.data.prepare import cap_workers
from refbench.distributed import all_gather_object, exact_float32, setup_distributed
from refbench.errors import RefbenchError
from refbench.eval import diversity, gres_eval, gres_metrics, metrics
from refbench.eval import results as results_mod
from refbench.eval import sensitivity as sensitivity_mod
from refbench.eval.metrics import checkpoint_protocol
from refbench.eval.visualize import render_examples
from refbench.fsutil import check_output_folder, sha256_file

COLUMNS = ("sent_id", "ref_id", "image_id", "category_id", "sent")  # per-sentence keys kept with I and U
EVAL_PRECISION = "float32"  # the dtype every forward of scoring runs in (no autocast)


@dataclass
class SplitScores:
    """Per-sentence I/U of one split (all ranks gathered) and where the time went."""

    columns: dict[str, list] = field(default_factory=lambda: {k: [] for k in (*COLUMNS, "I", "U")})
    seconds_total: float = 0.0  # wall time of the scoring loop on this rank
    seconds_metric: float = 0.0  # of which: mapping predictions back, binarising, counting I and U
    diversity: dict | None = None  # query diversity over the split (refbench.eval.diversity; None: the model has no queries)
    sensitivity: dict | None = None  # sentence sensitivity over the split (refbench.eval.sensitivity; None: not measured)

    def __len__(self) -> int:
        return len(self.columns["sent_id"])

    def extend(self, other: "SplitScores") -> None:
        for k, v in other.columns.items():
            self.columns[k].extend(v)


def forward_float32(net, image, tokens) -> dict:
    """The model's forward output in float32 (autocast off, whatever the caller has on), no grad."""
    with torch.inference_mode(), torch.autocast(image.device.type, enabled=False), exact_float32():
        return net(image.float(), tokens)


def probabilities(net, image, tokens, meter=None):
    """sigmoid(logits) of the model in float32 (`forward_float32`): float32 [B,1,h,w] over the
    square input. `meter` (a refbench.eval.diversity.DiversityMeter), if given, takes the batch's
    query figures."""
    out = forward_float32(net, image, tokens)
    if meter is not None:
        meter.update(out)
    return torch.sigmoid(out["logits"].float())


def count_iu(probs, batch: dict, threshold: float, protocol: str) -> tuple[np.ndarray, np.ndarray]:
    """I and U (int64 [B]) of one batch of probability maps against its GT masks."""
    proto = metrics.get_protocol(protocol)
    boxes = batch["letterbox"]
    if not boxes:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    if proto.resolution == "original" and proto.preprocess == "letterbox":
        # the whole batch at once, on probs' device: one padded stack of maps (the same values
        # `binary_masks` thresholds, so eval and `refbench predictions` agree), one of GT masks
        warped = transforms.to_original_batch(probs, boxes)  # float [B, max H, max W]
        gt = batch["gt"] if "gt" in batch else eval_stream.pad_stack(batch["gt_mask"])  # uint8 [B, max H, max W]
        gt = gt.to(probs.device, non_blocking=True)
        pred = warped > threshold  # [B, max H, max W]; beyond each image the map reads 0
        if threshold < 0:  # then 0 passes: keep each prediction inside its image
            pred &= transforms.original_extent(boxes, warped.shape[1], warped.shape[2], probs.device)
        return metrics.intersection_union_batch(pred, gt)
    if proto.resolution == "original":
        pairs = [metrics.intersection_union(m, gt.numpy().astype(bool))
                 for m, gt in zip(binary_masks(probs, batch, threshold, protocol), batch["gt_mask"])]
        inter, union = zip(*pairs) if pairs else ((), ())
        return np.asarray(inter, dtype=np.int64), np.asarray(union, dtype=np.int64)
    size = boxes[0].size
    pred = F.interpolate(probs, size=(size, size), mode="bilinear", align_corners=False)[:, 0] > threshold  # [B,S,S]
    gt = np.stack([transforms.mask_to_input(g.numpy(), b) for g, b in zip(batch["gt_mask"], boxes)])  # [B,S,S]
    return metrics.intersection_union_batch(pred.cpu(), torch.from_numpy(gt).bool())


def binary_masks(probs, batch: dict, threshold: float, protocol: str) -> list[np.ndarray]:
    """A batch's binarised predictions at each image's original size: bool [H_b, W_b] each.

    For the protocols that compare at the original size: `original` maps the letterboxed map
    back (transforms.to_original), `cris` inverts CRIS's warp (cvwarp.cris_to_original). The
    one place this is done: `refbench eval` counts I/U on these masks and `refbench
    predictions` writes them out, so the two agree exactly.
    """
    proto = metrics.get_protocol(protocol)
    if proto.resolution != "original":
        raise RefbenchError(f"protocol {protocol!r} compares at the network input: it has no masks at the original size")
    if proto.preprocess == "cris":
        maps = cvwarp.cris_to_original(probs, batch["warp"])  # B x float32 [H_b, W_b]
        return [np.asarray(m) > threshold for m in maps]
    return [m.cpu().numpy() > threshold for m in transforms.to_original(probs, batch["letterbox"])]  # B x bool [H_b, W_b]


def split_loader(net, dataset_dir: Path, manifest: dict, split: str, d, *, batch_size: int = 16, workers: int = 0,
                 protocol: str = "original", persistent: bool = False) -> data.Loader:
    """The eval loader `score_split` reads: this rank's part of `split` (eval_stream.eval_plan), at the
    model's input size, in the protocol's preprocessing. `persistent`: its workers live across
    iterations (training makes one for all its validations; close it at the end)."""
    return eval_stream.eval_loader(dataset_dir, manifest, split=split, image_size=net.image_size, batch_size=batch_size,
                            workers=workers, rank=d.rank, world=d.world,
                            preprocess=metrics.get_protocol(protocol).preprocess,
                            pin_memory=d.device.type == "cuda", persistent=persistent)


def score_split(net, dataset_dir: Path, manifest: dict, split: str, d, *, batch_size: int = 16,
                workers: int = 0, protocol: str = "original", max_batches: int | None = None,
                loader: data.Loader | None = None, sensitivity: bool = False, gres: bool = False) -> SplitScores:
    """I/U of every sentence of `split` (this rank's part; gathered on every rank when distributed).

    `loader`: a `split_loader` of the same split, batch size, workers and protocol to read from
    (training's persistent one), else one is made for this call. `sensitivity`: also run each
    batch with every sentence swapped for one of another ref of its image and measure how much
    the output moves (refbench.eval.sensitivity; a second forward per batch, which I/U never reads).
    `gres` (gRefCOCO): also keep per sentence "n_targets" and "pred_no_target", the no-target
    decision (refbench.eval.gres_eval.no_target_decision: nt_logit > 0 for a model with a
    no-target head, else an empty binarised mask)."""
    if loader is None:
        loader = split_loader(net, dataset_dir, manifest, split, d, batch_size=batch_size, workers=workers,
                              protocol=protocol)
    was_training = net.training
    net.eval()
    scores = SplitScores()
    if gres:
        scores.columns.update(n_targets=[], pred_no_target=[])
    meter = diversity.DiversityMeter()
    sens = sensitivity_mod.SensitivityMeter() if sensitivity else None
    start = time.perf_counter()
    error = None  # a bad shard seen by one rank: (message, hint), raised on every rank after the gather
    try:
        for b, batch in enumerate(loader):
            if max_batches is not None and b >= max_batches:
                break
            on_device = data.to_device(batch, d.device)  # uint8 images normalised on the device
            out = forward_float32(net, on_device["image"], on_device["tokens"])
            meter.update(out)
            if sens is not None:
                swapped = forward_float32(net, on_device["image"], batch["swap_tokens"].to(d.device))
                sens.update(out, swapped, net.threshold, keep=batch["has_swap"])
            probs = torch.sigmoid(out["logits"].float())
            t0 = time.perf_counter()
            inter, union = count_iu(probs, batch, net.threshold, protocol)
            scores.seconds_metric += time.perf_counter() - t0
            for k in COLUMNS:
                scores.columns[k].extend(batch[k])
            scores.columns["I"].extend(inter.tolist())
            scores.columns["U"].extend(union.tolist())
            if gres:
                scores.columns["n_targets"].extend(batch["n_targets"])
                scores.columns["pred_no_target"].extend(gres_eval.no_target_decision(out, inter, union, batch).tolist())
    except RefbenchError as e:
        if d.world == 1:
            raise
        error = (e.message, e.hint)
    finally:
        net.train(was_training)
    scores.seconds_total = time.perf_counter() - start
    if d.world > 1:
        # every rank gathers, also one that failed: no rank is left waiting in the collective
        gathered = all_gather_object(d, (scores.columns, meter.state(), sens and sens.state(), error))
        failed = [err for *_, err in gathered if err is not None]
        if failed:
            raise RefbenchError(*failed[0])
        merged = SplitScores(seconds_total=scores.seconds_total, seconds_metric=scores.seconds_metric)
        meter = diversity.DiversityMeter()
        sens = sensitivity_mod.SensitivityMeter() if sensitivity else None
        for cols, state, sens_state, _ in gathered:
            merged.extend(SplitScores(columns=cols))
            meter.merge(state)
            if sens is not None:
                sens.merge(sens_state)
        scores = merged
    scores.diversity = meter.result()
    scores.sensitivity = sens.result() if sens is not None else None
    return scores


def validate(net, dataset_dir: Path, manifest: dict, d, *, batch_size: int, workers: int,
             max_batches: int | None = None, protocol: str = "original", loader: data.Loader | None = None) -> dict:
    """Training-time validation on the val split (float32), and the query diversity figures on val
    for models with queries (`query_diversity`). `loader`: as `score_split`'s.

    RefCOCO-style datasets: mIoU, oIoU, Pr@X under the recipe's protocol (default original).
    gRefCOCO (`grefcoco_*`): gIoU, cIoU, N-acc, T-acc, Pr@0.7..0.9 under the gRefCOCO protocol
    original (refbench.eval.gres_metrics), whatever the recipe's protocol: I and U at the image's
    size, the no-target decision as `refbench eval` takes it (refbench.eval.gres_eval)."""
    gres = is_gres(manifest["name"])
    scores = score_split(net, dataset_dir, manifest, "val", d, batch_size=batch_size, workers=workers, max_batches=max_batches,
                         protocol=validation_protocol(manifest["name"], protocol), loader=loader, gres=gres)
    c = scores.columns
    if gres:
        summary = gres_metrics.summarize(c["I"], c["U"], np.asarray(c["n_targets"]) == 0,
                                         np.asarray(c["pred_no_target"], dtype=bool), gres_eval.PROTOCOL)
    else:
        summary = metrics.summarize(c["I"], c["U"], strict=metrics.get_protocol(protocol).pr_strict)
    if scores.diversity is not None:
        summary["query_diversity"] = scores.diversity
    return summary


def validation_protocol(dataset: str, protocol: str) -> str:
    """The protocol `validate` counts I and U under: the recipe's, or gRefCOCO's original."""
    return gres_eval.PROTOCOL if is_gres(dataset) else protocol


def selection_metric(dataset: str, protocol: str) -> tuple[str, str]:
    """(key of `validate`'s summary, its name) that picks best.pt: val mIoU, or gIoU on gRefCOCO."""
    if is_gres(dataset):
        return "gIoU", f"val gIoU (gRefCOCO {gres_eval.PROTOCOL} protocol)"
    return "mIoU", f"val mIoU ({protocol} protocol)"


def validation_line(summary: dict) -> str:
    """The progress note of one validation: mIoU and oIoU, or gIoU, cIoU, N-acc and T-acc on gRefCOCO."""
    if "gIoU" in summary:
        acc = ", ".join(f"{k} {'n/a' if summary[k] is None else f'{summary[k]:.4f}'}" for k in ("cIoU", "N-acc", "T-acc"))
        return f"val gIoU {summary['gIoU']:.4f}, {acc}"
    return f"val mIoU {summary['mIoU']:.4f}, oIoU {summary['oIoU']:.4f}"


# ------------------------------------------------------------------------------ `refbench eval`


EVAL_SPLITS_EXCLUDE = ("train",)  # `--split all` scores every split but these


def main(checkpoint: Path, dataset: str | None, split: str, shards: Path, protocol: str | None, batch_size: int,
         workers: int | None, vis: int, results: Path, run_name: str | None) -> list[Path]:
    """`refbench eval`: score a checkpoint on one split (or all), publish records, print the table."""
    done = evaluate_checkpoint(checkpoint, dataset=dataset, splits=[split], shards=shards, protocol=protocol,
                               batch_size=batch_size, workers=workers, vis=vis, results=results, run_name=run_name)
    if done:
        print_scores(done)
    return [e.path for e in done]


@dataclass
class Evaluated:
    """One published record: where it is, what it says, and the scoring loop's timings."""

    dataset: str
    split: str
    protocol: str
    model: Any  # results.ModelInfo
    path: Path  # the record's JSON file
    scores: SplitScores
    pictures: list[Path] = field(default_factory=list)


def load_scoring_inputs(ckpt: dict, checkpoint, dataset: str | None, shards, device):
    """The model of a loaded checkpoint on `device`, and the dataset it is scored on (`dataset`,
    else the one it trained on): (net, dataset name, dataset folder or URL, manifest).
    Shared by `refbench eval` and `refbench predictions`."""
    net = ckpt_mod.build_model(ckpt, checkpoint).to(device)
    dataset = dataset or ckpt.get("dataset", {}).get("name")
    if not dataset:
        raise RefbenchError(f"{checkpoint}: the checkpoint names no dataset", hint="pass --dataset, e.g. refcoco_unc")
    dataset_dir = remote.join(shards, dataset)  # a folder or a URL
    return net, dataset, dataset_dir, data.load_manifest(dataset_dir)


def evaluate_checkpoint(checkpoint: Path, *, dataset: str | None = None, splits: list[str] = ("val",),
                        shards: Path = Path("shards"), protocol: str | None = None, batch_size: int = 16,
                        workers: int | None = None, vis: int = 0, results: Path = Path("leaderboard/results"),
                        run_name: str | None = None) -> list[Evaluated]:
    """Score a checkpoint on `splits` ("all" = every split but train) and publish one record each.

    Returns the published records on rank 0 (an empty list on other ranks).
    """
    if protocol is not None:
        metrics.get_protocol(protocol)
    check_output_folder(Path(results), "--results")  # before any work, not after the whole eval
    workers = cap_workers(workers)
    d = setup_distributed()
    ckpt = ckpt_mod.load(checkpoint)
    protocol = protocol or checkpoint_protocol(ckpt)
    net, dataset, dataset_dir, manifest = load_scoring_inputs(ckpt, checkpoint, dataset, shards, d.device)
    gres = is_gres(dataset)
    if gres:
        gres_eval.check_protocol(protocol, dataset)
    if list(splits) == ["all"]:
        splits = [s for s in manifest["splits"] if s not in EVAL_SPLITS_EXCLUDE]
    for s in splits:
        if s not in manifest["splits"]:
            raise RefbenchError(f"{remote.join(dataset_dir, 'manifest.json')}: no split {s!r}; splits: "
                                f"{', '.join(manifest['splits'])} (or 'all')")
    workers = 2 if workers is None else workers
    model_info = results_mod.ModelInfo(
        name=ckpt["model"]["name"], variant=ckpt["model"]["variant"], config=ckpt["model"]["config"],
        run=run_name or Path(checkpoint).resolve().parent.name, checkpoint=str(checkpoint),
        checkpoint_sha256=sha256_file(checkpoint), step=ckpt.get("step"),
    )
    manifest_sha = remote.sha256(remote.join(dataset_dir, "manifest.json"))
    # every split is scored before any record is published, and a refusal of any split's record
    # withdraws those of this call already written: `--split all` publishes all splits or none
    scored = [(s, score_split(net, dataset_dir, manifest, s, d, batch_size=batch_size, workers=workers,
                              protocol=protocol, sensitivity=not gres, gres=gres)) for s in splits]
    if d.rank != 0:
        return []
    done: list[Evaluated] = []
    try:
        for s, scores in scored:
            if gres:  # a gRefCOCO record (task "gres", refbench.eval.gres_records), protocol original
                path = gres_eval.write_record(results, dataset=dataset, split=s, model=model_info,
                                              manifest=manifest, manifest_sha=manifest_sha, columns=scores.columns)
                done.append(Evaluated(dataset=dataset, split=s, protocol=protocol, model=model_info, path=path, scores=scores))
                continue
            path = results_mod.write_record(
                results, dataset=dataset, split=s, protocol=protocol, threshold=net.threshold, model=model_info,
                data=results_mod.DataInfo(manifest_sha256=manifest_sha, sentences_expected=manifest["splits"][s]["sentences"],
                                          synthetic=bool(manifest.get("synthetic", False))),
                sentences=scores.columns,
                extras=record_extras(scores),
            )
            done.append(Evaluated(dataset=dataset, split=s, protocol=protocol, model=model_info, path=path, scores=scores))
    except BaseException:
        for e in done:
            results_mod.withdraw_record(e.path)
        raise
    if vis:
        for item in done:
            item.pictures = render_examples(net, dataset_dir, manifest, item.split, item.scores, vis,
                                            results_dir_for(item.path), d.device,
                                            preprocess=metrics.get_protocol(protocol).preprocess)
    return done


def record_extras(scores: SplitScores) -> dict | None:
    """What a record keeps beside its metrics: the query diversity (models with queries) and the
    sentence sensitivity (refbench.eval.sensitivity), where measured."""
    extras = {"query_diversity": scores.diversity, "sentence_sensitivity": scores.sensitivity}
    return {k: v for k, v in extras.items() if v is not None} or None


def results_dir_for(record_path: Path) -> Path:
    """Folder for the pictures of a record: `<record stem>-vis/` beside it."""
    return record_path.with_name(record_path.stem + "-vis")


def print_scores(done: list[Evaluated]) -> None:
    """The rich table of `refbench eval`: one row per record, every number named (gRefCOCO records:
    refbench.eval.gres_eval.print_scores)."""
    if done and results_mod.load_record(done[0].path).meta.get("task") == gres_eval.TASK:
        gres_eval.print_scores(done)
        return
    console = Console()
    first = done[0]
    table = Table(title=f"{first.model.name}/{first.model.variant} ({first.model.run}): "
                        f"{metrics.get_protocol(first.protocol).description}", title_justify="left")
    for col in ("dataset", "split", "protocol", "n", "mIoU % [95% CI]", "oIoU % [95% CI]", *[f"{k} %" for k in metrics.PR_KEYS]):
        table.add_column(col, justify="right" if col not in ("dataset", "split", "protocol") else "left")
    for e in done:
        m = results_mod.load_record(e.path).meta["metrics"]
        ci = m["ci95"]
        table.add_row(
            e.dataset, e.split, e.protocol, str(m["n"]),
            f"{100 * m['mIoU']:.2f} [{100 * ci['mIoU'][0]:.2f}, {100 * ci['mIoU'][1]:.2f}]",
            f"{100 * m['oIoU']:.2f} [{100 * ci['oIoU'][0]:.2f}, {100 * ci['oIoU'][1]:.2f}]",
            *[f"{100 * m[k]:.2f}" for k in metrics.PR_KEYS],
        )
    console.print(table)
    for e in done:
        share = e.scores.seconds_metric / e.scores.seconds_total if e.scores.seconds_total else 0.0
        console.print(f"{e.split}: record {e.path} ({len(e.scores)} sentences, {e.scores.seconds_total:.1f} s, "
                      f"{100 * share:.1f}% of it in metric code)")
        if e.scores.diversity is not None:
            console.print(f"{e.split}: query diversity of {e.model.name}, mean over {e.scores.diversity['n']} sentences "
                          f"of {e.dataset}/{e.split}:")
            for line in diversity.describe(e.scores.diversity):
                console.print(f"  {line}")
        if e.scores.sensitivity is not None:
            console.print(f"{e.split}: sentence sensitivity of {e.model.name}, mean over {e.scores.sensitivity['n']} "
                          f"sentences of {e.dataset}/{e.split} (each against a sentence of another ref of its image):")
            for line in sensitivity_mod.describe(e.scores.sensitivity):
                console.print(f"  {line}")
        if e.pictures:
            console.print(f"{e.split}: {len(e.pictures)} pictures in {results_dir_for(e.path)}")

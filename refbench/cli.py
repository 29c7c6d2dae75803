"""The `refbench` command line: a thin click group.

Each command parses its options, calls one function of the module that owns the work, and
prints the outcome. Modules are imported inside the commands, so `refbench --help` imports
neither torch nor open_clip (a test keeps it so). The choices of `--variant`, `--recipe`,
`--protocol`, `--amp`, `--dataset`, `--split-by` and of `refbench bench` come from the
registries that own them (`RegistryChoice`), read when an option is parsed or its help shown:
a variant, recipe or protocol added there is accepted here without an edit.

No traceback reaches a user:
- user errors (`RefbenchError`, `models.ModelError`) are one line, `error: ...` (and `hint:
  ...`), exit status 2;
- the machine refusing (disk full, permission denied, read-only filesystem, out of memory) is
  one line naming the file, exit status 2;
- anything else is a bug in refbench: one line saying so, exit status 1, and the full traceback
  with the command line written to a log file whose path the line gives (`bug_log_dir`).
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

import click


class RegistryChoice(click.Choice):
    """A `click.Choice` whose choices are read from a registry each time they are needed."""

    def __init__(self, source: Callable[[], Sequence[str]]) -> None:
        self._source = source
        super().__init__(())

    @property
    def choices(self) -> tuple[str, ...]:
        return tuple(self._source())

    @choices.setter
    def choices(self, value) -> None:  # click.Choice.__init__ assigns; the registry is the source
        pass


def _variants() -> list[str]:
    """The variants of the MODEL being parsed, or of every registered model."""
    from refbench import models

    ctx = click.get_current_context(silent=True)
    model = ctx.params.get("model") if ctx is not None else None
    try:
        return models.variant_names(model)
    except models.ModelError:
        return models.variant_names()


def _cris_variants() -> list[str]:
    from refbench import models

    return models.variant_names("cris")


def _recipes() -> list[str]:
    from refbench.train.recipes import RECIPES

    return list(RECIPES)


def _amp_modes() -> list[str]:
    from refbench.train.recipes import AMP_MODES

    return list(AMP_MODES)


def _protocols() -> list[str]:
    from refbench.eval.metrics import PROTOCOLS

    return list(PROTOCOLS)


def _datasets() -> list[str]:
    from refbench.data.datasets import DATASETS, GRES_DATASETS

    return list(DATASETS + GRES_DATASETS)


def _split_bys() -> list[str]:
    from refbench.data.datasets import SPLIT_BYS

    return list(SPLIT_BYS)


def _benches() -> list[str]:
    from refbench.bench import BENCHES

    return [*BENCHES, "all"]


class _Group(click.Group):
    """A click group that turns user errors into one clear line instead of a traceback."""

    def invoke(self, ctx: click.Context):
        from refbench.errors import RefbenchError
        from refbench.models.api import ModelError

        try:
            return super().invoke(ctx)
        except RefbenchError as e:
            _fail(e.message, e.hint)
        except ModelError as e:
            _fail(str(e), None)
        except KeyboardInterrupt:
            _fail("interrupted", None, status=130)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise  # click's own flow and usage errors: click prints them
        except MemoryError:
            _fail("out of memory", "a smaller --batch-size or --workers, or a machine with more memory")
        except OSError as e:
            if e.errno in _ENVIRONMENT_ERRNOS:
                where = f"{e.filename}: " if e.filename else ""
                _fail(f"{where}{e.strerror or e}", "free disk space or fix the permissions, then run the command again")
            _bug(e)
        except Exception as e:
            _bug(e)


_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOMEM}


def _fail(message: str, hint: str | None, status: int = 2) -> None:
    click.secho(f"error: {message}", fg="red", err=True)
    if hint:
        click.echo(f"hint: {hint}", err=True)
    sys.exit(status)


def bug_log_dir() -> Path:
    """Where tracebacks of refbench's own bugs go: $REFBENCH_LOG_DIR, else <cache>/refbench/bugs."""
    if os.environ.get("REFBENCH_LOG_DIR"):
        return Path(os.environ["REFBENCH_LOG_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "refbench" / "bugs"


def _bug(e: BaseException) -> None:
    """An unexpected exception: one line saying it is a bug, the trace in a log file; exit 1."""
    import tempfile
    import time
    import traceback

    from refbench import __version__

    text = (f"refbench {__version__}, python {sys.version.split()[0]}\n"
            f"command: {' '.join(sys.argv)}\ncwd: {os.getcwd()}\n\n" + "".join(traceback.format_exception(e)))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    log = None
    for folder in (bug_log_dir(), Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            log = folder / f"refbench-bug-{stamp}-{os.getpid()}.log"
            log.write_text(text)
            break
        except OSError:
            log = None
    summary = " ".join(f"{type(e).__name__}: {e}".split())[:300]
    where = f"the full traceback is in {log}" if log else "the traceback could not be written to a log file"
    _fail(f"this is a bug in refbench, not in your input ({summary})",
          f"{where}; please report it with the command that caused it", status=1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="refbench")
def cli() -> None:
    """refbench: Referring Image Segmentation data, models, training, scoring and leaderboard.

    \b
    Typical session:
      refbench quickstart                      # everything, on the embedded synthetic data
      refbench prepare --all --data data/      # real RefCOCO/RefCOCO+/G-Ref -> shards/
      refbench train eavl --variant rn101 --pretrained openai
      refbench eval --checkpoint runs/eavl/best.pt --split testB
      refbench leaderboard --format html --out leaderboard/index.html
    """


# --------------------------------------------------------------------------------- data


@cli.command()
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder to write the raw REFER-format dataset into.")
@click.option("--images", type=click.IntRange(min=20), default=None, help="Number of images (default: small, ~a minute for synth + prepare; 20000 ~ RefCOCO size).")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed; the output is byte-identical for a seed.")
@click.option("--parquet", is_flag=True, help="Also write each dataset as a Hugging Face parquet mirror snapshot "
                                                 "(OUT/<dataset>/data/*.parquet, the jxu124 layout; same refs, same ids).")
def synth(out: Path, images: int | None, seed: int, parquet: bool) -> None:
    """Write a synthetic referring dataset in exactly the raw REFER layout.

    Writes OUT/refcoco/refs(unc).p, OUT/refcoco+/refs(unc).p, OUT/refcocog/refs(umd).p and
    refs(google).p, an instances.json per dataset, and JPEGs under OUT/images/train2014/; with
    --parquet also OUT/<dataset>/README.md and data/<split>-00000-of-00001.parquet (prepare them
    with `refbench prepare --source hf`).
    """
    from refbench.data.synth import generate as synth_mod

    synth_mod.main(out=out, images=images, seed=seed, parquet=parquet)


@cli.command()
@click.option("--dataset", type=RegistryChoice(_datasets), default=None, help="Dataset to prepare (or use --all).")
@click.option("--split-by", "split_by", type=RegistryChoice(_split_bys), default=None, help="Split partition: unc (RefCOCO/+), umd or google (G-Ref).")
@click.option("--all", "all_", is_flag=True, help="Prepare every dataset/partition found under --data.")
@click.option("--data", type=click.Path(path_type=Path), default=Path("data"), show_default=True, help="Folder holding refcoco/, refcoco+/, refcocog/: raw refer files or parquet mirror snapshots.")
@click.option("--images", type=click.Path(path_type=Path), default=None, help="COCO train2014 JPEG folder [default: <data>/images/train2014].")
@click.option("--out", type=click.Path(path_type=Path), default=Path("shards"), show_default=True, help="Shard root; writes <out>/<dataset>_<splitby>/.")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Parallel worker processes [default: number of cores].")
@click.option("--skip-bad", is_flag=True, help="Skip bad refs/images (counted and listed in the manifest) instead of stopping.")
@click.option("--shard-size", type=click.IntRange(min=1), default=None, help="Maximum images per shard tar.")
@click.option("--source", type=click.Choice(["refer", "hf"]), default=None,
              help="Raw annotations: refer files (refs(<splitby>).p + instances.json) or a Hugging Face parquet mirror snapshot "
                   "(<data>/<dataset>/data/*.parquet, e.g. jxu124/refcoco) [default: whichever is there].")
def prepare(dataset, split_by, all_, data, images, out, workers, skip_bad, shard_size, source) -> None:
    """Convert raw annotations + COCO JPEGs into webdataset shards.

    Reads the refer toolkit's files (refs pickle + instances.json) or a local snapshot of a parquet
    mirror (jxu124/refcoco, jxu124/refcocoplus, jxu124/refcocog under <data>/refcoco, refcoco+,
    refcocog); both give the same shards.

    Output: OUT/<dataset>_<splitby>/<split>/<split>-NNNNNN.tar and OUT/<dataset>_<splitby>/manifest.json.
    """
    from refbench.data import prepare as prepare_mod

    prepare_mod.main(
        dataset=dataset, split_by=split_by, all_=all_, data=data, images=images, out=out,
        workers=workers, skip_bad=skip_bad, shard_size=shard_size, source=source,
    )


# --------------------------------------------------------------------------------- models


@cli.command("models")
def models_cmd() -> None:
    """List the registered models, their variants and config fields."""
    from refbench.report import console as report

    report.print_models()


# --------------------------------------------------------------------------------- train


@cli.command(context_settings={"ignore_unknown_options": False})
@click.argument("model")
@click.option("--variant", type=RegistryChoice(_variants), default=None, help="Backbone variant [default: the recipe's].")
@click.option("--dataset", default="refcoco_unc", show_default=True, help="Prepared dataset: <dataset>_<splitby> under --shards.")
@click.option("--shards", default="shards", show_default=True, help="Shard root written by `refbench prepare`: a folder, or a URL (http(s)://, s3://, gs://, ... via fsspec) streamed.")
@click.option("--recipe", type=RegistryChoice(_recipes), default="paper", show_default=True, help="Training recipe (refbench.train.recipes): paper (EAVL section 4.1), cris (CRIS's own RefCOCO config), tiny (CPU quickstart), ...")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Epochs (one epoch = one pass over the train refs in expectation).")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Total optimizer steps (instead of --epochs).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Global batch size across all ranks.")
@click.option("--lr", type=float, default=None, help="Peak learning rate (a finite number > 0).")
@click.option("--backbone-lr-scale", type=click.FloatRange(min=0.0), default=None, help="lr multiplier of the CLIP encoders [default: the recipe's; paper and cris: 0.1, as CRIS's lr_multi; 1 = one lr for the whole network].")
@click.option("--pretrained", default=None, help="open_clip pretrained tag (e.g. openai) or a local weights file.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Run folder [default: runs/<model>-<variant>-<dataset>].")
@click.option("--resume", is_flag=True, help="Continue from <out>/last.pt.")
@click.option("--amp", type=RegistryChoice(_amp_modes), default=None, help="Autocast mode [default: the recipe's; auto = bf16 on CUDA, off on CPU].")
@click.option("--workers", type=click.IntRange(min=0), default=None, help="DataLoader workers per rank.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
@click.option("--set", "overrides", multiple=True, metavar="FIELD=VALUE", help="Override a model config field, e.g. --set num_queries=8 (repeatable).")
def train(model, variant, dataset, shards, recipe, epochs, steps, batch_size, lr, backbone_lr_scale, pretrained, out, resume, amp, workers, seed, overrides) -> None:
    """Train MODEL (eavl, cris, blind, a plug-in's name, or module:SPEC) on prepared shards, streaming.

    Multi-GPU / multi-node: torchrun --nproc_per_node 8 -m refbench train eavl ...
    """
    from refbench.train import runs

    runs.main(
        model=model, variant=variant, dataset=dataset, shards=shards, recipe=recipe, epochs=epochs,
        steps=steps, batch_size=batch_size, lr=lr, backbone_lr_scale=backbone_lr_scale, pretrained=pretrained, out=out, resume=resume,
        amp=amp, workers=workers, seed=seed, overrides=overrides,
    )


# --------------------------------------------------------------------------------- convert


@cli.group()
def convert() -> None:
    """Turn another codebase's checkpoint into a refbench checkpoint."""


@convert.command("cris")
@click.argument("ckpt", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="The refbench checkpoint to write.")
@click.option("--variant", type=RegistryChoice(_cris_variants), default=None, help="Backbone [default: read from the checkpoint].")
@click.option("--image-size", type=click.IntRange(min=32), default=416, show_default=True, help="Network input side (CRIS's configs: 416).")
@click.option("--dataset", default=None, help="Prepared dataset the model was trained on (e.g. refcoco_unc), so eval needs no --dataset.")
@click.option("--context-length", type=click.IntRange(min=2, max=77), default=17, show_default=True, help="CRIS's word_len (17 RefCOCO/RefCOCO+, 22 G-Ref), used by predict.")
def convert_cris_cmd(ckpt, out, variant, image_size, dataset, context_length) -> None:
    """A CRIS.pytorch checkpoint (its state-dict keys, "module." prefixed) -> refbench checkpoint."""
    from refbench.train import convert as convert_mod

    path = convert_mod.convert_cris(ckpt, out, variant=variant, image_size=image_size, dataset=dataset,
                                    context_length=context_length)
    click.echo(f"convert: {ckpt} (CRIS.pytorch) -> {path} (refbench cris, {image_size} px); "
               f"score it with `refbench eval --checkpoint {path} --protocol cris`")


# --------------------------------------------------------------------------------- eval


@cli.command("eval")
@click.option("--checkpoint", type=click.Path(path_type=Path), required=True, help="Checkpoint written by `refbench train` (best.pt or last.pt).")
@click.option("--dataset", default=None, help="Prepared dataset <dataset>_<splitby> [default: the one the checkpoint was trained on].")
@click.option("--split", default="val", show_default=True, help="Split to score (val, testA, testB, test), or 'all' for every split but train.")
@click.option("--shards", default="shards", show_default=True, help="Shard root written by `refbench prepare`: a folder, or a URL (http(s)://, s3://, gs://, ... via fsspec) streamed.")
@click.option("--protocol", type=RegistryChoice(_protocols), default=None, help="Metric protocol (refbench.eval.metrics.PROTOCOLS): original = I/U at the original image size (one bilinear map back); cris = CRIS's own chain with OpenCV, its preprocessing included (the CRIS/EAVL papers' numbers); input = at the network input (LAVT-style) [default: the checkpoint's recipe protocol: cris for the cris and paper recipes and converted CRIS weights, original otherwise].")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Sentences per forward pass.")
@click.option("--workers", type=click.IntRange(min=0), default=None, help="DataLoader workers.")
@click.option("--vis", type=click.IntRange(min=0), default=0, show_default=True, help="Save N overlay PNGs per split (best, worst, random).")
@click.option("--results", type=click.Path(path_type=Path), default=Path("leaderboard/results"), show_default=True, help="Where result records are written.")
@click.option("--run-name", default=None, help="Name of the run in the record [default: the checkpoint's run folder].")
def eval_cmd(checkpoint, dataset, split, shards, protocol, batch_size, workers, vis, results, run_name) -> None:
    """Score a checkpoint on a split: every sentence of every ref, mIoU, oIoU, Pr@0.5..0.9."""
    from refbench.eval import evaluate

    evaluate.main(
        checkpoint=checkpoint, dataset=dataset, split=split, shards=shards, protocol=protocol,
        batch_size=batch_size, workers=workers, vis=vis, results=results, run_name=run_name,
    )


@cli.command()
@click.option("--dataset", default=None, help="Only this dataset (e.g. refcoco_unc).")
@click.option("--format", "fmt", type=click.Choice(["md", "csv", "json", "html"]), default="md", show_default=True, help="Export format.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Write here instead of printing.")
@click.option("--results", type=click.Path(path_type=Path), default=Path("leaderboard/results"), show_default=True, help="Folder of measured result records.")
@click.option("--reported", type=click.Path(path_type=Path), default=None, help="Folder of reported (paper) rows [default: the rows shipped with refbench].")
def leaderboard(dataset, fmt, out, results, reported) -> None:
    """Gather measured records and reported paper rows into one leaderboard table."""
    from refbench.report import leaderboard as lb

    given = click.get_current_context().get_parameter_source("results") != click.core.ParameterSource.DEFAULT
    lb.main(dataset=dataset, fmt=fmt, out=out, results=results, reported=reported, results_required=given)


@cli.command()
@click.argument("result_a", type=click.Path(path_type=Path))
@click.argument("result_b", type=click.Path(path_type=Path))
@click.option("--samples", type=click.IntRange(min=100), default=2000, show_default=True, help="Bootstrap resamples.")
@click.option("--seed", type=int, default=0, show_default=True, help="Bootstrap seed.")
def compare(result_a, result_b, samples, seed) -> None:
    """Paired bootstrap of two result records on the same split: B - A with its 95% interval."""
    from refbench.eval import results as results_mod

    results_mod.main_compare(result_a, result_b, samples=samples, seed=seed)


# --------------------------------------------------------------------------------- any model's masks


@cli.command()
@click.option("--dataset", required=True, help="Prepared dataset <dataset>_<splitby>, e.g. refcoco_unc.")
@click.option("--split", required=True, help="Split (val, testA, testB, test, ...).")
@click.option("--shards", default="shards", show_default=True, help="Shard root written by `refbench prepare`: a folder or a URL (http(s)://, s3://, ...).")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Write the JSONL here (gzip if it ends in .gz) [default: stdout].")
def sentences(dataset, split, shards, out) -> None:
    """The exact list of sentences to predict for a split: JSONL, one line per sentence.

    \b
    Fields, in a stable order (the shards'): sent_id, ref_id, ann_id, image_id,
    file_name (the COCO image file), height, width, category_id, sentence (raw text).
    Run your model over it and score the masks with `refbench score`.
    """
    from refbench.data.datasets import is_gres
    from refbench.eval import gres_score, score

    (gres_score if is_gres(dataset) else score).main_sentences(dataset=dataset, split=split, shards=shards, out=out)


@cli.command()
@click.option("--checkpoint", type=click.Path(path_type=Path), required=True, help="Checkpoint written by `refbench train`.")
@click.option("--split", required=True, help="Split to predict (val, testA, testB, test, ...).")
@click.option("--dataset", default=None, help="Prepared dataset <dataset>_<splitby> [default: the checkpoint's].")
@click.option("--shards", default="shards", show_default=True, help="Shard root written by `refbench prepare`: a folder or a URL (http(s)://, s3://, ...).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Submission file to write: JSONL of COCO RLEs (gzip if it ends in .gz).")
@click.option("--protocol", default="original", show_default=True, help="Whose chain makes the masks: original (one bilinear map back) or cris (CRIS's OpenCV chain); input has no original-size masks.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Sentences per forward pass.")
@click.option("--workers", type=click.IntRange(min=0), default=None, help="DataLoader workers.")
def predictions(checkpoint, split, dataset, shards, out, protocol, batch_size, workers) -> None:
    """Export a checkpoint's binarised masks at the original image size, as a `refbench score` submission.

    Scoring the file under the same --protocol gives exactly the per-sentence I and U of `refbench eval`.
    """
    from refbench.eval import predictions as predictions_mod

    predictions_mod.main(checkpoint=checkpoint, split=split, dataset=dataset, shards=shards, out=out,
                         protocol=protocol, batch_size=batch_size, workers=workers)


@cli.command("score")
@click.argument("predictions_path", metavar="PREDICTIONS", type=click.Path(path_type=Path))
@click.option("--dataset", required=True, help="Prepared dataset <dataset>_<splitby> the masks are for, e.g. refcoco_unc.")
@click.option("--split", required=True, help="Split the masks are for (val, testA, testB, test, ...).")
@click.option("--method", required=True, help="Name of the method on the leaderboard, e.g. LAVT.")
@click.option("--variant", default="default", show_default=True, help="Variant of the method (backbone, checkpoint name, ...).")
@click.option("--shards", default="shards", show_default=True, help="Shard root written by `refbench prepare`: a folder or a URL (http(s)://, s3://, ...) (the ground truth).")
@click.option("--protocol", default="original", show_default=True,
              help="Metric protocol. Those that compare at the original image size apply to binary masks "
                   "(original: Pr@X counts IoU >= X; cris: IoU > X, as CRIS's code); those that compare at the "
                   "network input (input) need the model's probability map and refuse a submission.")
@click.option("--results", type=click.Path(path_type=Path), default=Path("leaderboard/results"), show_default=True, help="Where the result record is written.")
@click.option("--note", default="", help="Free text kept in the record and shown in the leaderboard's provenance.")
def score_cmd(predictions_path, dataset, split, method, variant, shards, protocol, results, note) -> None:
    """Score any model's binary masks against the split's ground truth; writes a result record.

    \b
    PREDICTIONS is one of (masks at the original image size, one per sentence):
      - a JSONL file (optionally .gz), one line per sentence:
        {"sent_id": 123, "rle": {"size": [H, W], "counts": "..."}}
        (COCO compressed RLE as pycocotools' mask.encode writes it, counts as a string);
      - a JSONL file of {"sent_id": 123, "png": "relative/path.png"} lines;
      - a folder of <sent_id>.png files, nonzero = foreground.
    Every sentence of the split exactly once (see `refbench sentences`); a bad submission
    is refused with one line and nothing is written.
    """
    from refbench.data.datasets import is_gres
    from refbench.eval import gres_score, score

    (gres_score if is_gres(dataset) else score).main(
        predictions=predictions_path, dataset=dataset, split=split, method=method, variant=variant, shards=shards,
        protocol=protocol, results=results, note=note)


@cli.command()
@click.option("--checkpoint", type=click.Path(path_type=Path), required=True, help="Checkpoint written by `refbench train`.")
@click.option("--image", type=click.Path(path_type=Path), required=True, help="Image file (JPEG/PNG).")
@click.option("--text", required=True, help="The referring expression.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("mask.png"), show_default=True, help="Mask PNG; the overlay goes beside it as <out>-overlay.png.")
def predict(checkpoint, image, text, out) -> None:
    """Segment what TEXT refers to in one IMAGE: writes the mask PNG and an overlay."""
    from refbench.eval import visualize

    visualize.main_predict(checkpoint=checkpoint, image=image, text=text, out=out)


# --------------------------------------------------------------------------------- end to end


@cli.command()
@click.option("--workdir", type=click.Path(path_type=Path), default=Path("refbench-quickstart"), show_default=True, help="Folder for data, shards, runs and results.")
@click.option("--fast", is_flag=True, hidden=True, help="A shortened run for tests.")
@click.option("--task", type=click.Choice(["ris", "gres"]), default="ris", show_default=True, help="ris: synthetic RefCOCO (mIoU, oIoU, leaderboard); gres: synthetic gRefCOCO (gIoU, cIoU, N-acc, T-acc).")
def quickstart(workdir, fast, task) -> None:
    """Run the whole benchmark on the embedded synthetic dataset, offline, on CPU (<10 min)."""
    from refbench import quickstart as qs

    qs.main(workdir=workdir, fast=fast, task=task)


@cli.command()
@click.option("--workdir", type=click.Path(path_type=Path), default=Path("ablations"), show_default=True, help="Folder for data, runs and the report.")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Training steps per ablation run.")
def ablate(workdir, steps) -> None:
    """Reproduce the shape of the EAVL paper's ablations (Tables 2-4) on synthetic RefCOCO+."""
    from refbench.ablate import run as ablate_mod

    ablate_mod.main(workdir=workdir, steps=steps)


class _DefaultCommandGroup(_Group):
    """A group whose arguments go to its default command unless they start with one of its
    other commands: `refbench bench step score` runs benchmarks, `refbench bench seeds eavl`
    the seed table. Its help is the default command's, with the other commands listed."""

    default = "run"

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ctx.help_option_names):
            args = [self.default, *args]
        return super().parse_args(ctx, args)

    def format_help(self, ctx: click.Context, formatter) -> None:
        run = self.commands[self.default]
        run.format_help(click.Context(run, info_name=ctx.info_name, parent=ctx.parent), formatter)
        self.format_commands(ctx, formatter)


@cli.group(cls=_DefaultCommandGroup)
def bench() -> None:
    """Measure refbench against its baselines side by side and print ratios (default: all)."""


@bench.command("run", hidden=True)
@click.argument("which", nargs=-1, type=RegistryChoice(_benches))
@click.option("--workdir", type=click.Path(path_type=Path), default=Path("bench"), show_default=True, help="Scratch folder for the benchmark data.")
@click.option("--images", type=click.IntRange(min=20), default=2000, show_default=True, help="Synthetic images for the data benchmarks.")
@click.option("--log", type=click.Path(path_type=Path), default=Path("bench/bench.jsonl"), show_default=True, help="JSON lines file the results are appended to.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Also write the rows to OUT/bench.json and OUT/bench.md.")
def bench_run(which, workdir, images, log, out) -> None:
    """Measure refbench against its baselines side by side and print ratios (default: all)."""
    from refbench import bench as bench_mod

    bench_mod.main(which=which or ("all",), settings=bench_mod.BenchSettings(workdir=workdir, images=images, log=log), out=out)


@bench.command("seeds")
@click.argument("models", nargs=-1, required=True)
@click.option("--seeds", "seed_list", default="0-3", show_default=True, help="Training seeds: a range (0-3), a list (0,2,5) or a count (4).")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Training steps per run [default: the quickstart's].")
@click.option("--set", "overrides", multiple=True, metavar="FIELD=VALUE", help="Set a model config field of every MODEL, e.g. --set attend_sos=False (repeatable).")
@click.option("--isa", type=click.Choice(["native", "avx2"]), default="native", show_default=True, help="CPU kernels of the runs: native, or avx2 (torch and oneDNN held to AVX2: another CPU kind's numbers on this one).")
@click.option("--split", "splits", multiple=True, help="Split to score (repeatable) [default: the quickstart's val, testA, testB].")
@click.option("--lanes", type=click.IntRange(min=1), default=None, help="Runs at once, one thread each [default: one per core].")
@click.option("--workdir", type=click.Path(path_type=Path), default=Path("bench/seeds"), show_default=True, help="Folder for data, runs, records and the table.")
@click.option("--task", type=click.Choice(["ris", "gres"]), default="ris", show_default=True, help="ris: synthetic RefCOCO mIoU; gres: synthetic gRefCOCO gIoU/cIoU/N-acc/T-acc, each model with and without its no-target head.")
def bench_seeds(models, seed_list, steps, overrides, isa, splits, lanes, workdir, task) -> None:
    """Train and score MODEL... with several seeds on the quickstart's plan: mean, sd and a bootstrap interval per model and split."""
    from refbench.bench import seeds as seeds_mod

    settings = seeds_mod.SeedSettings(models=tuple(models), seeds=seeds_mod.parse_seeds(seed_list), steps=steps,
                                      overrides=tuple(overrides), isa=isa, workdir=workdir,
                                      splits=tuple(splits) or None, lanes=lanes, task=task)
    seeds_mod.main(settings)


OPENMP_SPINCOUNT = "1000"  # spins an idle OpenMP thread waits actively before it sleeps (libgomp's default: 300,000)


def bounded_openmp_spin() -> None:
    """Let torch's OpenMP threads spin only briefly when they wait for work, unless the user
    chose (OMP_WAIT_POLICY or GOMP_SPINCOUNT set). Read when torch loads, so set before any
    command imports it.

    Why: a thread spinning through libgomp's default 300,000 rounds holds a core that the
    DataLoader worker or another process needs. Tiny EAVL's training step on 2 shared CPU
    cores (load 6): 2.8 s with the default, 1.2 s with 1,000 spins, 1.0 s with
    OMP_WAIT_POLICY=PASSIVE; on the same cores while the others were held back: 0.41 s, 0.37 s
    and 0.46 s (medians of 3; `refbench bench step` shows where the step goes).
    """
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = OPENMP_SPINCOUNT


def main() -> None:
    bounded_openmp_spin()
    cli(prog_name="refbench")


if __name__ == "__main__":
    main()

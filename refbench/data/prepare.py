"""`refbench prepare`: raw REFER files -> webdataset shards (schema v1, docs/shards.md).

    refbench prepare --dataset refcoco --split-by unc --data data --out shards
    refbench prepare --all --data data --out shards [--source refer|hf]

Two sources of the same annotations (`detect_source`): the refer toolkit's files, or a local
snapshot of a Hugging Face parquet mirror (refbench.data.sources.hf reads it into the same refs and COCO
records, which then take the same path: same checks, same shards).

For each dataset/partition: load the refs pickle (safely) and instances.json, join and validate
every ref (refbench.data.sources.refer), tokenize every sentence in one batch (refbench.data.text), cut each split's
images (sorted by image id) into shards of `--shard-size` images, and hand the shards to
`--workers` processes (planning the next dataset overlaps writing this one). Per image a worker
reads the JPEG bytes (copied byte-identical), checks that it is a JPEG of the size instances.json
gives (the marker segments up to the frame header, ~3 us) and that it decodes completely (every
scan entropy-decoded, at 1/8 scale in the DCT: see `jpeg_decode_problem`), rasterises each ref's
polygon union to COCO RLE (pycocotools), checks that the mask is not empty, and adds `<key>.jpg`
and `<key>.json` to the tar.

Prepare is the door: everything the loaders need is checked here, once, so a shard that prepare
wrote never fails to decode in training or evaluation unless the shard changed on disk (which
the manifest's sha256 catches). Checked: every JPEG decodes completely at its annotated size;
ref_ids and sent_ids are unique within a dataset; every segmentation rasterises to the image's
size (an RLE's size and runs included) with a nonzero area; every sentence is non-empty after
the tokenizer's cleaning.

Deterministic: tar members carry mtime 0, uid/gid 0, mode 0644, no user names, USTAR headers, in
sorted order; the manifest has no timestamps and no worker count. The same inputs and options give
byte-identical tars and manifest whatever `--workers` is.

Atomic, and a re-run redoes everything (no resume). Nothing is visible half-written:
1. workers write every shard under a temporary name (`.tmp-...`) in its split folder;
2. any error (a bad ref found while planning, a bad image found by a worker, Ctrl-C) stops the
   run, deletes its temporary files and the folders it created empty: the output is as it was
   before the run (a previous complete preparation stays valid);
3. only when every shard of every requested dataset is written, per dataset: the old manifest is
   deleted, the temporary files are renamed to their final names, shards left over from an
   earlier run are deleted, and the new manifest is written (atomically) last.
A killed run (even SIGKILL) leaves, per dataset, either the previous complete state or no
manifest (the folder is then "not prepared"), plus `.tmp-` files; running the same command again
deletes the `.tmp-` files and rewrites every shard, giving output identical to an uninterrupted
run. Redoing costs one pass over the images and, unlike resuming, never trusts a stale shard.

Bad input: a missing/unreadable/non-JPEG/truncated image or one whose size differs from
instances.json, an ann_id absent from instances.json, a malformed polygon or RLE, a zero-area
target, a repeated sent_id, an empty sentence, ... raise one `RefbenchError` line naming the file
and the image, ref or sentence. With `--skip-bad` the image, ref or sentence is skipped, counted
and listed in manifest["skipped"], and a warning line is printed. Arguments are checked before any
work: `--out` must be a folder (or not exist yet), `--workers` is capped at the cores this
process may use and at the number of shards (with a note).
"""

from __future__ import annotations

import os
from pathlib import Path

from refbench import __version__
from refbench.data.datasets import (
    DEFAULT_SPLIT_BY,
    GRES_DATASETS,
    GRES_PARTITIONS,
    PARTITIONS,
    SCHEMA,
    SCHEMA_VERSION,
    dataset_name,
    split_bys_of,
)
from refbench.data.shard_writer import SHARD_NAME, init_worker, write_shard
from refbench.errors import RefbenchError
from refbench.fsutil import atomic_write_json, check_output_folder, remove_stale_temps, sha256_file
from refbench.memory import collector_paused

DEFAULT_SHARD_SIZE = 500  # images per shard: ~80 MB of COCO JPEGs


# ---------------------------------------------------------------------------------- one dataset


SOURCES = ("refer", "hf")  # --source: the refer toolkit's files, or a Hugging Face parquet mirror snapshot


def _sources(data: Path, dataset: str, split_by: str) -> tuple[Path, Path]:
    from refbench.data.sources.refer import DATA_HINT

    refs_path, inst_path = data / dataset / f"refs({split_by}).p", data / dataset / "instances.json"
    for p in (refs_path, inst_path):
        if not p.is_file():
            raise RefbenchError(f"{p} not found (needed for {dataset_name(dataset, split_by)})", hint=DATA_HINT)
    return refs_path, inst_path


def detect_source(data: Path, dataset: str, split_by: str, source: str | None = None) -> str:
    """Which raw source `data/<dataset>` holds for this partition: "refer" or "hf" (checked).

    Given `source`, checks that its files are there; not given, it is the one found (refer files:
    refs(<split_by>).p + instances.json; a parquet mirror snapshot: data/*.parquet). Both found, or
    a partition the mirror does not hold, is an error that says what to do.
    """
    from refbench.data.sources import hf as refer_hf
    from refbench.data.sources.refer import DATA_HINT

    if dataset in GRES_DATASETS:  # gRefCOCO: grefs(<split_by>).json/.p + instances.json only (refbench.data.sources.grefer)
        from refbench.data.sources import grefer

        if source not in (None, "refer"):
            raise RefbenchError(f"{dataset} is read from its raw files (grefs({split_by}).json), not --source {source}")
        grefer.sources(data, split_by)
        return "refer"
    folder = data / dataset
    has_refer = (folder / f"refs({split_by}).p").is_file()
    has_hf = refer_hf.is_snapshot(folder)
    mirror = refer_hf.MIRRORS[dataset]
    name = dataset_name(dataset, split_by)
    if source is None:
        if has_refer and has_hf:
            raise RefbenchError(f"{folder} holds both refer files (refs({split_by}).p) and a parquet snapshot (data/*.parquet)",
                                hint="say which to read: --source refer or --source hf")
        source = "refer" if has_refer else "hf" if has_hf else None
        if source is None:
            raise RefbenchError(f"{name}: neither {folder / f'refs({split_by}).p'} (refer) nor {folder / 'data'}/*.parquet "
                                f"(a {mirror.repo} snapshot) found", hint=DATA_HINT)
    if source == "refer":
        _sources(data, dataset, split_by)
    elif source == "hf":
        if split_by != mirror.split_by:
            raise RefbenchError(f"{name}: the parquet mirror {mirror.repo} holds only the {mirror.split_by} partition of {dataset}",
                                hint="the refer files (refs(google).p) have the google partition; --source refer")
        if not has_hf:
            raise RefbenchError(f"{folder / 'data'}/*.parquet not found (a {mirror.repo} snapshot, needed for {name})",
                                hint=refer_hf.SNAPSHOT_HINT)
    else:
        raise RefbenchError(f"unknown --source {source!r}; one of {', '.join(SOURCES)}")
    return source


def _read_refer(dataset, split_by, data: Path, images: Path, skip_bad: bool, cache: dict):
    """(splits, skipped, categories, sources entry) from the refer files."""
    from refbench.data.sources import refer

    refs_path, inst_path = _sources(data, dataset, split_by)
    inst_sha = sha256_file(inst_path)
    if inst_sha not in cache:  # keyed by content: identical instances.json files are parsed once
        cache[inst_sha] = refer.load_instances(inst_path)
    inst = cache[inst_sha]
    refs = refer.load_refs(refs_path)
    splits, skipped = refer.join(refs, inst, refs_path, skip_bad=skip_bad)
    sources = {"source": "refer", "refs": {"path": str(refs_path), "sha256": sha256_file(refs_path)},
               "instances": {"path": str(inst_path), "sha256": inst_sha}, "images": str(images)}
    return splits, skipped, inst.categories, sources


def _read_hf(dataset, split_by, data: Path, images: Path, skip_bad: bool):
    """(splits, skipped, categories, sources entry) from a parquet mirror snapshot (refbench.data.sources.hf)."""
    from refbench.data.sources import hf as refer_hf
    from refbench.data.sources import refer

    categories = None
    if (data / "SYNTH.json").is_file():  # refbench synth's shapes, not COCO's categories
        from refbench.data.synth.generate import CATEGORIES

        categories = {cid: name for cid, name, _ in CATEGORIES}
    snap = refer_hf.load_snapshot(data / dataset, dataset, images=images, skip_bad=skip_bad, categories=categories)
    if categories is not None:
        snap.sources["category_names"] = "refbench synth (SYNTH.json in the data folder)"
    splits, skipped = refer.join(snap.refs, snap.instances, data / dataset, skip_bad=skip_bad, files=snap.files)
    return splits, snap.skipped + skipped, snap.instances.categories, snap.sources


def _plan(dataset: str, split_by: str, data: Path, images: Path, out: Path, skip_bad: bool, shard_size: int, cache: dict,
          source: str | None = None):
    """Read, validate, join and tokenize; returns (shard tasks, manifest skeleton, image count)."""
    from refbench.data import text

    if dataset in GRES_DATASETS:
        from refbench.data.sources import grefer

        splits, skipped, categories, sources = grefer.read(data, split_by, images, skip_bad, cache)
    elif detect_source(data, dataset, split_by, source) == "hf":
        splits, skipped, categories, sources = _read_hf(dataset, split_by, data, images, skip_bad)
    else:
        splits, skipped, categories, sources = _read_refer(dataset, split_by, data, images, skip_bad, cache)

    length = text.context_length(dataset)
    sentences = [s for entries in splits.values() for im in entries for r in im["refs"] for s in r["sentences"]]
    ids, n_tokens = text.tokenize_with_lengths([s["sent"] for s in sentences], length)  # [N, L], [N]
    for s, row, n in zip(sentences, ids.tolist(), n_tokens.tolist()):
        s["tokens"], s["n_tokens"] = row, n
    # the raw files that problems found from here on are named by (the parquet snapshot for hf)
    refs_file = sources["refs"]["path"] if "refs" in sources else str(data / dataset)
    inst_file = sources["instances"]["path"] if "instances" in sources else str(data / dataset)
    splits = _drop_empty_sentences(splits, refs_file, skip_bad, skipped)

    name = dataset_name(dataset, split_by)
    tasks = []
    for split, entries in splits.items():
        for k in range(0, len(entries), shard_size):
            tasks.append({"folder": str(out / name / split), "images_dir": str(images), "split": split,
                          "instances": inst_file,
                          "context_length": length, "skip_bad": skip_bad, "images": entries[k:k + shard_size]})
    manifest = {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION,
        "dataset": dataset, "split_by": split_by, "name": name,
        "tokenizer": text.tokenizer_info(length),
        "categories": {str(k): v for k, v in sorted(categories.items())},
        "splits": {s: {"images": 0, "refs": 0, "sentences": 0, "shards": 0, "truncated_sentences": 0} for s in splits},
        "shards": [],
        "sources": sources,
        "skipped": skipped,
        "synthetic": (data / "SYNTH.json").is_file(),  # written by `refbench synth`: not the real dataset
        "refbench_version": __version__,
        "options": {"shard_size": shard_size, "skip_bad": skip_bad},
    }
    if "gres" in sources:  # gRefCOCO: absent splits, no_target keys that contradict ann_id (refbench.data.sources.grefer)
        manifest["gres"] = sources.pop("gres")
    return tasks, manifest, sum(len(e) for e in splits.values())


def _drop_empty_sentences(splits: dict, refs_path: Path, skip_bad: bool, skipped: list[dict]) -> dict:
    """Refuse (or, with `skip_bad`, drop and list) sentences with no token after the tokenizer's
    cleaning (empty, whitespace, markup only): scoring them would score the image, not a sentence.
    A ref left without sentences and an image left without refs are dropped with them."""
    from refbench.data.sources.refer import BadInput

    def keep(s: dict, ref: dict) -> bool:
        if s["n_tokens"] > 2:  # SOT + at least one BPE id + EOT
            return True
        problem = BadInput("sentence", s["sent_id"], refs_path,
                           f"ref {ref['ref_id']}: the sentence is empty after cleaning ({s['raw']!r})")
        if not skip_bad:
            raise problem
        skipped.append(problem.record())
        return False

    out = {}
    for split, entries in splits.items():
        kept_images = []
        for im in entries:
            refs = []
            for r in im["refs"]:
                r["sentences"] = [s for s in r["sentences"] if keep(s, r)]
                if r["sentences"]:
                    refs.append(r)
                else:
                    skipped.append(BadInput("ref", r["ref_id"], refs_path, "no sentence left (every one is empty)").record())
            if refs:
                kept_images.append({**im, "refs": refs})
        if kept_images:
            out[split] = kept_images
    return out


def _commit(results: list[dict], manifest: dict, out_dir: Path) -> dict:
    """Rename the written shards to their final names, drop stale ones, write the manifest last."""
    (out_dir / "manifest.json").unlink(missing_ok=True)
    counters: dict[str, int] = {}
    final: set[Path] = set()
    for r in results:
        manifest["skipped"].extend(r["skipped"])
        if r["samples"] == 0:  # every image of the shard was skipped
            Path(r["tmp"]).unlink(missing_ok=True)
            continue
        split = r["split"]
        idx = counters[split] = counters.get(split, -1) + 1
        rel = f"{split}/{split}-{idx:06d}.tar"
        os.replace(r["tmp"], out_dir / rel)
        final.add(out_dir / rel)
        manifest["shards"].append({"split": split, "path": rel, "samples": r["samples"], "refs": r["refs"],
                                   "sentences": r["sentences"], "bytes": r["bytes"], "sha256": r["sha256"]})
        c = manifest["splits"][split]
        c["images"] += r["samples"]
        c["refs"] += r["refs"]
        c["sentences"] += r["sentences"]
        c["shards"] += 1
        c["truncated_sentences"] += r["truncated"]
    for sub in [p for p in out_dir.iterdir() if p.is_dir()]:
        for p in sub.iterdir():
            if SHARD_NAME.match(p.name) and p not in final:
                p.unlink()  # a shard of an earlier run that this run does not have
    atomic_write_json(out_dir / "manifest.json", manifest)
    return manifest


class _Inline:
    """The executor of `--workers 1`: runs each shard at submit time, in this process."""

    def submit(self, fn, task):
        from concurrent.futures import Future

        fut = Future()
        fut.set_result(fn(task))  # an error propagates at once
        return fut

    def shutdown(self, wait=True, cancel_futures=False):
        pass


def _writers(workers: int):
    """(executor, progress queue or None): a process pool started now, before any thread exists."""
    if workers <= 1:
        return _Inline(), None
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    queue = ctx.Queue()
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=init_worker, initargs=(queue,))
    pool.submit(int).result()  # start the workers (fork) before the progress display starts its thread
    return pool, queue


def _drain(queue, progress) -> None:
    import queue as queue_mod

    while queue is not None:
        try:
            task_id, n = queue.get_nowait()
        except queue_mod.Empty:
            return
        progress.advance(task_id, n)


def prepare_all(targets: list[tuple[str, str]], data: Path, images: Path, out: Path, workers: int,
                skip_bad: bool, shard_size: int, console=None, source: str | None = None) -> dict[str, dict]:
    """Prepare datasets/partitions; returns {name: manifest}. See the module docstring.

    Each dataset is planned (read, validated, tokenized) in this process and its shards handed to
    the writers at once, so planning the next dataset overlaps writing this one. Nothing is
    committed until every shard of every dataset is written; any error deletes this run's
    temporary files (and the folders it created empty) and leaves the output as it was.
    """
    from refbench.progress import erased_on_error

    pool, queue = _writers(workers)
    try:
        with erased_on_error(_progress(console)) as progress:
            return _prepare_all(targets, data, images, out, skip_bad, shard_size, pool, queue, progress, source)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _prepare_all(targets, data, images, out, skip_bad, shard_size, pool, queue, progress, source=None) -> dict[str, dict]:
    from concurrent.futures import FIRST_EXCEPTION, wait

    jobs, created, cache = [], [], {}
    try:
        for dataset, split_by in targets:
            with collector_paused():  # planning builds millions of objects and frees few: no cyclic GC passes over them
                tasks, manifest, n_images = _plan(dataset, split_by, data, images, out, skip_bad, shard_size, cache, source)
            out_dir = out / manifest["name"]
            for d in [out_dir] + sorted({Path(t["folder"]) for t in tasks}):
                for p in [*reversed(d.parents), d]:  # the output root too, so that a failed run leaves nothing
                    if not p.exists():
                        p.mkdir()
                        created.append(p)
            for d in [out_dir] + [p for p in out_dir.iterdir() if p.is_dir()]:
                remove_stale_temps(d)  # left by a killed run
            task_id = progress.add_task(manifest["name"], total=n_images)
            report = (lambda tid: (lambda n: progress.advance(tid, n)))(task_id) if queue is None else None
            futures: list = []
            jobs.append((manifest, out_dir, task_id, n_images, futures))
            for t in tasks:
                futures.append(pool.submit(write_shard, dict(t, progress_id=task_id, report=report)))
            _drain(queue, progress)
        pending = {f for job in jobs for f in job[-1]}
        while pending:
            done, pending = wait(pending, timeout=0.1, return_when=FIRST_EXCEPTION)
            _drain(queue, progress)
            for fut in done:
                fut.result()  # raises a worker's error here
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        for job in jobs:
            for fut in job[-1]:
                if fut.done() and not fut.cancelled() and fut.exception() is None:
                    Path(fut.result()["tmp"]).unlink(missing_ok=True)
        for d in reversed(created):
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
        raise
    manifests = {}
    for manifest, out_dir, task_id, n_images, futures in jobs:
        progress.update(task_id, completed=n_images)
        manifests[manifest["name"]] = _commit([f.result() for f in futures], manifest, out_dir)
    return manifests


# ---------------------------------------------------------------------------------- the command


def _progress(console=None):
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class Speed(ProgressColumn):
        def render(self, task):
            return Text(f"{task.speed:,.0f} images/s" if task.speed else "- images/s")

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("images"),
                    Speed(), TextColumn("ETA"), TimeRemainingColumn(), TimeElapsedColumn(),
                    console=console or Console(stderr=True))


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, else the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cap_workers(workers: int | None, flag: str = "--workers") -> int | None:
    """`workers` capped at the usable cores (a note on stderr when it was more); None stays None.

    More worker processes than cores only add memory and switching (`--workers 1000` would fork
    a thousand processes); the loaders cap again at what their shards can use.
    """
    import sys

    cores = usable_cores()
    if workers is not None and workers > cores:
        print(f"note: {flag} {workers} capped at {cores}, the CPU cores this process may use", file=sys.stderr)
        return cores
    return workers


def _targets(dataset, split_by, all_, data: Path, source: str | None = None) -> list[tuple[str, str]]:
    from refbench.data.sources import hf as refer_hf
    from refbench.data.sources.refer import DATA_HINT

    if all_ and (dataset or split_by):
        raise RefbenchError("give either --all or --dataset/--split-by, not both")
    if all_:
        def found_refer(d, s):
            return (data / d / f"refs({s}).p").is_file()

        def found_hf(d, s):
            return s == refer_hf.MIRRORS[d].split_by and refer_hf.is_snapshot(data / d)

        test = {"refer": found_refer, "hf": found_hf}.get(source, lambda d, s: found_refer(d, s) or found_hf(d, s))
        found = [(d, s) for d, s in PARTITIONS if test(d, s)]
        if source != "hf":
            from refbench.data.sources import grefer

            found += [(d, s) for d, s in GRES_PARTITIONS if grefer.refs_path(data, s) is not None]
        if not found:
            looked = ", ".join([str(data / d / f"refs({s}).p") for d, s in PARTITIONS if source != "hf"]
                               + [f"{data / d / 'data'}/*.parquet" for d in refer_hf.MIRRORS if source != "refer"])
            raise RefbenchError(f"no raw annotations under {data} (looked for {looked})", hint=DATA_HINT)
        return found
    if dataset is None:
        raise RefbenchError("say what to prepare: --dataset refcoco|refcoco+|refcocog [--split-by ...], or --all")
    split_by = split_by or DEFAULT_SPLIT_BY[dataset]
    if (dataset, split_by) not in PARTITIONS + GRES_PARTITIONS:
        ok = ", ".join(split_bys_of(dataset))
        raise RefbenchError(f"{dataset} has no --split-by {split_by} partition; it has: {ok}")
    return [(dataset, split_by)]


def main(dataset=None, split_by=None, all_=False, data=Path("data"), images=None, out=Path("shards"),
         workers=None, skip_bad=False, shard_size=None, source=None) -> dict:
    """`refbench prepare`: prepare the requested datasets; returns {name: manifest}."""
    import time

    from rich.console import Console
    from rich.table import Table

    data, out = Path(data), Path(out)
    images = Path(images) if images is not None else data / "images" / "train2014"
    targets = _targets(dataset, split_by, all_, data, source)
    for d, s in targets:
        detect_source(data, d, s, source)
    if not images.is_dir():
        raise RefbenchError(f"image folder {images} not found",
                            hint="--images DIR: the COCO train2014 JPEG folder (default <data>/images/train2014)")
    check_output_folder(out, "--out")  # before any work
    shard_size = shard_size or DEFAULT_SHARD_SIZE
    console = Console(stderr=True)  # progress and warnings; the summary table goes to stdout
    workers = cap_workers(workers) or usable_cores()
    table = Table(title=f"refbench prepare -> {out} (shard schema v{SCHEMA_VERSION})",
                  caption="truncated: sentences longer than the context length L, cut with EOT kept")
    for col in ("dataset", "source", "split", "images", "refs", "sentences", "truncated", "shards"):
        table.add_column(col, justify="left" if col in ("dataset", "source", "split") else "right")
    t0 = time.perf_counter()
    manifests = prepare_all(targets, data, images, out, workers, skip_bad, shard_size, console, source)
    for m in manifests.values():
        for entry in m["skipped"]:
            console.print(f"[yellow]warning:[/] skipped {entry['kind']} {entry['id']} ({entry['file']}): {entry['reason']}")
    seconds = time.perf_counter() - t0
    n_images = 0
    for name, m in manifests.items():
        for split, c in m["splits"].items():
            table.add_row(name, m["sources"]["source"], split, str(c["images"]), str(c["refs"]), str(c["sentences"]),
                          f"{c['truncated_sentences']} (L={m['tokenizer']['context_length']})", str(c["shards"]))
            n_images += c["images"]
    out_console = Console()
    out_console.print(table)
    for name, m in manifests.items():
        src = m["sources"]
        if src["source"] == "hf":
            mapping = ", ".join(f"{a} -> {b}" for a, b in src["split_map"].items())
            out_console.print(f"{name}: read from the parquet snapshot {src['snapshot']} ({src['repo']}; splits {mapping})")
    for name, m in manifests.items():
        if m.get("gres", {}).get("absent_splits"):
            out_console.print(f"{name}: splits absent from {m['sources']['refs']['path']}: {', '.join(m['gres']['absent_splits'])}")
        if m.get("gres", {}).get("no_target_key_disagreements", {}).get("count"):
            out_console.print(f"{name}: {m['gres']['no_target_key_disagreements']['count']} refs carry a no_target key "
                              "that contradicts their ann_id (ann_id trusted, as ReLA does)")
    skipped = sum(len(m["skipped"]) for m in manifests.values())
    out_console.print(f"{n_images} images written to shards in {seconds:.1f} s ({n_images / max(seconds, 1e-9):,.0f} images/s, "
                      f"{workers} workers); skipped refs/images: {skipped}")
    return manifests

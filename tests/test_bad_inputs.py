"""The bad-input table: every way a careless or hostile user has broken refbench, one row each.

A row is (case, how the bad input is made and which command meets it, the expected exit status,
a fragment of the one-line message). Every row is checked the same way:

- exit status 2 (a user error) with stderr of one `error: ` line (and at most a `hint: ` line),
  no traceback;
- the message holds the fragment (it names the file, ref or flag at fault);
- nothing is left behind: the working folder (and the read-only fixtures it uses) holds exactly
  what it held before the command ran, no half-written output, no empty folder.

New cases go in `CASES`; a row costs one in-process CLI call (click's CliRunner).
"""

from __future__ import annotations

import json
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from _harness import DATASET, assert_one_line_error, cli

from refbench.data.sources import refer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------ the context a row builds in


class Ctx:
    """What a row may use: a scratch folder, a copy of the synthetic raw data, the shared shards and
    a tiny checkpoint (read-only), and `names` for the message fragment (`{name}` placeholders)."""

    def __init__(self, tmp: Path, synth_root: Path, request):
        self.tmp, self._synth, self._request = tmp, synth_root, request
        self.names: dict[str, str] = {}
        self.watched: list[Path] = [tmp]  # folders whose content must not change

    def data(self) -> Path:
        """A private copy of the synthetic raw data (refcoco only), to damage."""
        dst = self.tmp / "data"
        if not dst.exists():
            shutil.copytree(self._synth / "refcoco", dst / "refcoco")
            shutil.copytree(self._synth / "images", dst / "images")
        return dst

    @property
    def shards(self) -> Path:
        root = self._request.getfixturevalue("shards_root")
        self.watched.append(root)
        return root

    @property
    def checkpoint(self) -> Path:
        run = self._request.getfixturevalue("init_run")
        self.watched.append(run)
        return run / "best.pt"

    def prepare(self, *extra) -> list:
        return ["prepare", "--dataset", "refcoco", "--data", self.data(), "--out", self.tmp / "shards",
                "--workers", "1", *extra]

    # --- raw-data surgery: refs(unc).p and instances.json of the copy

    def refs(self) -> list[dict]:
        return refer.load_pickle(self.data() / "refcoco" / "refs(unc).p")

    def write_refs(self, refs: list[dict]) -> None:
        (self.data() / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))

    def instances(self) -> dict:
        return json.loads((self.data() / "refcoco" / "instances.json").read_text())

    def write_instances(self, inst: dict) -> None:
        (self.data() / "refcoco" / "instances.json").write_text(json.dumps(inst))

    def first_train_ref(self) -> tuple[list[dict], dict]:
        refs = self.refs()
        return refs, min((r for r in refs if r["split"] == "train"), key=lambda r: r["ref_id"])

    def set_segmentation(self, segmentation) -> int:
        """Give the first train ref's annotation `segmentation`; returns that ref's id."""
        _, ref = self.first_train_ref()
        inst = self.instances()
        (ann,) = [a for a in inst["annotations"] if a["id"] == ref["ann_id"]]
        ann["segmentation"] = segmentation
        self.write_instances(inst)
        self.names["ann_id"] = str(ref["ann_id"])
        return ref["ref_id"]

    def image_of(self, ref: dict) -> dict:
        (im,) = [i for i in self.instances()["images"] if i["id"] == ref["image_id"]]
        return im


def _snapshot(folders: list[Path]) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file and folder under `folders`: what "nothing left behind" compares."""
    snap = {}
    for root in folders:
        for p in sorted(root.rglob("*")):
            st = p.stat()
            snap[str(p)] = (st.st_size if p.is_file() else -1, st.st_mtime_ns if p.is_file() else 0)
    return snap


# ------------------------------------------------------------------------------ the rows


def _truncated_jpeg(ctx: Ctx) -> list:
    _, ref = ctx.first_train_ref()
    path = ctx.data() / "images" / "train2014" / ctx.image_of(ref)["file_name"]
    path.write_bytes(path.read_bytes()[:3000])  # `head -c 3000`: the header still parses
    ctx.names["file"] = str(path)
    return ctx.prepare()


def _jpeg_without_end(ctx: Ctx) -> list:
    _, ref = ctx.first_train_ref()
    path = ctx.data() / "images" / "train2014" / ctx.image_of(ref)["file_name"]
    path.write_bytes(path.read_bytes()[:-2])  # only the end-of-image marker is missing
    ctx.names["file"] = str(path)
    return ctx.prepare()


def _duplicate_sent_id(ctx: Ctx) -> list:
    refs = sorted(ctx.refs(), key=lambda r: r["ref_id"])
    refs[-1]["sentences"][0]["sent_id"] = refs[0]["sentences"][0]["sent_id"]  # far apart: another split, even
    ctx.write_refs(refs)
    ctx.names.update(sent=str(refs[0]["sentences"][0]["sent_id"]), ref=str(refs[-1]["ref_id"]), first=str(refs[0]["ref_id"]))
    return ctx.prepare()


def _set_sentence(text: str) -> Callable[[Ctx], list]:
    def make(ctx: Ctx) -> list:
        refs, ref = ctx.first_train_ref()
        ref["sentences"][0]["sent"] = ref["sentences"][0]["raw"] = text
        ctx.write_refs(refs)
        ctx.names["sent"] = str(ref["sentences"][0]["sent_id"])
        return ctx.prepare()
    return make


def _rle_of_wrong_size(ctx: Ctx) -> list:
    _, ref = ctx.first_train_ref()
    im = ctx.image_of(ref)
    h, w = im["height"], im["width"]
    ctx.set_segmentation({"size": [h + 1, w], "counts": [(h + 1) * w]})
    return ctx.prepare()


def _rle_with_bad_counts(counts) -> Callable[[Ctx], list]:
    def make(ctx: Ctx) -> list:
        _, ref = ctx.first_train_ref()
        im = ctx.image_of(ref)
        ctx.set_segmentation({"size": [im["height"], im["width"]], "counts": counts})
        return ctx.prepare()
    return make


def _zero_area_polygon(ctx: Ctx) -> list:
    ctx.set_segmentation([[10, 10, 10, 10, 10, 10]])  # three points, one place
    return ctx.prepare()


def _prepare_out_is_a_file(ctx: Ctx) -> list:
    (ctx.tmp / "taken").write_text("a file")
    return ["prepare", "--dataset", "refcoco", "--data", ctx.data(), "--out", ctx.tmp / "taken"]


def _train(*extra) -> Callable[[Ctx], list]:
    def make(ctx: Ctx) -> list:
        return ["train", "eavl", "--recipe", "tiny", "--steps", "2", "--batch-size", "4", "--workers", "0",
                "--shards", ctx.shards, "--out", ctx.tmp / "run", *extra]
    return make


def _resume_with(*extra) -> Callable[[Ctx], list]:
    """`--resume` of a copy of the tiny 24-query EAVL run with other flags."""
    def make(ctx: Ctx) -> list:
        run = shutil.copytree(ctx.checkpoint.parent, ctx.tmp / "run")
        return ["train", "eavl", "--recipe", "tiny", "--steps", "1", "--batch-size", "4", "--workers", "0",
                "--shards", ctx.shards, "--out", run, "--resume", *extra]
    return make


def _eval_results_file(ctx: Ctx) -> list:
    (ctx.tmp / "results").write_text("a file")
    return ["eval", "--checkpoint", ctx.checkpoint, "--shards", ctx.shards, "--split", "val", "--workers", "0",
            "--results", ctx.tmp / "results"]


def _predict_out_dir(ctx: Ctx) -> list:
    (ctx.tmp / "masks").mkdir()
    image = sorted((ctx.data() / "images" / "train2014").glob("*.jpg"))[0]
    return ["predict", "--checkpoint", ctx.checkpoint, "--image", image, "--text", "the red circle", "--out", ctx.tmp / "masks"]


def _synth_out_file(ctx: Ctx) -> list:
    (ctx.tmp / "taken").write_text("a file")
    return ["synth", "--out", ctx.tmp / "taken"]


def _leaderboard_out_dir(ctx: Ctx) -> list:
    (ctx.tmp / "board").mkdir()
    return ["leaderboard", "--results", ctx.tmp, "--out", ctx.tmp / "board"]


def _leaderboard_missing_results(ctx: Ctx) -> list:
    return ["leaderboard", "--results", ctx.tmp / "no-such-folder"]


def _compare_same_file(ctx: Ctx) -> list:
    (ctx.tmp / "a.json").write_text("{}")
    return ["compare", ctx.tmp / "a.json", ctx.tmp / "a.json"]


def _pretrained_text_file(ctx: Ctx) -> list:
    (ctx.tmp / "weights.pt").write_text("these are not weights\n")
    return _train("--pretrained", ctx.tmp / "weights.pt")(ctx)


@dataclass(frozen=True)
class Case:
    id: str  # what the user did
    make: Callable[[Ctx], list]  # builds the bad input; returns the `refbench` arguments
    fragment: str  # must be in the message; `{name}` is filled from ctx.names
    status: int = 2  # expected exit status


CASES = [
    # prepare is the door: what the loaders would choke on is refused here, naming the raw file
    Case("truncated JPEG (head -c 3000)", _truncated_jpeg, "{file}: image"),
    Case("truncated JPEG (head -c 3000): why", _truncated_jpeg, "does not decode completely"),
    Case("JPEG without its end marker", _jpeg_without_end, "does not decode completely"),
    Case("duplicate sent_id", _duplicate_sent_id, "sentence {sent}: ref {ref}: sent_id {sent} is already used by ref {first}"),
    Case("duplicate sent_id names the refs file", _duplicate_sent_id, "refs(unc).p"),
    Case("RLE of another size", _rle_of_wrong_size, "RLE size"),
    Case("RLE with garbage counts", _rle_with_bad_counts("zzzz!!"), "ann_id {ann_id}: the segmentation does not rasterise"),
    Case("RLE with negative runs", _rle_with_bad_counts([5, -3, 2]), "does not rasterise"),
    Case("RLE with short runs", _rle_with_bad_counts([5, 3]), "does not rasterise"),
    Case("empty sentence", _set_sentence(""), "sentence {sent}: ref"),
    Case("whitespace-only sentence", _set_sentence("  \t "), "empty after cleaning"),
    Case("markup-only sentence", _set_sentence("&nbsp;"), "empty after cleaning"),
    Case("zero-area polygon", _zero_area_polygon, "ann_id {ann_id}: the segmentation has zero area"),
    Case("prepare --out FILE", _prepare_out_is_a_file, "is a file, not a folder"),
    # arguments and output paths: checked before any expensive work
    Case("eval --results FILE", _eval_results_file, "--results {tmp}/results is a file, not a folder"),
    Case("predict --out EXISTING_DIR", _predict_out_dir, "--out {tmp}/masks is a folder, not a file"),
    Case("synth --out FILE", _synth_out_file, "--out {tmp}/taken is a file, not a folder"),
    Case("leaderboard --out EXISTING_DIR", _leaderboard_out_dir, "is a folder, not a file"),
    Case("leaderboard --results MISSING", _leaderboard_missing_results, "no-such-folder does not exist"),
    Case("compare A A", _compare_same_file, "A and B are the same file"),
    Case("train --set num_queries=abc", _train("--set", "num_queries=abc"), "num_queries takes an int, not 'abc'"),
    Case("train --set num_queries=0", _train("--set", "num_queries=0"), "num_queries must be >= 1, not 0"),
    Case("train --set num_queries=-3", _train("--set", "num_queries=-3"), "num_queries must be >= 1, not -3"),
    Case("train --set dropout=5", _train("--set", "dropout=5"), "cannot be built with --set dropout=5"),
    Case("train --set heads=3 (does not divide the width)", _train("--set", "heads=3"), "--set heads=3"),
    Case("train --set no_such_field=1", _train("--set", "no_such_field=1"), "no config field(s) no_such_field"),
    Case("train --lr nan", _train("--lr", "nan"), "--lr must be a finite number > 0, not nan"),
    Case("train --lr -1", _train("--lr", "-1"), "--lr must be a finite number > 0, not -1.0"),
    Case("train --lr 0", _train("--lr", "0"), "--lr must be a finite number > 0"),
    Case("train --out FILE", lambda ctx: (ctx.tmp / "run").write_text("x") and _train()(ctx), "is a file, not a folder"),
    Case("train --pretrained TEXT_FILE", _pretrained_text_file, "weights.pt' into open_clip refbench-tiny-rn: not a weights file"),
    Case("train --resume --set num_queries=4 on a 24-query run", _resume_with("--set", "num_queries=4"),
         "model config num_queries: 24 -> 4"),
    Case("train --resume with another batch size", _resume_with("--batch-size", "8"), "recipe batch_size: 4 -> 8"),
    Case("train --resume with another lr", _resume_with("--lr", "0.1"), "recipe lr: 0.0 -> 0.1"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path, synth_root, request):
    ctx = Ctx(tmp_path / "work", synth_root, request)
    ctx.tmp.mkdir()
    args = case.make(ctx)
    ctx.names.setdefault("tmp", str(ctx.tmp))
    before = _snapshot(ctx.watched)
    result = cli(*args)
    assert_one_line_error(result, case.fragment.format(**ctx.names)) if case.status == 2 else None
    assert result.exit_code == case.status
    assert _snapshot(ctx.watched) == before, "the command left something behind"


# ------------------------------------------------------------------------------ beyond one row


def test_skip_bad_lists_every_door_defect_in_the_manifest(tmp_path, synth_root, request):
    """With --skip-bad each defect is skipped, listed in the manifest, and the rest is prepared."""
    from refbench.data import prepare

    ctx = Ctx(tmp_path / "work", synth_root, request)
    ctx.tmp.mkdir()
    refs = sorted(ctx.refs(), key=lambda r: r["ref_id"])
    train = [r for r in refs if r["split"] == "train"]
    refs[-1]["sentences"][0]["sent_id"] = refs[0]["sentences"][0]["sent_id"]
    train[1]["sentences"][0]["sent"] = "   "
    ctx.write_refs(refs)
    inst = ctx.instances()
    anns = {a["id"]: a for a in inst["annotations"]}
    anns[train[2]["ann_id"]]["segmentation"] = [[5, 5, 5, 5, 5, 5]]
    ctx.write_instances(inst)
    jpeg = ctx.data() / "images" / "train2014" / ctx.image_of(train[3])["file_name"]
    jpeg.write_bytes(jpeg.read_bytes()[:3000])

    manifest = prepare.main(dataset="refcoco", data=ctx.data(), out=tmp_path / "shards", workers=1, skip_bad=True)[DATASET]
    skipped = {(s["kind"], s["id"]) for s in manifest["skipped"]}
    assert ("sentence", refs[0]["sentences"][0]["sent_id"]) in skipped
    assert ("sentence", train[1]["sentences"][0]["sent_id"]) in skipped
    assert ("ref", train[2]["ref_id"]) in skipped
    assert ("image", train[3]["image_id"]) in skipped
    ids = set()
    for tar in sorted((tmp_path / "shards" / DATASET).rglob("*.tar")):
        import tarfile

        with tarfile.open(tar) as t:
            for m in t.getmembers():
                if m.name.endswith(".json"):
                    meta = json.loads(t.extractfile(m).read())
                    for r in meta["refs"]:
                        assert r["ref_id"] != train[2]["ref_id"]
                        for s in r["sentences"]:
                            assert s["sent_id"] not in ids and s["sent"].strip()
                            ids.add(s["sent_id"])
    assert sum(c["sentences"] for c in manifest["splits"].values()) == len(ids)


def test_an_unexpected_exception_is_one_line_naming_a_bug_and_its_log(tmp_path, monkeypatch):
    """A refbench bug reaches the user as one line (exit 1) and the traceback goes to a log file."""
    from refbench.data import prepare

    def broken(**kwargs):
        return {}["a key that is not there"]

    monkeypatch.setattr(prepare, "main", broken)
    monkeypatch.setenv("REFBENCH_LOG_DIR", str(tmp_path / "logs"))
    result = cli("prepare", "--all", "--data", tmp_path)
    assert result.exit_code == 1
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith("error: this is a bug in refbench, not in your input (KeyError")
    (log,) = (tmp_path / "logs").iterdir()
    assert str(log) in lines[1]
    text = log.read_text()
    assert "Traceback" in text and "in broken" in text and "a key that is not there" in text


def test_disk_full_is_one_line_naming_the_file(tmp_path, monkeypatch):
    import errno

    from refbench.data import prepare

    def full(**kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "shards" / "x.tar"))

    monkeypatch.setattr(prepare, "main", full)
    assert_one_line_error(cli("prepare", "--all", "--data", tmp_path), "x.tar: No space left on device")


# ------------------------------------------------------------------------------ weaker spots, one test each


def test_resume_of_a_finished_run_says_so_and_changes_nothing(init_run, shards_root, tmp_path, capsys):
    from _harness import train_config

    from refbench.train.loop import train

    run = shutil.copytree(init_run, tmp_path / "run")
    before = _snapshot([run])
    train(train_config(shards_root, run, steps=1, lr=0.0, min_lr=0.0, resume=True))
    assert "the run has already finished (1 of 1 steps); nothing to resume" in capsys.readouterr().out
    assert _snapshot([run]) == before


def test_eval_split_all_publishes_all_splits_or_none(init_run, shards_root, tmp_path, monkeypatch):
    from refbench.eval import evaluate, results

    write = results.write_record
    calls = []

    def refuse_the_second(*args, **kwargs):
        calls.append(kwargs["split"])
        if len(calls) == 2:
            raise results.RefbenchError(f"refusing to publish {kwargs['split']}: a test's refusal")
        return write(*args, **kwargs)

    monkeypatch.setattr(results, "write_record", refuse_the_second)
    out = tmp_path / "results"
    with pytest.raises(results.RefbenchError, match="a test's refusal"):
        evaluate.evaluate_checkpoint(init_run / "best.pt", splits=["all"], shards=shards_root, workers=0,
                                     batch_size=64, results=out)
    assert len(calls) == 2  # the first split was published, then withdrawn
    assert not out.exists() or not [p for p in out.rglob("*") if p.is_file()]


def test_leaderboard_of_an_empty_results_folder_says_so(tmp_path):
    (tmp_path / "results").mkdir()
    result = cli("leaderboard", "--results", tmp_path / "results")
    assert result.exit_code == 0
    assert "no measured records" in result.stderr and "reported rows only" in result.stderr


def test_workers_beyond_the_cores_are_capped_with_a_note(capsys):
    from refbench.data.prepare import cap_workers, usable_cores

    assert cap_workers(1000) == usable_cores()
    assert "--workers 1000 capped at" in capsys.readouterr().err
    assert cap_workers(None) is None and cap_workers(1) == 1


def test_amp_on_cpu_is_noted(capsys):
    import torch

    from refbench.train.runs import _note_slow_amp

    _note_slow_amp("fp16")
    err = capsys.readouterr().err
    assert ("slower than --amp off" in err) == (not torch.cuda.is_available())


# ------------------------------------------------------------------------------ predict's photos


def _jpeg(path: Path, array, **save) -> Path:
    from PIL import Image

    Image.fromarray(array).save(path, "JPEG", quality=95, **save)
    return path


def test_predict_applies_exif_orientation(tmp_path):
    """A photo stored sideways (EXIF 6: rotate 90 degrees clockwise to view) is seen upright."""
    import numpy as np
    from PIL import Image

    from refbench.eval.visualize import load_photo

    stored = np.zeros((40, 60, 3), np.uint8)
    stored[:, :30] = (255, 0, 0)  # stored: red left half; upright (rotated clockwise): red top half
    exif = Image.Exif()
    exif[0x0112] = 6
    photo = load_photo(_jpeg(tmp_path / "phone.jpg", stored, exif=exif.tobytes()))
    assert photo.orientation == 6 and photo.size == (40, 60) and photo.image.size == (40, 60)
    upright = np.asarray(photo.image).astype(int)
    assert upright[:25, :, 0].mean() > 200 and upright[35:, :, 0].mean() < 50


@pytest.mark.parametrize("mode", ["I;16", "P", "PA-transparent", "LA", "F"])
def test_predict_converts_16_bit_palette_and_alpha_images(tmp_path, mode):
    import numpy as np
    from PIL import Image

    from refbench.eval.visualize import load_photo

    grey = np.tile(np.linspace(0, 1, 64), (32, 1))  # a ramp, dark to light, left to right
    if mode == "I;16":
        im = Image.fromarray((grey * 65535).astype(np.uint16))
    elif mode == "F":
        im = Image.fromarray(grey.astype(np.float32), mode="F")
    elif mode == "LA":
        im = Image.merge("LA", [Image.fromarray((grey * 255).astype(np.uint8))] * 2)  # alpha = the ramp
    else:
        im = Image.fromarray((grey * 255).astype(np.uint8)).convert("RGB").quantize(16)
        if mode == "PA-transparent":
            im.info["transparency"] = 0
    path = tmp_path / "image.png" if mode != "F" else tmp_path / "image.tiff"
    im.save(path)
    rgb = np.asarray(load_photo(path).image).astype(int)
    assert rgb.shape == (32, 64, 3)
    left, right = rgb[:, :8].mean(), rgb[:, -8:].mean()
    assert right > 200  # light stays light (16-bit is not clipped to white everywhere)
    assert left < 60 or mode in ("LA", "PA-transparent")  # transparent pixels become white
    assert rgb.std() > 10  # not a flat image


def test_predict_decodes_a_large_jpeg_in_bounded_memory(tmp_path):
    """A 24-megapixel JPEG (72 MB as RGB) costs `load_photo` a few MB, not its decoded size."""
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    small = Image.fromarray((np.random.default_rng(0).random((60, 90, 3)) * 255).astype(np.uint8))
    small.resize((6000, 4000), Image.Resampling.BILINEAR).save(tmp_path / "big.jpg", quality=80)
    code = (
        "import resource, sys; from pathlib import Path; from refbench.eval.visualize import load_photo\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "photo = load_photo(Path(sys.argv[1]))\n"
        "print(photo.size, photo.image.size, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "big.jpg")], capture_output=True, text=True, check=True)
    grown_kb = int(out.stdout.split()[-1])
    assert out.stdout.startswith("(6000, 4000) (1024, 683)"), out.stdout
    assert grown_kb < 40_000, f"load_photo grew the process by {grown_kb} KB"


@pytest.mark.parametrize("protocol", ["original", "cris"])
def test_mask_png_is_the_protocols_map_at_full_size(tmp_path, protocol):
    """The streamed mask PNG equals the protocol's way back thresholded, pixel for pixel:
    `transforms.to_original` (original) or `cvwarp.cris_to_original` (cris: each band is the whole
    warp with its rows shifted)."""
    import numpy as np
    import torch
    from PIL import Image

    from refbench.data import cvwarp, transforms
    from refbench.eval.visualize import _mask_bands, write_mask_png

    torch.manual_seed(0)
    probs = torch.rand(1, 1, 24, 24)
    if protocol == "cris":
        frame = cvwarp.CrisWarp.fit(300, 200, 96)
        want = cvwarp.cris_to_original(probs, [frame])[0] > 0.35
    else:
        frame = transforms.Letterbox.fit(300, 200, 96)
        want = (transforms.to_original(probs, [frame])[0] > 0.35).numpy()
    path = write_mask_png(tmp_path / "m.png", _mask_bands(probs[0, 0], frame, (300, 200), 0.35, band=7), (300, 200))
    with Image.open(path) as im:
        assert im.mode == "L" and im.size == (300, 200)
        got = np.asarray(im)
    assert set(np.unique(got).tolist()) <= {0, 255}
    assert np.array_equal(got == 255, want)

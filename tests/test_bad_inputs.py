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
from refbench import refer

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
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path, synth_root, request):
    ctx = Ctx(tmp_path / "work", synth_root, request)
    ctx.tmp.mkdir()
    args = case.make(ctx)
    before = _snapshot(ctx.watched)
    result = cli(*args)
    assert_one_line_error(result, case.fragment.format(**ctx.names)) if case.status == 2 else None
    assert result.exit_code == case.status
    assert _snapshot(ctx.watched) == before, "the command left something behind"


# ------------------------------------------------------------------------------ beyond one row


def test_skip_bad_lists_every_door_defect_in_the_manifest(tmp_path, synth_root, request):
    """With --skip-bad each defect is skipped, listed in the manifest, and the rest is prepared."""
    from refbench import prepare

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
    from refbench import prepare

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

    from refbench import prepare

    def full(**kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "shards" / "x.tar"))

    monkeypatch.setattr(prepare, "main", full)
    assert_one_line_error(cli("prepare", "--all", "--data", tmp_path), "x.tar: No space left on device")

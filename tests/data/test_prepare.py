"""`refbench prepare` (refbench.data.prepare): round trip, determinism, atomicity and bad input."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from refbench.data import prepare, shard_writer
from refbench.data import shards as data
from refbench.data.sources import refer
from refbench.errors import RefbenchError
from refbench.fsutil import sha256_file

NAMES = ["refcoco_unc", "refcoco+_unc", "refcocog_umd", "refcocog_google"]


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _samples(tar_path: Path) -> list[tuple[str, dict, bytes, list[tarfile.TarInfo]]]:
    """(key, json, jpg bytes, member infos) per sample of a shard, in file order."""
    with tarfile.open(tar_path) as tar:
        members = tar.getmembers()
        files = {m.name: tar.extractfile(m).read() for m in members}
    keys = sorted({m.name.rsplit(".", 1)[0] for m in members})
    assert [m.name for m in members] == [f"{k}.{ext}" for k in keys for ext in ("jpg", "json")]
    return [(k, json.loads(files[f"{k}.json"]), files[f"{k}.jpg"], members) for k in keys]


def test_round_trip(synth_root, shards_root):
    from open_clip.tokenizer import SimpleTokenizer

    tokenizer = SimpleTokenizer()
    inst = refer.load_instances(synth_root / "refcoco" / "instances.json")
    assert sorted(p.name for p in shards_root.iterdir()) == sorted(NAMES + ["grefcoco_unc"])  # --all finds synth's gRefCOCO too
    for name in NAMES:
        dataset, split_by = name.rsplit("_", 1)
        manifest = data.load_manifest(shards_root / name)
        length = manifest["tokenizer"]["context_length"]
        assert length == (22 if dataset == "refcocog" else 17)
        assert manifest["sources"]["refs"]["sha256"] == sha256_file(synth_root / dataset / f"refs({split_by}).p")
        refs = refer.load_refs(synth_root / dataset / f"refs({split_by}).p")
        expected = {}
        for r in refs:
            e = expected.setdefault(r["split"], {"images": set(), "refs": 0, "sentences": 0})
            e["images"].add(r["image_id"])
            e["refs"] += 1
            e["sentences"] += len(r["sentences"])
        by_ref = {r["ref_id"]: r for r in refs}
        assert list(manifest["splits"]) == [s for s in ("train", "val", "test", "testA", "testB") if s in expected]
        seen_refs, truncated = set(), 0
        for split, counts in manifest["splits"].items():
            assert (counts["images"], counts["refs"], counts["sentences"]) == (
                len(expected[split]["images"]), expected[split]["refs"], expected[split]["sentences"])
            paths = [Path(e["url"]) for e in data.split_shards(manifest, shards_root / name, split)]
            assert len(paths) == counts["shards"] == -(-counts["images"] // 8)
            image_ids = []
            for path, entry in zip(paths, [s for s in manifest["shards"] if s["split"] == split]):
                assert path.name == f"{split}-{paths.index(path):06d}.tar"
                assert entry["sha256"] == sha256_file(path) and entry["bytes"] == path.stat().st_size
                samples = _samples(path)
                assert entry["samples"] == len(samples) <= 8
                for key, meta, jpg, members in samples:
                    assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.mode == 0o644 for m in members)
                    im = inst.images[meta["image_id"]]
                    assert key == f"{meta['image_id']:012d}" and meta["file_name"] == im["file_name"]
                    assert (meta["height"], meta["width"]) == (im["height"], im["width"])
                    assert jpg == (synth_root / "images" / "train2014" / im["file_name"]).read_bytes()
                    image_ids.append(meta["image_id"])
                    assert [r["ref_id"] for r in meta["refs"]] == sorted(r["ref_id"] for r in meta["refs"])
                    for ref in meta["refs"]:
                        src = by_ref[ref["ref_id"]]
                        ann = inst.anns[src["ann_id"]]
                        assert (ref["ann_id"], ref["category_id"], ref["split"], ref["bbox"]) == (
                            src["ann_id"], src["category_id"], split, ann["bbox"])
                        polys = mask_utils.frPyObjects(ann["segmentation"], im["height"], im["width"])
                        union = (mask_utils.decode(polys).sum(axis=2) > 0).astype(np.uint8)
                        got = mask_utils.decode({"size": ref["mask"]["size"], "counts": ref["mask"]["counts"].encode()})
                        assert np.array_equal(got, union)
                        sents = [s["sent"] for s in src["sentences"]]
                        assert [s["sent"] for s in ref["sentences"]] == sents
                        assert [(s["sent_id"], s["raw"]) for s in ref["sentences"]] == [(s["sent_id"], s["raw"]) for s in src["sentences"]]
                        want = tokenizer(sents, context_length=length).tolist()
                        assert [s["tokens"] for s in ref["sentences"]] == want
                        for s in ref["sentences"]:
                            assert s["tokens"].count(49407) == 1 and max(s["tokens"]) == 49407
                            truncated += s["tokens"][-1] == 49407 and len(tokenizer.encode(s["sent"])) + 2 > length
                        seen_refs.add(ref["ref_id"])
            assert image_ids == sorted(image_ids) and set(image_ids) == expected[split]["images"]
        assert seen_refs == set(by_ref)
        assert truncated == sum(c["truncated_sentences"] for c in manifest["splits"].values())
        if dataset == "refcocog":
            assert truncated > 0


def test_deterministic_whatever_the_workers(synth_root, shards_root, tmp_path):
    prepare.main(all_=True, data=synth_root, out=tmp_path, workers=1, shard_size=8)
    assert _tree(tmp_path) == _tree(shards_root)


@pytest.fixture
def data_copy(synth_root, tmp_path):
    """A private copy of the synthetic raw data to corrupt."""
    return Path(shutil.copytree(synth_root, tmp_path / "data"))


def _first_train_image(data: Path) -> dict:
    refs = refer.load_refs(data / "refcoco" / "refs(unc).p")
    inst = refer.load_instances(data / "refcoco" / "instances.json")
    return inst.images[min(r["image_id"] for r in refs if r["split"] == "train")]


def _assert_nothing_written(out: Path) -> None:
    assert not out.exists() or [p for p in out.rglob("*") if p.is_file()] == []


@pytest.mark.parametrize("damage, words, workers", [
    ("missing", "file not found", 1),
    ("missing", "file not found", 2),
    ("garbage", "not a readable JPEG", 2),
    ("empty", "empty file", 2),
    ("png", "not a readable JPEG", 2),
    ("resized", "but instances.json says", 2),
])
def test_bad_image(data_copy, tmp_path, capsys, damage, words, workers):
    from PIL import Image

    im = _first_train_image(data_copy)
    path = data_copy / "images" / "train2014" / im["file_name"]
    if damage == "missing":
        path.unlink()
    elif damage == "garbage":
        path.write_bytes(b"\xff\xd8\xff garbage, not a jpeg at all")
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "png":
        Image.open(path).save(path, format="PNG")
    else:
        Image.open(path).resize((im["width"] + 1, im["height"])).save(path, format="JPEG")
    out = tmp_path / "shards"
    with pytest.raises(RefbenchError) as e:
        prepare.main(dataset="refcoco", data=data_copy, out=out, workers=workers, shard_size=8)
    assert e.value.message.startswith(f"{path}: image {im['id']}: ") and words in e.value.message
    assert "--skip-bad" in e.value.hint
    _assert_nothing_written(out)

    manifests = prepare.main(dataset="refcoco", data=data_copy, out=out, workers=workers, shard_size=8, skip_bad=True)
    m = manifests["refcoco_unc"]
    assert m["skipped"] == [{"kind": "image", "id": im["id"], "file": str(path), "reason": e.value.reason}]
    assert m["splits"]["train"]["images"] == 36 - 1
    assert "warning" in capsys.readouterr().err


def _rewrite_refs(data: Path, edit) -> int:
    path = data / "refcoco" / "refs(unc).p"
    refs = refer.load_refs(path)
    ref_id = edit(refs)
    path.write_bytes(pickle.dumps(refs, protocol=2))
    return ref_id


def test_ann_id_absent(data_copy, tmp_path):
    def edit(refs):
        refs[3]["ann_id"] = 424242
        return refs[3]["ref_id"]

    ref_id = _rewrite_refs(data_copy, edit)
    out = tmp_path / "shards"
    with pytest.raises(RefbenchError) as e:
        prepare.main(dataset="refcoco", data=data_copy, out=out)
    refs_path = data_copy / "refcoco" / "refs(unc).p"
    assert e.value.message == f"{refs_path}: ref {ref_id}: ann_id 424242 is not in {data_copy / 'refcoco' / 'instances.json'}"
    _assert_nothing_written(out)
    m = prepare.main(dataset="refcoco", data=data_copy, out=out, skip_bad=True)["refcoco_unc"]
    assert [(s["kind"], s["id"]) for s in m["skipped"]] == [("ref", ref_id)]
    assert sum(c["refs"] for c in m["splits"].values()) == len(refer.load_refs(refs_path)) - 1


def test_malformed_polygon(data_copy, tmp_path):
    refs = refer.load_refs(data_copy / "refcoco" / "refs(unc).p")
    target = refs[5]
    path = data_copy / "refcoco" / "instances.json"
    coco = json.loads(path.read_text())
    for a in coco["annotations"]:
        if a["id"] == target["ann_id"]:
            a["segmentation"][0] = a["segmentation"][0][:-1]  # odd length
    path.write_text(json.dumps(coco))
    out = tmp_path / "shards"
    with pytest.raises(RefbenchError) as e:
        prepare.main(dataset="refcoco", data=data_copy, out=out)
    assert e.value.message.startswith(f"{data_copy / 'refcoco' / 'refs(unc).p'}: ref {target['ref_id']}: ann_id {target['ann_id']} has a malformed segmentation")
    assert "needs an even count" in e.value.message
    _assert_nothing_written(out)


def test_code_running_pickle_is_refused(data_copy, tmp_path):
    marker = tmp_path / "pwned"
    (data_copy / "refcoco" / "refs(unc).p").write_bytes(f"cos\nsystem\n(S'touch {marker}'\ntR.".encode())
    with pytest.raises(RefbenchError, match=r"refused to load: the pickle asks for os\.system"):
        prepare.main(dataset="refcoco", data=data_copy, out=tmp_path / "shards")
    assert not marker.exists()
    _assert_nothing_written(tmp_path / "shards")


def test_missing_data_names_the_path_and_a_hint(tmp_path):
    with pytest.raises(RefbenchError) as e:
        prepare.main(all_=True, data=tmp_path / "nowhere", out=tmp_path / "shards")
    assert str(tmp_path / "nowhere" / "refcoco" / "refs(unc).p") in e.value.message
    assert "refbench synth --out data" in e.value.hint
    with pytest.raises(RefbenchError) as e:
        prepare.main(dataset="refcocog", split_by="google", data=tmp_path / "nowhere", out=tmp_path / "shards")
    assert str(tmp_path / "nowhere" / "refcocog" / "refs(google).p") in e.value.message
    with pytest.raises(RefbenchError, match="no --split-by umd"):
        prepare.main(dataset="refcoco", split_by="umd", data=tmp_path, out=tmp_path / "shards")
    with pytest.raises(RefbenchError, match="--all"):
        prepare.main(data=tmp_path, out=tmp_path / "shards")


def test_failed_run_leaves_the_previous_output_intact(data_copy, tmp_path):
    out = tmp_path / "shards"
    prepare.main(dataset="refcoco", data=data_copy, out=out, shard_size=8)
    before = _tree(out)
    im = _first_train_image(data_copy)
    (data_copy / "images" / "train2014" / im["file_name"]).unlink()
    with pytest.raises(RefbenchError, match="file not found"):
        prepare.main(dataset="refcoco", data=data_copy, out=out, shard_size=8)
    assert _tree(out) == before


def test_rerun_after_interruption_gives_the_clean_output(synth_root, shards_root, tmp_path):
    """The state a killed run can leave (temp files, no manifest, other shards) is repaired by a re-run."""
    out = tmp_path / "shards"
    shutil.copytree(shards_root / "refcoco_unc", out / "refcoco_unc")
    ds = out / "refcoco_unc"
    (ds / "manifest.json").unlink()
    (ds / "train" / ".tmp-train-abc.tar").write_bytes(b"half a tar")
    (ds / "val" / ".tmp-manifest.json.xyz").write_bytes(b"{")
    shutil.copy(ds / "val" / "val-000000.tar", ds / "train" / "train-000000.tar")  # an older run's different shard
    (ds / "train" / "train-000099.tar").write_bytes(b"a stale shard of an earlier, bigger run")
    prepare.main(dataset="refcoco", data=synth_root, out=out, workers=2, shard_size=8)
    assert _tree(ds) == _tree(shards_root / "refcoco_unc")


def test_load_manifest_and_split_shards(shards_root, tmp_path):
    m = data.load_manifest(shards_root / "refcocog_umd")
    assert m["name"] == "refcocog_umd" and m["schema"] == "refbench-shards" and m["schema_version"] == 1
    assert [Path(e["url"]).name for e in data.split_shards(m, shards_root / "refcocog_umd", "test")] == ["test-000000.tar"]
    with pytest.raises(RefbenchError, match="split 'testA' is not in"):
        data.split_shards(m, shards_root / "refcocog_umd", "testA")
    with pytest.raises(RefbenchError) as e:
        data.load_manifest(tmp_path / "refcoco+_unc")
    assert "not prepared" in e.value.message
    assert e.value.hint == f"refbench prepare --dataset refcoco+ --split-by unc --data data --out {tmp_path}"
    with pytest.raises(RefbenchError, match="unknown dataset"):
        data.load_manifest(tmp_path / "refclef_berkeley")


def test_jpeg_size_matches_pillow(synth_root):
    from PIL import Image

    for path in sorted((synth_root / "images" / "train2014").iterdir())[:10]:
        assert shard_writer.jpeg_size(path.read_bytes()) == Image.open(path).size
    image = Image.open(path)
    for mode, options in (("RGB", {"progressive": True}), ("L", {}), ("CMYK", {}), ("RGB", {"exif": b"Exif\x00\x00" + bytes(30)})):
        buf = io.BytesIO()
        image.convert(mode).save(buf, format="JPEG", **options)
        assert shard_writer.jpeg_size(buf.getvalue()) == image.size, (mode, options)
    for bad in (b"", b"\xff\xd8", b"GIF89a....", path.read_bytes()[:20]):
        assert shard_writer.jpeg_size(bad) is None


def test_cli_prepare_error_is_one_line(data_copy, tmp_path):
    from click.testing import CliRunner

    from refbench.cli import cli

    _first = _first_train_image(data_copy)
    (data_copy / "images" / "train2014" / _first["file_name"]).write_bytes(b"nope")
    result = CliRunner().invoke(cli, ["prepare", "--dataset", "refcoco", "--data", str(data_copy), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-2].startswith("error: ") and "not a readable JPEG" in lines[-2] and lines[-1].startswith("hint: ")


@pytest.mark.slow
def test_sigkill_then_rerun(tmp_path):
    """A real `kill -9` in the middle of writing shards, then the same command: the clean output."""
    from refbench.data.synth import generate as synth

    data = tmp_path / "data"
    synth.generate(data, 600, seed=7)
    cmd = [sys.executable, "-m", "refbench", "prepare", "--dataset", "refcoco", "--data", str(data),
           "--out", str(tmp_path / "killed"), "--shard-size", "10", "--workers", "2"]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline and not list((tmp_path / "killed").rglob(".tmp-*.tar")):
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    ds = tmp_path / "killed" / "refcoco_unc"
    assert list(ds.rglob(".tmp-*")) and not (ds / "manifest.json").exists()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    prepare.main(dataset="refcoco", data=data, out=tmp_path / "clean", shard_size=10, workers=2)
    assert _tree(ds) == _tree(tmp_path / "clean" / "refcoco_unc")


def test_prepare_tar_writer_writes_what_tarfile_writes():
    """prepare's direct USTAR writer (the speed-up measured by `bench prepare`) = tarfile's bytes."""
    members = [("000000000001.jpg", b""), ("000000000001.json", b"{}"), ("000000000002.jpg", bytes(range(256)) * 2),
               ("000000000002.json", b"x" * 513), ("000000000003.jpg", np.random.default_rng(0).bytes(10_000))]
    expected = io.BytesIO()
    with tarfile.open(fileobj=expected, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = len(payload), 0, 0o644, 0, 0, "", ""
            tar.addfile(info, io.BytesIO(payload))
    got = io.BytesIO()
    writer = shard_writer._TarWriter(got)
    for name, payload in members:
        writer.add(name, payload)
    writer.close()
    assert got.getvalue() == expected.getvalue()
    assert writer.n == len(expected.getvalue()) and writer.sha.hexdigest() == hashlib.sha256(expected.getvalue()).hexdigest()
    with pytest.raises(ValueError, match="does not fit"):
        shard_writer.ustar_header("x" * 101, 1)

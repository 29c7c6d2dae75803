"""Hugging Face parquet mirrors (refbench.data.sources.hf): the same shards as the refer files, the split
mapping, and every kind of bad parquet input (one line naming the file, the ref_id and the problem)."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import polars as pl
import pytest
from _harness import assert_cli_ok, assert_one_line_error, cli

from refbench.data import prepare
from refbench.data import shards as data
from refbench.data.sources import hf as refer_hf
from refbench.data.sources import refer
from refbench.data.synth import generate as synth
from refbench.errors import RefbenchError
from refbench.fsutil import sha256_file

HF_NAMES = ["refcoco_unc", "refcoco+_unc", "refcocog_umd"]  # every dataset/partition the mirrors cover


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """A synthetic dataset written in both layouts (`refbench synth --parquet`), read-only."""
    root = tmp_path_factory.mktemp("hf") / "data"
    result = cli("synth", "--out", root, "--images", 24, "--seed", 3, "--parquet")
    assert_cli_ok(result)
    return root


@pytest.fixture
def snap(both, tmp_path):
    """A writable copy of the refcoco parquet snapshot (no refer files beside it), images linked."""
    data = tmp_path / "data"
    shutil.copytree(both / "refcoco" / "data", data / "refcoco" / "data")
    (data / "images").symlink_to(both / "images")
    return data


def _content(root: Path, name: str) -> dict:
    """Every shard sample of a prepared dataset: {(split, key): (json, jpg bytes)}."""
    out = {}
    for tar_path in sorted((root / name).glob("*/*.tar")):
        with tarfile.open(tar_path) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for member, blob in files.items():
            key, ext = member.rsplit(".", 1)
            if ext == "json":
                out[(tar_path.parent.name, key)] = (json.loads(blob), files[f"{key}.jpg"])
    return out


def test_parquet_snapshot_gives_the_same_shards_as_the_refer_files(both, tmp_path):
    assert_cli_ok(cli("prepare", "--all", "--source", "refer", "--data", both, "--out", tmp_path / "refer", "--shard-size", 5))
    result = cli("prepare", "--all", "--source", "hf", "--data", both, "--out", tmp_path / "hf", "--shard-size", 5)
    assert_cli_ok(result)
    assert "jxu124/refcoco" in result.output and "test -> testA" in result.output
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == sorted(HF_NAMES)  # no google partition in the mirrors
    for name in HF_NAMES:
        a, b = data.load_manifest(tmp_path / "refer" / name), data.load_manifest(tmp_path / "hf" / name)
        content = _content(tmp_path / "hf", name)
        assert content and content == _content(tmp_path / "refer", name)  # samples, refs, masks, tokens
        assert {k: v for k, v in a.items() if k != "sources"} == {k: v for k, v in b.items() if k != "sources"}  # counts, shards
        dataset = name.rsplit("_", 1)[0]
        src = b["sources"]
        assert (src["source"], src["repo"], a["sources"]["source"]) == ("hf", refer_hf.MIRRORS[dataset].repo, "refer")
        assert src["split_map"] == refer_hf.MIRRORS[dataset].splits
        for f in src["files"]:
            assert f["sha256"] == sha256_file(f["path"]) and f["maps_to"] == src["split_map"][f["split"]]
        assert sum(f["rows"] for f in src["files"]) == sum(c["refs"] for c in b["splits"].values())


@pytest.mark.parametrize("dataset,expected", [
    ("refcoco", {"train": "train", "validation": "val", "test": "testA", "testB": "testB"}),
    ("refcoco+", {"train": "train", "validation": "val", "test": "testA", "testB": "testB"}),
    ("refcocog", {"train": "train", "validation": "val", "test": "test"}),
])
def test_split_mapping(both, dataset, expected):
    assert refer_hf.MIRRORS[dataset].splits == expected
    snap = refer_hf.load_snapshot(both / dataset, dataset, categories={})
    assert snap.sources["split_map"] == expected
    by_file = {}
    for ref in snap.refs:
        by_file.setdefault(Path(snap.files[ref["ref_id"]]).name.split("-")[0], set()).add(ref["split"])
    assert by_file == {theirs: {ours} for theirs, ours in expected.items()}
    pickled = {r["ref_id"]: r["split"] for r in refer.load_refs(both / dataset / f"refs({refer_hf.MIRRORS[dataset].split_by}).p")}
    assert {r["ref_id"]: r["split"] for r in snap.refs} == pickled


def test_split_column_may_hold_the_mirror_name(snap):
    """Whether a row of the `test` file says "test" or "testA" is not documented: both are taken."""
    path = next((snap / "refcoco" / "data").glob("test-*.parquet"))
    pl.read_parquet(path).with_columns(split=pl.lit("test")).write_parquet(path)
    loaded = refer_hf.load_snapshot(snap / "refcoco", "refcoco", categories={})
    assert {r["split"] for r in loaded.refs if Path(loaded.files[r["ref_id"]]) == path} == {"testA"}
    assert loaded.sources["split_column"]["test"] == ["test"]
    pl.read_parquet(path).with_columns(split=pl.lit("val")).write_parquet(path)
    with pytest.raises(refer.BadInput, match=r"column 'split' is 'val' in a 'test' file \(expected 'test' or 'testA'\)"):
        refer_hf.load_snapshot(snap / "refcoco", "refcoco")


def test_file_names_with_hash_suffixes_and_shards(snap):
    data = snap / "refcoco" / "data"
    train = data / "train-00000-of-00001.parquet"
    rows = pl.read_parquet(train)
    train.unlink()
    rows[: len(rows) // 2].write_parquet(data / "train-00000-of-00002-94431d5f4bd5b93f.parquet")
    rows[len(rows) // 2:].write_parquet(data / "train-00001-of-00002-381ef1aeb196febd.parquet")
    files = refer_hf.snapshot_files(snap / "refcoco", "refcoco")
    assert list(files) == ["train", "validation", "test", "testB"] and len(files["train"]) == 2
    assert len(refer_hf.load_snapshot(snap / "refcoco", "refcoco").refs) == sum(
        pl.read_parquet(p).height for ps in files.values() for p in ps)
    stale = data / "train-00001-of-00002-0026a9046a1edcf9.parquet"
    shutil.copy(data / "train-00001-of-00002-381ef1aeb196febd.parquet", stale)
    with pytest.raises(RefbenchError, match="both hold shard 1 of split 'train'"):
        refer_hf.snapshot_files(snap / "refcoco", "refcoco")
    stale.unlink()
    (data / "train-00000-of-00002-94431d5f4bd5b93f.parquet").unlink()
    with pytest.raises(RefbenchError, match=r"split 'train' lacks shard\(s\) \[0\] of 2"):
        refer_hf.snapshot_files(snap / "refcoco", "refcoco")
    shutil.copy(data / "testB-00000-of-00001.parquet", data / "testC-00000-of-00001.parquet")
    with pytest.raises(RefbenchError, match="split 'testC' is not one of jxu124/refcoco's splits"):
        refer_hf.snapshot_files(snap / "refcoco", "refcoco")


def test_row_counts_checked_against_the_card(snap, both):
    shutil.copy(both / "refcoco" / "README.md", snap / "refcoco" / "README.md")
    card = refer_hf.card_rows(snap / "refcoco")
    assert set(card) == {"train", "validation", "test", "testB"}
    assert refer_hf.load_snapshot(snap / "refcoco", "refcoco").sources["card_rows"] == card
    data = snap / "refcoco" / "data"
    test = next(data.glob("test-*.parquet"))
    pl.concat([pl.read_parquet(test)] * 2).write_parquet(test)  # as if two test files had been merged
    with pytest.raises(RefbenchError, match=rf"split 'test' has {2 * card['test']} rows, its card .* lists {card['test']}"):
        refer_hf.load_snapshot(snap / "refcoco", "refcoco")
    test.unlink()
    with pytest.raises(RefbenchError, match="no parquet file of split.s. test, which its card"):
        refer_hf.load_snapshot(snap / "refcoco", "refcoco")
    real = "  splits:\n  - name: train\n    num_bytes: 81385755\n    num_examples: 42404\n  - name: testB\n    num_examples: 1810\n"
    (snap / "refcoco" / "README.md").write_text("---\ndataset_info:\n  features:\n  - name: ref_id\n    dtype: int64\n" + real + "---\n")
    assert refer_hf.card_rows(snap / "refcoco") == {"train": 42404, "testB": 1810}


def _edit_row(data: Path, split: str, column: str, value, row: int = 0) -> int:
    """Set `column` of one row of a split file; returns that row's ref_id."""
    path = next((data / "refcoco" / "data").glob(f"{split}-*.parquet"))
    df = pl.read_parquet(path)
    values = df[column].to_list()
    values[row] = value
    df.with_columns(pl.Series(column, values, dtype=df.schema[column])).write_parquet(path)
    return df["ref_id"][row]


def _assert_nothing_written(out: Path) -> None:
    assert not out.exists() or not any(out.rglob("*.tar"))


def test_missing_column(snap, tmp_path):
    path = next((snap / "refcoco" / "data").glob("validation-*.parquet"))
    pl.read_parquet(path).drop("raw_anns").write_parquet(path)
    proc = cli("prepare", "--dataset", "refcoco", "--data", snap, "--out", tmp_path / "shards")
    assert_one_line_error(proc, f"{path}: no column 'raw_anns'")
    _assert_nothing_written(tmp_path / "shards")
    pl.read_parquet(path).with_columns(ref_id=pl.col("ref_id").cast(pl.String), raw_anns=pl.lit("{}")).write_parquet(path)
    with pytest.raises(RefbenchError, match=f"{path}: column 'ref_id' is String, the cards give it as int64"):
        refer_hf.load_snapshot(snap / "refcoco", "refcoco")


def test_raw_anns_not_json(snap, tmp_path):
    ref_id = _edit_row(snap, "train", "raw_anns", "{'id': 1, 'segmentation': [[0, 0]]}")  # a Python literal, not JSON
    out = tmp_path / "shards"
    path = next((snap / "refcoco" / "data").glob("train-*.parquet"))
    proc = cli("prepare", "--dataset", "refcoco", "--data", snap, "--out", out)
    assert_one_line_error(proc, f"{path}: ref {ref_id}: raw_anns is not JSON", "--skip-bad")
    _assert_nothing_written(out)
    m = prepare.main(dataset="refcoco", data=snap, out=out, skip_bad=True)["refcoco_unc"]
    assert [(s["kind"], s["id"], s["file"]) for s in m["skipped"]] == [("ref", ref_id, str(path))]
    rows = sum(pl.read_parquet(p).height for p in (snap / "refcoco" / "data").glob("*.parquet"))
    assert sum(c["refs"] for c in m["splits"].values()) == rows - 1


def test_raw_anns_of_another_annotation(snap):
    path = next((snap / "refcoco" / "data").glob("train-*.parquet"))
    df = pl.read_parquet(path)
    ann = json.loads(df["raw_anns"][1])
    ref_id = _edit_row(snap, "train", "raw_anns", json.dumps(ann))
    with pytest.raises(refer.BadInput, match=rf"{path}: ref {ref_id}: raw_anns is annotation {ann['id']}, but ann_id is"):
        refer_hf.load_snapshot(snap / "refcoco", "refcoco")


def test_raw_records_without_the_fields_read(snap):
    path = next((snap / "refcoco" / "data").glob("train-*.parquet"))
    ann = json.loads(pl.read_parquet(path)["raw_anns"][2])
    del ann["segmentation"]
    ref_id = _edit_row(snap, "train", "raw_anns", json.dumps(ann), row=2)
    with pytest.raises(refer.BadInput, match=rf"{path}: ref {ref_id}: raw_anns has no 'segmentation'"):
        refer_hf.load_snapshot(snap / "refcoco", "refcoco")


def test_image_missing_from_the_images_folder(snap, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(snap / "images" / "train2014", images)
    path = next((snap / "refcoco" / "data").glob("testB-*.parquet"))
    row = pl.read_parquet(path).row(0, named=True)
    name = json.loads(row["raw_image_info"])["file_name"]
    (images / name).unlink()
    out = tmp_path / "shards"
    proc = cli("prepare", "--dataset", "refcoco", "--data", snap, "--images", images, "--out", out)
    assert_one_line_error(proc, f"{path}: ref {row['ref_id']}: image {name} (image_id {row['image_id']}) is not in {images}")
    _assert_nothing_written(out)
    m = prepare.main(dataset="refcoco", data=snap, images=images, out=out, skip_bad=True)["refcoco_unc"]
    same_image = pl.read_parquet(path).filter(pl.col("image_id") == row["image_id"])["ref_id"].to_list()
    assert sorted(s["id"] for s in m["skipped"]) == sorted(same_image) and row["ref_id"] in same_image


def test_duplicate_sent_ids(snap, tmp_path):
    path = next((snap / "refcoco" / "data").glob("validation-*.parquet"))
    df = pl.read_parquet(path)
    first = df["sentences"][0].to_list()
    second = df["sentences"][1].to_list()
    second[0]["sent_id"] = first[0]["sent_id"]
    ref_id = _edit_row(snap, "validation", "sentences", second, row=1)
    _edit_row(snap, "validation", "sent_ids", [s["sent_id"] for s in second], row=1)
    proc = cli("prepare", "--dataset", "refcoco", "--data", snap, "--out", tmp_path / "shards")
    assert_one_line_error(proc, f"{path}: ref {ref_id}: sent_id {first[0]['sent_id']} is also a sentence of ref {df['ref_id'][0]}")
    m = prepare.main(dataset="refcoco", data=snap, out=tmp_path / "shards", skip_bad=True)["refcoco_unc"]
    assert [s["id"] for s in m["skipped"]] == [ref_id]


def test_source_detection(both, snap, tmp_path):
    proc = cli("prepare", "--dataset", "refcoco", "--data", both, "--out", tmp_path / "a")
    assert_one_line_error(proc, "holds both refer files", "--source refer or --source hf")
    m = prepare.main(dataset="refcoco", data=snap, out=tmp_path / "b")["refcoco_unc"]  # only a snapshot: hf
    assert m["sources"]["source"] == "hf"
    proc = cli("prepare", "--dataset", "refcoco", "--source", "refer", "--data", snap, "--out", tmp_path / "c")
    assert_one_line_error(proc, f"{snap / 'refcoco' / 'refs(unc).p'} not found")
    proc = cli("prepare", "--dataset", "refcocog", "--split-by", "google", "--source", "hf", "--data", both, "--out", tmp_path / "d")
    assert_one_line_error(proc, "jxu124/refcocog holds only the umd partition")
    proc = cli("prepare", "--dataset", "refcoco+", "--source", "hf", "--data", snap, "--out", tmp_path / "e")
    assert_one_line_error(proc, f"{snap / 'refcoco+' / 'data'}/*.parquet not found", "huggingface-cli download")


def test_converted_snapshot_reads_back_as_the_refs(synth_root, tmp_path):
    """refer -> parquet (convert_refer) -> refer structures: the same refs and COCO records."""
    refer_hf.convert_refer(synth_root, "refcocog", out=tmp_path / "refcocog")
    snap = refer_hf.load_snapshot(tmp_path / "refcocog", "refcocog", categories={cid: n for cid, n, _ in synth.CATEGORIES})
    refs = refer.load_refs(synth_root / "refcocog" / "refs(umd).p")
    inst = refer.load_instances(synth_root / "refcocog" / "instances.json")
    assert sorted(snap.refs, key=lambda r: r["ref_id"]) == sorted(refs, key=lambda r: r["ref_id"])
    assert all(snap.instances.images[k] == inst.images[k] for k in snap.instances.images)
    assert all(snap.instances.anns[k] == inst.anns[k] for k in snap.instances.anns)
    assert refer_hf.COCO_CATEGORIES[1] == "person" and refer_hf.COCO_CATEGORIES[90] == "toothbrush"

"""The fault matrix: tests that really kill, corrupt and race the `refbench` commands.

One test per row. In every case nothing already written is lost, and the user gets one clear
line: stderr starts with `error: ` (at most a `hint: ` line after it), no traceback, no crash dump.

    kill -9 of `refbench prepare` half-way, then the same command  ->  identical shards and manifest
    kill -9 of `refbench train` after a checkpoint, then --resume  ->  same steps and lr, finishes
    a corrupt and a missing JPEG in the raw data                   ->  named; --skip-bad records them
    a truncated / bit-flipped shard at train and at eval time      ->  named; no incomplete record
    a refs pickle that tries to run code                           ->  refused, nothing executed
    two `refbench eval` writing results at once                    ->  both records present and valid
    a checkpoint that is not ours / is truncated                   ->  one line from eval and predict

Commands run as real subprocesses where the process matters (kill -9, races, crash dumps);
in-process through click's CliRunner otherwise.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from _harness import (
    DATASET,
    assert_cli_ok,
    assert_ok,
    assert_one_line_error,
    cli,
    env,
    read_log,
    refbench,
    refbench_cmd,
)
from test_prepare import _tree

from refbench import checkpoint
from refbench.data import prepare
from refbench.data import shards as data
from refbench.data.sources import refer
from refbench.eval import results
from refbench.fsutil import TMP_PREFIX, sha256_file
from refbench.train.recipes import get_lr

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 300, what: str = "") -> None:
    """Poll `condition()` every few ms until it holds; fail if `proc` ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the process ended (exit {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def _kill9(proc: subprocess.Popen) -> None:
    """SIGKILL the process and everything it started (its own session), then reap it."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def _popen(*args: object) -> subprocess.Popen:
    return subprocess.Popen(refbench_cmd(*args), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def _without_temps(tree: dict[str, bytes]) -> dict[str, bytes]:
    return {k: v for k, v in tree.items() if not Path(k).name.startswith(TMP_PREFIX)}


@pytest.fixture
def data_copy(synth_root, tmp_path):
    """A private copy of the synthetic raw data to damage."""
    return Path(shutil.copytree(synth_root, tmp_path / "data"))


def _train_images(data: Path) -> list[dict]:
    """The refcoco train split's images (instances.json entries), in id order (prepare's order)."""
    refs = refer.load_refs(data / "refcoco" / "refs(unc).p")
    images = refer.load_instances(data / "refcoco" / "instances.json").images
    return [images[i] for i in sorted({r["image_id"] for r in refs if r["split"] == "train"})]


# ------------------------------------------------------------------------------ kill -9


def test_kill9_of_prepare_half_way_then_the_same_command(data_copy, tmp_path):
    """A complete earlier preparation survives a run killed half-way; the re-run gives the clean output.

    One raw JPEG is swapped for a named pipe, so the worker that reaches it blocks (like a stalled
    network disk) and the run is reliably caught half-way: some shards already written under
    temporary names, one tar half-written, nothing committed.
    """
    args = ("prepare", "--all", "--data", data_copy, "--out", tmp_path / "out", "--shard-size", "8", "--workers", "2")
    prepare.main(all_=True, data=data_copy, out=tmp_path / "clean", shard_size=8, workers=2)
    shutil.copytree(tmp_path / "clean", tmp_path / "out")  # an earlier complete run of the same command
    before = _tree(tmp_path / "out")

    image = data_copy / "images" / "train2014" / _train_images(data_copy)[9]["file_name"]  # 2nd shard, 2nd image
    jpeg = image.read_bytes()
    image.unlink()
    os.mkfifo(image)
    train_dir = tmp_path / "out" / DATASET / "train"
    proc = _popen(*args)
    _wait_for(lambda: len(list(train_dir.glob(f"{TMP_PREFIX}*.tar"))) >= 2, proc, what="two shards being written")
    time.sleep(0.2)
    _kill9(proc)
    killed = _tree(tmp_path / "out")
    assert any(Path(k).name.startswith(TMP_PREFIX) for k in killed)  # it was killed half-way
    assert _without_temps(killed) == before  # the earlier manifests and shards are untouched
    for manifest in (tmp_path / "out").glob("*/manifest.json"):  # so every listed shard is complete
        for entry in json.loads(manifest.read_text())["shards"]:
            assert sha256_file(manifest.parent / entry["path"]) == entry["sha256"]

    image.unlink()
    image.write_bytes(jpeg)
    assert_ok(refbench(*args))
    assert _tree(tmp_path / "out") == _tree(tmp_path / "clean")  # no temporary file left either


def test_kill9_of_train_after_a_checkpoint_then_resume(shards_root, tmp_path):
    run = tmp_path / "run"
    args = ("train", "eavl", "--recipe", "tiny", "--steps", "6", "--batch-size", "32", "--workers", "0",
            "--shards", shards_root, "--out", run)  # 3 steps an epoch: last.pt at step 3
    proc = _popen(*args)
    _wait_for(lambda: (run / "last.pt").exists(), proc, what="the first checkpoint")
    _kill9(proc)
    ckpt = checkpoint.load(run / "last.pt")  # complete and loadable
    assert (ckpt["step"], ckpt["epoch"], ckpt["step_in_epoch"]) == (3, 1, 0)
    checkpoint.load(run / "best.pt")

    assert_cli_ok(cli(*args, "--resume"))
    final = checkpoint.load(run / "last.pt")
    assert (final["step"], final["epoch"]) == (6, 2)
    log = read_log(run)
    assert [r["step"] for r in log if "val" in r] == [3, 6]  # each validation once: nothing repeated
    (last,) = [r for r in log if "loss" in r and r["step"] == 6]
    rec = final["recipe"]
    assert last["lr"] == get_lr(5, 6, rec["lr"], rec["warmup_steps"], rec["lr_power"], rec["min_lr"])
    assert [r.get("event") for r in log].count("end") == 1


# ------------------------------------------------------------------------------ bad raw data


def test_corrupt_and_missing_jpeg_are_named_and_skip_bad_records_them(data_copy, tmp_path):
    first, other = _train_images(data_copy)[0], _train_images(data_copy)[20]
    corrupt = data_copy / "images" / "train2014" / first["file_name"]
    missing = data_copy / "images" / "train2014" / other["file_name"]
    good = corrupt.read_bytes()
    corrupt.write_bytes(good[:2] + b"this is no longer a JPEG" + good[200:])
    missing.unlink()
    out = tmp_path / "shards"
    args = ("prepare", "--dataset", "refcoco", "--data", data_copy, "--out", out, "--shard-size", "8", "--workers", "1")

    assert_one_line_error(refbench(*args), f"{corrupt}: image {first['id']}: not a readable JPEG", "--skip-bad")
    assert not out.exists() or not [p for p in out.rglob("*") if p.is_file()]  # nothing written
    corrupt.write_bytes(good)
    assert_one_line_error(refbench(*args), f"{missing}: image {other['id']}: file not found")
    corrupt.write_bytes(good[:2] + b"this is no longer a JPEG" + good[200:])

    proc = refbench(*args, "--skip-bad")
    assert_ok(proc)
    assert "Traceback" not in proc.stderr
    manifest = data.load_manifest(out / DATASET)
    assert [(s["kind"], s["id"], s["file"]) for s in manifest["skipped"]] == [
        ("image", first["id"], str(corrupt)), ("image", other["id"], str(missing))]
    assert "not a readable JPEG" in manifest["skipped"][0]["reason"] and manifest["skipped"][1]["reason"] == "file not found"
    assert manifest["splits"]["train"]["images"] == len(_train_images(data_copy)) - 2
    assert proc.stderr.count("warning: skipped image") == 2


def test_refs_pickle_that_runs_code_is_refused(data_copy, tmp_path):
    def payload(marker: Path) -> bytes:  # protocol 0: os.system("touch MARKER") while unpickling
        return f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()

    probe = tmp_path / "probe"
    pickle.loads(payload(probe))  # the payload is live: plain pickle runs it
    assert probe.exists()

    marker = tmp_path / "pwned"
    refs = data_copy / "refcoco" / "refs(unc).p"
    refs.write_bytes(payload(marker))
    proc = refbench("prepare", "--dataset", "refcoco", "--data", data_copy, "--out", tmp_path / "shards")
    assert_one_line_error(proc, str(refs), "refused to load: the pickle asks for os.system")
    assert not marker.exists()
    assert not (tmp_path / "shards").exists() or not [p for p in (tmp_path / "shards").rglob("*") if p.is_file()]


# ------------------------------------------------------------------------------ damaged shards


def _flip_middle(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x5A
    path.write_bytes(bytes(raw))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])


def test_damaged_shard_at_train_time_is_named(shards_root, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(shards_root / DATASET, shards / DATASET)
    damaged = sorted((shards / DATASET / "train").glob("*.tar"))
    for i, shard in enumerate(damaged):  # whichever shard the resampled stream reads first is damaged
        (_flip_middle if i % 2 else _truncate)(shard)
    proc = refbench("train", "eavl", "--recipe", "tiny", "--steps", "2", "--batch-size", "4", "--workers", "2",
                    "--shards", shards, "--out", tmp_path / "run")
    stderr = assert_one_line_error(proc, "is corrupt", "refbench prepare")
    assert any(f"shard {shard}" in stderr for shard in damaged), stderr
    assert not (tmp_path / "run" / "last.pt").exists()


@pytest.mark.parametrize("damage", [_truncate, pytest.param(_flip_middle, marks=pytest.mark.slow)])
def test_damaged_shard_at_eval_time_is_named_and_not_published(init_run, shards_root, tmp_path, damage):
    shards = tmp_path / "shards"
    shutil.copytree(shards_root / DATASET, shards / DATASET)
    (shard,) = (shards / DATASET / "testB").glob("*.tar")
    damage(shard)
    res = tmp_path / "results"
    proc = refbench("eval", "--checkpoint", init_run / "best.pt", "--shards", shards, "--split", "all",
                    "--results", res, "--workers", "0")
    assert_one_line_error(proc, f"shard {shard} ", "refbench prepare")  # what is wrong depends on where it broke
    # `--split all` publishes all splits or none: val and testA, scored before the damage, are not published either
    assert not res.exists() or not [p for p in res.rglob("*") if p.is_file()]


def test_eval_refuses_to_publish_a_record_with_missing_sentences(init_run, small_shards_root, tmp_path):
    """A manifest that no longer lists one of val's shards: the loader reads fewer sentences than
    the split has, and the record is refused."""
    ds = tmp_path / "shards" / DATASET
    shutil.copytree(small_shards_root / DATASET, ds)
    manifest = json.loads((ds / "manifest.json").read_text())
    dropped = [s for s in manifest["shards"] if s["split"] == "val"][-1]
    manifest["shards"].remove(dropped)
    (ds / "manifest.json").write_text(json.dumps(manifest))
    res = tmp_path / "results"
    result = cli("eval", "--checkpoint", init_run / "best.pt", "--shards", ds.parent, "--split", "val",
                 "--results", res, "--workers", "0")
    expected = manifest["splits"]["val"]["sentences"]
    assert_one_line_error(result, f"{expected - dropped['sentences']} sentences scored, the manifest lists {expected}")
    assert not res.exists() or not [p for p in res.rglob("*") if p.is_file()]


# ------------------------------------------------------------------------------ races


def test_two_evals_writing_at_once_both_recorded(init_run, shards_root, tmp_path):
    res = tmp_path / "results"
    args = ("eval", "--checkpoint", init_run / "best.pt", "--shards", shards_root, "--split", "all",
            "--results", res, "--workers", "0")
    procs = [subprocess.Popen(refbench_cmd(*args), env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    records = list(results.iter_records(res))  # every record validated against its sidecar
    splits = ["testA", "testB", "val"]
    assert sorted(r.split for r in records) == sorted(splits * 2)
    assert len({r.path for r in records}) == 6
    for split in splits:
        a, b = [r for r in records if r.split == split]
        assert a.sentences.sort("sent_id").equals(b.sentences.sort("sent_id"))  # the same scores, twice
    assert not [p for p in res.rglob("*") if p.name.startswith(TMP_PREFIX)]


# ------------------------------------------------------------------------------ bad checkpoints


def _foreign(path: Path, good: Path) -> str:
    torch.save({"state_dict": {"w": torch.zeros(3)}}, path)  # a torch file, not a refbench checkpoint
    return "not a refbench checkpoint"


def _truncated(path: Path, good: Path) -> str:
    path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    return "not a readable refbench checkpoint"


def _bad_checkpoint_command(command: str, ckpt: Path, shards_root: Path, synth_root: Path, tmp_path: Path) -> list:
    if command == "eval":
        return ["eval", "--checkpoint", ckpt, "--shards", shards_root, "--results", tmp_path / "results"]
    image = sorted((synth_root / "images" / "train2014").glob("*.jpg"))[0]
    return ["predict", "--checkpoint", ckpt, "--image", image, "--text", "the red circle", "--out", tmp_path / "m.png"]


@pytest.mark.parametrize("command", ["eval", "predict"])
@pytest.mark.parametrize("make", [_foreign, _truncated])
def test_bad_checkpoint_is_one_clear_line(init_run, shards_root, synth_root, tmp_path, command, make):
    ckpt = tmp_path / "model.pt"
    words = make(ckpt, init_run / "best.pt")
    args = _bad_checkpoint_command(command, ckpt, shards_root, synth_root, tmp_path)
    # a truncated file in a real process: a crash in torch's unzip code would show as a signal here
    proc = refbench(*args) if make is _truncated else cli(*args)
    assert_one_line_error(proc, f"{ckpt}: {words}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # no record, no mask, nothing else

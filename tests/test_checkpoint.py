"""Checkpoints: atomic, self-describing, and safe to load (no foreign pickles, clear errors)."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from refbench import checkpoint
from refbench.errors import RefbenchError


def _payload():
    return {"model": {"name": "eavl", "variant": "tiny", "config": {"num_queries": 4}},
            "state_dict": {"w": torch.arange(6.0).reshape(2, 3)}, "optimizer": None, "scaler": None,
            "step": 3, "epoch": 0, "step_in_epoch": 3, "rng": checkpoint.rng_state()}


def test_round_trip_and_format_marker(tmp_path):
    path = checkpoint.save(tmp_path / "last.pt", _payload())
    ckpt = checkpoint.load(path)
    assert ckpt["format"] == checkpoint.FORMAT and ckpt["format_version"] == checkpoint.FORMAT_VERSION
    assert torch.equal(ckpt["state_dict"]["w"], torch.arange(6.0).reshape(2, 3))
    assert ckpt["step"] == 3 and ckpt["refbench_version"]
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


def test_rng_state_restores_the_stream():
    state = checkpoint.rng_state()
    a = torch.rand(5)
    checkpoint.set_rng_state(state)
    assert torch.equal(torch.rand(5), a)


def test_truncated_checkpoint_is_one_clear_error(tmp_path):
    path = checkpoint.save(tmp_path / "last.pt", _payload())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(RefbenchError, match="not a readable refbench checkpoint"):
        checkpoint.load(path)


def test_foreign_files_are_refused(tmp_path):
    plain = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, plain)  # a torch file, but not ours
    with pytest.raises(RefbenchError, match="not a refbench checkpoint"):
        checkpoint.load(plain)
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(RefbenchError, match="not a readable refbench checkpoint"):
        checkpoint.load(text)
    with pytest.raises(RefbenchError, match="checkpoint not found"):
        checkpoint.load(tmp_path / "missing.pt")


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned-by-checkpoint",))


def test_malicious_pickle_does_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"format": checkpoint.FORMAT, "payload": _Evil()}, path, pickle_module=pickle)
    with pytest.raises(RefbenchError, match="not a readable refbench checkpoint"):
        checkpoint.load(path)
    assert not (tmp_path / "pwned-by-checkpoint").exists()


@pytest.mark.parametrize("saved, scale", [({}, 1.0), ({"scaled_kernels": True}, (9 * 64) ** -0.5),
                                          ({"scaled_kernels": False}, 1.0)])
def test_a_field_newer_than_the_checkpoint_keeps_the_old_behaviour(tmp_path, saved, scale):
    """An EAVL checkpoint written before `scaled_kernels` existed had unscaled kernels: it is
    rebuilt with scaled_kernels=False (the spec's absent_means), not with today's default."""
    import dataclasses

    from refbench import models

    torch.manual_seed(0)
    net = models.build("eavl", "tiny")
    config = {k: v for k, v in dataclasses.asdict(net.config).items() if k != "scaled_kernels"}
    payload = {"model": {"name": "eavl", "variant": "tiny", "config": {**config, **saved}},
               "state_dict": net.state_dict()}
    rebuilt = checkpoint.build_model(checkpoint.load(checkpoint.save(tmp_path / "best.pt", payload)))
    assert rebuilt.aligner.kernel_scale == pytest.approx(scale)
    assert rebuilt.config.scaled_kernels == (scale != 1.0)

"""CRIS layer for layer against CRIS.pytorch's own code, and the `cris` protocol against its inference.

The fixture (tests/fixtures/cris_parity/) was made by running CRIS.pytorch (HEAD e596332) on
this kind of machine: its RN50 model built by its own code, every tensor of its state dict drawn
by `_cris_weights.seeded_state_dict` from the stored key/shape list and seed (the dynamic
kernel's bias shifted so the maps cross 0.35), then
- its forward on two seeded 160x160 inputs and two tokenised sentences -> logits.npy;
- its test-mode RefDataset (cv2 decode, cubic affine letterbox) and its `inference()` loop
  (sigmoid, bicubic align_corners up, cubic inverse warp, > 0.35) over the fixture's raw REFER
  data (two synthetic testB images, 11 sentences; GT masks from its REFER.getMask) -> I and U
  per sentence.
Here the same weights are regenerated, converted with `refbench convert`'s code, and must give
the same logits (float32 rounding) and, through `refbench eval --protocol cris`, the same I and U
for every sentence. RN50 with ~146M parameters: slow (about 1 GB of memory, a minute).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _cris_weights import seeded_state_dict
from _harness import assert_cli_ok, cli

from refbench import checkpoint
from refbench.data import prepare
from refbench.eval import results
from refbench.train import convert

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "cris_parity"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(fixture metadata, path of the refbench checkpoint converted from the seeded CRIS weights)."""
    meta = json.loads((FIXTURE / "cris_rn50.json").read_text())
    sd = seeded_state_dict(meta["keys"], meta["seed"])
    sd["module.proj.txt.bias"][-1] += meta["kernel_bias_shift"]
    out = tmp_path_factory.mktemp("cris") / "cris_rn50.pt"
    convert.write_cris({"epoch": 0, "state_dict": sd}, out, source=Path("seeded-cris-rn50"), variant="rn50",
                       image_size=meta["input_size"], dataset="refcoco_unc", context_length=meta["word_len"])
    del sd
    return meta, out


def test_logits_equal_cris_pytorch(converted):
    meta, path = converted
    net = checkpoint.build_model(checkpoint.load(path), path)
    spec = meta["logits"]
    image = torch.randn(*spec["image_shape"], generator=torch.Generator().manual_seed(spec["image_seed"]))
    tokens = torch.tensor(spec["tokens"])
    with torch.no_grad():
        logits = net(image, tokens)["logits"].numpy()
    expected = np.load(FIXTURE / spec["file"])
    assert logits.shape == expected.shape == (2, 1, 40, 40)
    scale = float(np.abs(expected).max())  # ~17: the tolerance is float32 rounding through 50 layers
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-4 * scale)


def test_eval_protocol_cris_gives_cris_inference_iu(converted, tmp_path):
    meta, path = converted
    shards = tmp_path / "shards"
    prepare.main(dataset="refcoco", split_by="unc", data=FIXTURE / "data", out=shards, workers=1)
    assert_cli_ok(cli("eval", "--checkpoint", path, "--shards", shards, "--split", "testB", "--protocol", "cris",
                      "--results", tmp_path / "results", "--workers", "0", "--batch-size", "4"))
    (record,) = sorted((tmp_path / "results" / "refcoco_unc" / "testB").glob("*.json"))
    rec = results.load_record(record)
    ours = {r["sent_id"]: (r["I"], r["U"]) for r in rec.sentences.iter_rows(named=True)}
    theirs = {s["sent_id"]: (s["I"], s["U"]) for s in meta["inference"]["sentences"]}
    assert ours == theirs  # every sentence: the same I and U as CRIS's inference()
    assert rec.metrics["mIoU"] == pytest.approx(meta["inference"]["mIoU"], abs=1e-6)  # CRIS divides by U + 1e-6

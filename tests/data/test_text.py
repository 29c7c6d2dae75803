"""CLIP tokenization (refbench.data.text): check vectors, truncation, and equality with open_clip's tokenizer."""

from __future__ import annotations

import numpy as np
import pytest

from refbench.data import text
from refbench.data.sources import refer
from refbench.errors import RefbenchError

AWKWARD = [
    "", "   ", "man in black", "The RED circle, on the left.", "it's the guy's hat, isn't it? he'll go",
    "café naïve über", "cafÃ© mojibake", "“curly quotes” and ‘single’", "fish &amp; chips &lt;b&gt;",
    "A&B and AT&T", "tabs\tand\nnew lines  and   spaces", "emoji 🐶🐱 and 中文字符", "ﬁne ligature",
    "ＦＵＬＬＷＩＤＴＨ letters", "numbers 12345 and 3.14", "!!! ... ??? ---", "UPPER lower MiXeD",
    "\x1b[31mterminal escapes\x1b[0m", "control\x07chars", "a " * 40,
    "the purple circle on the bottom that is placed beside the small orange plus sign and a bit farther away",
]


@pytest.fixture(scope="module")
def open_clip_tokenizer():
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def _reference(tok, sentences, length):
    return tok(sentences, context_length=length).numpy().astype(np.int32)  # [N, L]


def test_check_vectors_from_refcoco_facts():
    ids = text.tokenize(["man in black", "the lady with the blue shirt"], 17)
    assert ids.dtype == np.int32 and ids.shape == (2, 17)
    assert ids[0].tolist() == [49406, 786, 530, 1449, 49407] + [0] * 12
    assert ids[1].tolist() == [49406, 518, 2909, 593, 518, 1746, 2523, 49407] + [0] * 9


def test_context_lengths():
    assert [text.context_length(d) for d in ("refcoco", "refcoco+", "refcocog")] == [17, 17, 22]
    with pytest.raises(RefbenchError, match="refclef"):
        text.context_length("refclef")
    info = text.tokenizer_info(22)
    assert info["context_length"] == 22 and (info["sot"], info["eot"], info["pad"]) == (49406, 49407, 0)


def test_truncation_keeps_eot_and_counts_length():
    long = "the red circle to the left of a small blue square " * 3
    ids, n = text.tokenize_with_lengths([long, "red one"], 22)
    assert n[0] > 22 and n[1] == 4
    assert ids[0, -1] == text.EOT and (ids[0] == text.EOT).sum() == 1 and (ids[0] != 0).all()
    assert ids[1].tolist()[:4] == [text.SOT, ids[1, 1], ids[1, 2], text.EOT] and (ids[1, 4:] == 0).all()
    assert ids[0].argmax() == 21 and ids[1].argmax() == 3  # EOT is each row's maximum


@pytest.mark.parametrize("length", [17, 22, 77])
def test_equals_open_clip_on_awkward_text(open_clip_tokenizer, length):
    assert np.array_equal(text.tokenize(AWKWARD, length), _reference(open_clip_tokenizer, AWKWARD, length))


def test_equals_open_clip_on_random_ascii(open_clip_tokenizer):
    rng = np.random.default_rng(0)
    alphabet = [chr(c) for c in range(32, 127)] + [" "] * 20
    sentences = ["".join(rng.choice(alphabet, size=int(rng.integers(0, 60)))) for _ in range(300)]
    assert np.array_equal(text.tokenize(sentences, 22), _reference(open_clip_tokenizer, sentences, 22))


def test_equals_open_clip_on_synthetic_sentences(open_clip_tokenizer, synth_root):
    for dataset, split_by in (("refcoco", "unc"), ("refcoco+", "unc"), ("refcocog", "umd")):
        sentences = [s["sent"] for r in refer.load_refs(synth_root / dataset / f"refs({split_by}).p") for s in r["sentences"]]
        length = text.context_length(dataset)
        ids, n = text.tokenize_with_lengths(sentences, length)
        assert np.array_equal(ids, _reference(open_clip_tokenizer, sentences, length)), dataset
        assert ((ids == text.EOT).sum(1) == 1).all()
        if dataset == "refcocog":
            assert (n > 22).sum() > 0  # some G-Ref sentences are cut at 22, EOT kept

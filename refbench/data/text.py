"""CLIP tokenization of referring expressions at 17 / 22 tokens (the CRIS / EAVL convention).

The ids are exactly those of open_clip's `SimpleTokenizer` (the OpenAI CLIP BPE, `clean="lower"`):
`[SOT=49406] + BPE ids of sent + [EOT=49407]`, right padded with 0 to the context length L; a
longer sentence is cut and its last slot set to EOT, so every row holds exactly one EOT, at the
row's maximum. L is 17 for RefCOCO / RefCOCO+ and 22 for G-Ref (`context_length(dataset)`).

Why not call open_clip here: `import open_clip.tokenizer` imports torch (2.5-3 s on our CPUs),
which is several times the whole `refbench prepare` of a 2,000-image set. So this module runs the
same algorithm on open_clip's own vocabulary file (`open_clip/bpe_simple_vocab_16e6.txt.gz`,
located without importing open_clip) with the same text cleaning (ftfy + html unescape +
whitespace + lower case) and the same regex. tests/data/test_text.py checks that the ids equal
open_clip's on every synthetic sentence, the check vectors of refcoco-facts.md and awkward text
(unicode, HTML entities, punctuation, contractions, truncation).
"""

from __future__ import annotations

import gzip
import html
import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

from refbench.errors import RefbenchError

TOKENIZER_NAME = "openai-clip-bpe-49408"  # the vocabulary open_clip ships (bpe_simple_vocab_16e6)
SOT, EOT, PAD = 49406, 49407, 0  # start / end of text ids and the padding id
CONTEXT_LENGTHS = {"refcoco": 17, "refcoco+": 17, "refcocog": 22, "grefcoco": 17}  # dataset -> L (CRIS, EAVL)
_PATTERN = r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def context_length(dataset: str) -> int:
    """Token context length L for a dataset name ("refcoco", "refcoco+", "refcocog")."""
    try:
        return CONTEXT_LENGTHS[dataset]
    except KeyError:
        raise RefbenchError(
            f"no context length for dataset {dataset!r}; known: {', '.join(CONTEXT_LENGTHS)}"
        ) from None


def tokenizer_info(length: int) -> dict:
    """The tokenizer description stored in shard manifests."""
    return {"name": TOKENIZER_NAME, "context_length": length, "text_field": "sent",
            "sot": SOT, "eot": EOT, "pad": PAD}


def _bytes_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable unicode map of GPT-2 / CLIP BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class _ClipBPE:
    """The CLIP byte-level BPE with open_clip's vocabulary, cleaning and cache."""

    def __init__(self, bpe_path: Path):
        import regex

        merges = gzip.open(bpe_path).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
        merges = [tuple(m.split()) for m in merges]
        self.byte_encoder = _bytes_to_unicode()
        vocab = list(self.byte_encoder.values())
        vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
        vocab += ["<start_of_text>", "<end_of_text>"]
        self.encoder = {v: i for i, v in enumerate(vocab)}
        assert self.encoder["<start_of_text>"] == SOT and self.encoder["<end_of_text>"] == EOT
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.cache = {"<start_of_text>": "<start_of_text>", "<end_of_text>": "<end_of_text>"}
        self.token_ids: dict[str, list[int]] = {}  # pre-token -> its BPE ids (the whole path, cached)
        self.pattern = regex.compile(_PATTERN, regex.IGNORECASE)

    def bpe(self, token: str) -> str:
        """Merge the symbols of one pre-token by rank; returns space-joined vocabulary entries."""
        if token in self.cache:
            return self.cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = set(zip(word, word[1:]))
            bigram = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if bigram not in self.ranks:
                break
            first, second = bigram
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        out = " ".join(word)
        self.cache[token] = out
        return out

    def encode(self, text: str) -> list[int]:
        """BPE ids of a text, without SOT/EOT, after open_clip's "lower" cleaning."""
        if not (text.isascii() and text.isprintable() and "&" not in text):
            # ftfy and HTML unescaping change nothing in printable ASCII without "&" (the
            # common case), so only other text pays for them
            import ftfy

            text = html.unescape(html.unescape(ftfy.fix_text(text)))
        text = " ".join(text.split()).lower()
        ids: list[int] = []
        for token in self.pattern.findall(text):
            token_ids = self.token_ids.get(token)
            if token_ids is None:  # first time this pre-token is seen: byte-map, merge, look up
                symbols = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
                token_ids = self.token_ids[token] = [self.encoder[t] for t in self.bpe(symbols).split(" ")]
            ids.extend(token_ids)
        return ids


@lru_cache(maxsize=1)
def _bpe() -> _ClipBPE:
    spec = importlib.util.find_spec("open_clip")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise RefbenchError("open_clip_torch is not installed; its CLIP vocabulary is needed for tokenization",
                            hint="pip install open_clip_torch")
    return _ClipBPE(Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz")


def encode(text: str) -> list[int]:
    """CLIP BPE ids of one text without SOT/EOT or padding (its untruncated length + 2 = tokens used)."""
    return _bpe().encode(text)


def tokenize_with_lengths(sentences: Sequence[str] | Iterable[str], length: int):
    """Token ids of many sentences and their untruncated lengths.

    Returns (ids int32 [N, length]: SOT + ids + EOT, zero padded, cut with EOT kept in the last
    slot; n int32 [N]: SOT + BPE ids + EOT before the cut, so `n > length` marks a truncated
    sentence). Identical sentences are encoded once, so a whole dataset tokenizes in one call.
    """
    import numpy as np

    sentences = list(sentences)
    if length < 2:
        raise RefbenchError(f"context length {length} is too short for SOT + EOT")
    ids = np.zeros((len(sentences), length), dtype=np.int32)  # [N, L]
    lengths = np.zeros(len(sentences), dtype=np.int32)  # [N]
    bpe = _bpe()
    seen: dict[str, list[int]] = {}
    for i, s in enumerate(sentences):
        enc = seen.get(s)
        if enc is None:
            enc = seen[s] = bpe.encode(s)
        row = [SOT] + enc[: length - 2] + [EOT]
        ids[i, : len(row)] = row
        lengths[i] = len(enc) + 2
    return ids, lengths


def tokenize(sentences: Sequence[str] | Iterable[str], length: int):
    """Token ids of many sentences: int32 [N, length] (see `tokenize_with_lengths`)."""
    return tokenize_with_lengths(sentences, length)[0]

"""COCO compressed RLE strings checked without pycocotools: their runs parsed with numpy.

pycocotools parses a counts string without checking it (a truncated or foreign string gives
garbage runs and a garbage area), so the scorers (refbench.eval.score, gres_score) check every
submitted string first:

    rle_counts   the run lengths of one string (pycocotools' rleFrString, in numpy)
    check_rle    ValueError unless one string's runs are non-negative and cover H x W pixels
    rles_ok      check_rle for many strings in one vectorised pass (what `score.match` runs)
"""

from __future__ import annotations

import numpy as np


def rle_counts(counts: bytes | str) -> np.ndarray:
    """The run lengths (int64) of a COCO compressed RLE string, parsed with numpy.

    The same decoding as pycocotools' `rleFrString` (5 bits per character plus a continuation
    bit, offset 48; from the fourth run on, each run is stored as the difference to the run two
    before). Raises ValueError on a character outside the alphabet or a truncated number.
    """
    raw = counts.encode() if isinstance(counts, str) else counts
    x = np.frombuffer(raw, dtype=np.uint8).astype(np.int64) - 48  # [n chars]
    if x.size == 0:
        raise ValueError("empty counts")
    if x.min() < 0 or x.max() > 63:
        raise ValueError("counts hold a character outside the RLE alphabet")
    more = (x & 0x20) != 0
    ends = np.flatnonzero(~more)  # last character of each number
    if ends.size == 0 or ends[-1] != x.size - 1:
        raise ValueError("counts end inside a number")
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    length = ends - starts + 1  # characters per number
    if length.max() > 12:
        raise ValueError("a run length is too long")
    pos = np.arange(x.size) - np.repeat(starts, length)  # index of each character within its number
    vals = np.add.reduceat((x & 0x1F) << (5 * pos), starts)  # [runs]
    negative = (x[ends] & 0x10) != 0
    vals = np.where(negative, vals - (np.int64(1) << (5 * length)), vals)  # two's complement of 5k bits
    vals[1::2] = np.cumsum(vals[1::2])  # runs 3, 5, ... are stored as differences to runs 1, 3, ...
    vals[2::2] = np.cumsum(vals[2::2])  # runs 4, 6, ... to runs 2, 4, ...
    return vals


def check_rle(counts: bytes | str, height: int, width: int) -> None:
    """ValueError unless the runs are non-negative and cover exactly height x width pixels."""
    runs = rle_counts(counts)
    if runs.min() < 0:
        raise ValueError("a run length is negative")
    total = int(runs.sum())
    if total != height * width:
        raise ValueError(f"its runs cover {total} pixels, not {height}x{width} = {height * width}")


def rles_ok(counts: list[bytes], areas: list[int]) -> np.ndarray:
    """bool [N]: which COCO compressed RLE strings parse to non-negative runs covering exactly
    `areas[i]` (= H x W) pixels: `check_rle` for many strings in one vectorised pass.

    The strings are parsed as one buffer; each one's last character is taken to end its last number
    (a string that ends inside a number is marked bad), so a bad string never shifts its neighbours.
    """
    n = len(counts)
    if n == 0:
        return np.zeros(0, bool)
    sizes = np.fromiter(map(len, counts), dtype=np.int64, count=n)
    ok = sizes > 0
    buf = np.frombuffer(b"".join(counts), dtype=np.uint8)  # [chars]
    if buf.size == 0:
        return ok
    ends_of = np.cumsum(sizes)  # [N] one past each string's last character
    x = buf - np.uint8(48)  # uint8: a character below '0' wraps above 63
    bad_char = x > 63
    if bad_char.any():  # rare: mark the strings, and read their characters as 0
        owner = np.repeat(np.arange(n), sizes)
        ok &= np.bincount(owner[bad_char], minlength=n) == 0
        x = np.where(bad_char, np.uint8(0), x)
    more = (x & 0x20) != 0  # [chars] a continuation bit: the number goes on
    nonempty = sizes > 0
    last = ends_of[nonempty] - 1
    ok[nonempty] &= ~more[last]  # a string ending inside a number is bad ...
    more[last] = False  # ... and its last character ends it, so its neighbours are read as they are
    ends = np.flatnonzero(~more)  # [numbers] last character of each number
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    length = ends - starts + 1  # [numbers] characters of each
    per_string = np.diff(np.searchsorted(ends, ends_of - 1, side="right"), prepend=0)  # [N] numbers in each string
    num_owner = np.repeat(np.arange(n), per_string)  # [numbers]
    too_long = length > 12
    if too_long.any():
        ok &= np.bincount(num_owner[too_long], minlength=n) == 0
        length = np.minimum(length, 12)
    vals = (x[starts] & 0x1F).astype(np.int64)  # [numbers] the first 5 bits; most numbers are one character
    idx = np.flatnonzero(length > 1)
    k = 1
    while idx.size:  # the k-th 5 bits of the numbers that long
        vals[idx] |= (x[starts[idx] + k] & 0x1F).astype(np.int64) << (5 * k)
        k += 1
        idx = idx[length[idx] > k]
    neg = np.flatnonzero(x[ends] & 0x10)  # sign bit of the last 5 bits: two's complement of 5 * length bits
    vals[neg] -= np.int64(1) << (5 * length[neg])
    # From the fourth run on, each run is stored as the difference to the run two before (pycocotools'
    # rleFrString: runs 4, 6, ... add run 2; runs 5, 7, ... add run 3): running sums along every other run.
    # The numbers at even global positions hold one such chain of each string, those at odd ones the other.
    first_num = np.cumsum(per_string) - per_string  # [N] global index of each string's first number
    firsts = first_num[per_string > 0]
    first_runs = vals[firsts]
    vals[firsts] = 0  # a string's first run is in no chain (its third run does not add it)
    for p in (0, 1):
        begin = (first_num - p + 1) // 2  # [N] each string's first index in vals[p::2]
        end = (first_num + per_string - p + 1) // 2  # [N] one past its last
        cum = np.cumsum(vals[p::2])
        if cum.size == 0:
            continue
        before = np.where(begin > 0, cum[np.maximum(begin - 1, 0)], 0)  # [N] the sum before the string
        vals[p::2] = cum - np.repeat(before, end - begin)
    vals[firsts] = first_runs
    ok &= per_string > 0
    negative = vals < 0
    if negative.any():
        ok &= np.bincount(num_owner[negative], minlength=n) == 0
    totals = np.bincount(num_owner, weights=vals.astype(np.float64), minlength=n)  # exact below 2**53
    ok &= totals == np.asarray(areas, dtype=np.float64)
    return ok

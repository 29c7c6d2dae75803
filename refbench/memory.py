"""The cyclic garbage collector paused around blocks that build many long-lived objects.

prepare's planning (the raw refs and annotations joined) and the scorers (a split's ground truth
and a submission read, then counted) allocate hundreds of thousands of small containers that stay
alive to the end of the block and form no reference cycles. Each of CPython's full collections
walks every one of them again, so its cost grows with what the block has already built; paused,
reference counting still frees everything as usual and the collector runs again after the block.
"""

from __future__ import annotations

import contextlib
import gc
from typing import Iterator


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector paused for the block (reference counting still frees);
    re-enabled after it only if it was enabled before."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()

"""`refbench convert cris CKPT --out PATH`: a CRIS.pytorch checkpoint becomes a refbench checkpoint.

CRIS's train.py saves {"epoch", "cur_iou", "best_iou", "prec", "state_dict", "optimizer",
"scheduler"} with the state dict of its DDP wrapper (every key starts with "module."). The
converter strips that prefix, renames every key by the model's own table
(`refbench.models.cris.CRIS_KEY_RULES`), checks the result against a freshly built refbench
`cris` model key by key and shape by shape, and writes a weights-only refbench checkpoint
(refbench.checkpoint format) that `refbench eval` and `refbench predict` take. Anything that
does not fit (missing, extra or mis-shaped keys) is refused with the keys listed, nothing
written.

The variant is read from the checkpoint (stage-3 depth: RN50 or RN101); the input size is not in
CRIS's checkpoints (its YAML configs say 416), so `--image-size` gives it. CRIS's CLIP uses
QuickGELU, so the converted config sets `quick_gelu`. Loading uses `torch.load(weights_only=True)`
with only `collections.Counter` (the MultiStepLR milestones in the scheduler state) admitted, so
a checkpoint cannot run code.
"""

from __future__ import annotations

import collections
import dataclasses
from pathlib import Path
from typing import Any

from refbench.errors import RefbenchError

CRIS_IMAGE_SIZE = 416  # CRIS's configs: input_size 416 (RefCOCO, RefCOCO+, G-Ref)
LISTED = 6  # keys named per kind of mismatch in the error line


def load_torch_file(path: Path) -> Any:
    """torch.load on the CPU, weights only (plus Counter); one error line for anything unreadable."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise RefbenchError(f"{path}: checkpoint not found")
    try:
        with torch.serialization.safe_globals([collections.Counter]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle with code, not a torch file
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise RefbenchError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {reason[:160]})") from None


def cris_state_dict(obj: Any, path: Path) -> dict:
    """The state dict inside a CRIS checkpoint (or a bare state dict), "module." prefixes stripped."""
    import torch

    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise RefbenchError(f"{path}: no CRIS state dict in it (expected a dict with a 'state_dict' of tensors)")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}


def infer_variant(sd: dict, path: Path) -> str:
    """rn50 / rn101 from the number of blocks in the checkpoint's ResNet stage 3."""
    from refbench.models import cris

    blocks = {k.split(".")[3] for k in sd if k.startswith("backbone.visual.layer3.")}
    variant = cris.CRIS_STAGE3_BLOCKS.get(len(blocks))
    if variant is None:
        raise RefbenchError(f"{path}: cannot tell the backbone: stage 3 has {len(blocks)} blocks "
                            f"(known: {', '.join(f'{n} = {v}' for n, v in cris.CRIS_STAGE3_BLOCKS.items())})",
                            hint="pass --variant")
    return variant


def _listed(items: list[str]) -> str:
    more = f", ... (+{len(items) - LISTED})" if len(items) > LISTED else ""
    return ", ".join(items[:LISTED]) + more


def map_cris_weights(sd: dict, net, path: Path) -> dict:
    """CRIS keys -> the keys of `net` (a refbench cris model); RefbenchError listing every misfit."""
    from refbench.models import cris

    ours = net.state_dict()
    mapped: dict = {}
    extra: list[str] = []
    misshaped: list[str] = []
    for key, value in sd.items():
        target = cris.cris_key(key)
        if target is cris.DROPPED:
            continue
        if target is None or target not in ours:
            extra.append(key)
        elif tuple(value.shape) != tuple(ours[target].shape):
            misshaped.append(f"{key} {list(value.shape)} (refbench {target} {list(ours[target].shape)})")
        else:
            mapped[target] = value.to(ours[target].dtype)
    missing = [k for k in ours if k not in mapped]
    if missing or extra or misshaped:
        parts = [f"{len(missing)} missing key(s): {_listed(missing)}" if missing else "",
                 f"{len(extra)} extra key(s): {_listed(extra)}" if extra else "",
                 f"{len(misshaped)} mis-shaped key(s): {_listed(misshaped)}" if misshaped else ""]
        raise RefbenchError(
            f"{path}: does not fit CRIS/{net.variant} ({'; '.join(p for p in parts if p)})",
            hint="a CRIS.pytorch checkpoint of its RN50 or RN101 config is expected; --variant picks the backbone",
        )
    return mapped


def convert_cris(src: Path, out: Path, *, variant: str | None = None, image_size: int = CRIS_IMAGE_SIZE,
                 dataset: str | None = None, context_length: int = 17) -> Path:
    """Convert the CRIS.pytorch checkpoint file `src` into the refbench checkpoint `out` (atomic)."""
    from refbench.fsutil import sha256_file

    src = Path(src)
    raw = load_torch_file(src)
    return write_cris(raw, out, source=src, source_sha256=sha256_file(src), variant=variant, image_size=image_size,
                      dataset=dataset, context_length=context_length)


def write_cris(raw: Any, out: Path, *, source: Path, source_sha256: str | None = None, variant: str | None = None,
               image_size: int = CRIS_IMAGE_SIZE, dataset: str | None = None, context_length: int = 17) -> Path:
    """A loaded CRIS checkpoint (or bare state dict) `raw` -> the refbench checkpoint `out` (atomic)."""
    from refbench import checkpoint, models

    out, source = Path(out), Path(source)
    sd = cris_state_dict(raw, source)
    variant = variant or infer_variant(sd, source)
    try:
        net = models.build("cris", variant, image_size=image_size, quick_gelu=True, norm="batch", pretrained=None)
    except models.ModelError as e:
        raise RefbenchError(f"cannot build cris/{variant}: {e}") from None
    net.load_state_dict(map_cris_weights(sd, net, source), strict=True)
    meta = raw if isinstance(raw, dict) else {}
    payload = {
        "model": {"name": "cris", "variant": variant, "config": dataclasses.asdict(net.config)},
        "state_dict": net.state_dict(),
        "optimizer": None,
        "scaler": None,
        "step": None,
        "dataset": {"name": dataset, "context_length": context_length},
        "protocol": "cris",  # scored by default under CRIS's own chain (refbench.eval.metrics.checkpoint_protocol)
        "converted_from": {
            "format": "CRIS.pytorch", "file": str(source), "sha256": source_sha256,
            "epoch": meta.get("epoch") if isinstance(meta.get("epoch"), int) else None,
            "best_iou": float(meta["best_iou"]) if isinstance(meta.get("best_iou"), (int, float)) else None,
        },
    }
    return checkpoint.save(out, payload)

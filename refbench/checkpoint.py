"""Self-describing checkpoints: atomic save, safe load, model rebuild.

A checkpoint is one `torch.save` file holding only tensors and plain containers, so it loads
with `torch.load(weights_only=True)` (no arbitrary code runs on load):

    format, format_version     "refbench-checkpoint", 1
    model                      {"name", "variant", "config": {...}}  -> models.build(name, variant, **config)
    state_dict                 model weights (the unwrapped module's, never DDP's "module." keys)
    optimizer, scaler          optimizer and GradScaler state (None for weights-only exports)
    step, epoch, step_in_epoch training position; the data stream of epoch `epoch` is replayed
                               from its start and its first `step_in_epoch` batches skipped
    recipe, train              the recipe and the training options, as dicts
    rng                        torch / python RNG states at `step`
    dataset                    {"name", "manifest_sha256", "context_length"}
    best                       {"metric", "value", "step"} of the best validation so far
    refbench_version

Writes go to a temporary file and are renamed over the target, so `last.pt` and `best.pt` are
always complete, whenever the process is killed.
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

from refbench import __version__
from refbench.errors import RefbenchError
from refbench.fsutil import atomic_write

FORMAT = "refbench-checkpoint"
FORMAT_VERSION = 1


def rng_state() -> dict:
    """The RNG states that training consumes (torch CPU + CUDA, python's `random`)."""
    import torch

    state = {"torch": torch.get_rng_state(), "python": _py_state_to_list(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    random.setstate(_py_state_from_list(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _py_state_to_list(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _py_state_from_list(state: list) -> tuple:
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def save(path: str | Path, payload: dict[str, Any]) -> Path:
    """Atomically write a checkpoint dict (format fields are added here)."""
    import torch

    path = Path(path)
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "refbench_version": __version__, **payload}
    buf = io.BytesIO()
    torch.save(payload, buf)
    with atomic_write(path, "wb") as f:
        f.write(buf.getbuffer())
    return path


def load(path: str | Path, map_location: str = "cpu") -> dict:
    """Load and validate a refbench checkpoint; one clear error line for anything else."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise RefbenchError(f"{path}: checkpoint not found", hint="train one with `refbench train MODEL`")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle, not a torch file at all
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RefbenchError(
            f"{path}: not a readable refbench checkpoint ({type(e).__name__}: {reason[:160]})",
            hint="the file may be truncated or written by another program; use best.pt/last.pt from a run folder",
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise RefbenchError(f"{path}: not a refbench checkpoint (no '{FORMAT}' format marker)")
    if ckpt.get("format_version") != FORMAT_VERSION:
        raise RefbenchError(
            f"{path}: checkpoint format version {ckpt.get('format_version')} is not supported "
            f"(this refbench reads version {FORMAT_VERSION})"
        )
    for key in ("model", "state_dict"):
        if key not in ckpt:
            raise RefbenchError(f"{path}: checkpoint has no '{key}' entry")
    return ckpt


def build_model(ckpt: dict, path: str | Path = "<checkpoint>"):
    """Rebuild the model a checkpoint describes and load its weights (random init, no download)."""
    from refbench import models

    spec = ckpt["model"]
    config = dict(spec["config"])
    config["pretrained"] = None  # the weights come from the checkpoint, never from the network
    try:
        model = models.build(spec["name"], spec["variant"], **config)
    except models.ModelError as e:
        raise RefbenchError(f"{path}: cannot rebuild model {spec['name']!r}: {e}") from None
    missing, unexpected = model.load_state_dict(ckpt["state_dict"], strict=False)
    if missing or unexpected:
        raise RefbenchError(
            f"{path}: weights do not fit model {spec['name']}/{spec['variant']} "
            f"({len(missing)} missing, {len(unexpected)} unexpected keys, e.g. {(missing or unexpected)[0]})"
        )
    model.eval()
    return model


def file_sha256(path: str | Path) -> str:
    from refbench.fsutil import sha256_file

    return sha256_file(path)

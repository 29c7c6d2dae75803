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
    rng                        every rank's own torch / python / CUDA RNG states at `step`:
                               {"world": W, "ranks": [...]} (rank_rng_states)
    dataset                    {"name", "manifest_sha256", "context_length"}
    best                       {"metric", "value", "step"} of the best validation so far
    refbench_version

Writes go to a temporary file and are renamed over the target, so `last.pt` and `best.pt` are
always complete, whenever the process is killed.
"""

from __future__ import annotations

import dataclasses
import io
import random
from pathlib import Path
from typing import Any

import torch

from refbench import __version__, models, remote
from refbench.errors import RefbenchError
from refbench.fsutil import atomic_write

FORMAT = "refbench-checkpoint"
FORMAT_VERSION = 1


def rng_state(device=None) -> dict:
    """This process's RNG states that training consumes: torch CPU, python's `random`, and the
    CUDA generator of `device` only (each rank owns one GPU; never the states of all GPUs)."""
    state = {"torch": torch.get_rng_state(), "python": _py_state_to_list(random.getstate())}
    if device is not None and torch.device(device).type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device=None) -> str | None:
    """Restore `rng_state(device)`'s states; returns a note when the CUDA state is left alone
    (saved on another kind of device), else None."""
    torch.set_rng_state(state["torch"])
    random.setstate(_py_state_from_list(state["python"]))
    cuda = state.get("cuda")
    on_cuda = device is not None and torch.device(device).type == "cuda"
    if isinstance(cuda, list):  # checkpoints before per-rank states held every visible GPU's state
        index = torch.device(device).index or 0 if on_cuda else 0
        cuda = cuda[index] if on_cuda and index < len(cuda) else None
        if cuda is None and state.get("cuda"):
            return "the CUDA RNG state was saved for other GPUs; it is not restored"
    if cuda is not None and on_cuda:
        torch.cuda.set_rng_state(cuda, device)
    elif (cuda is not None) != on_cuda:
        return f"the RNG state was saved {'with' if cuda is not None else 'without'} a CUDA device; its CUDA part is not restored"
    return None


def rank_rng_states(d) -> dict:
    """Every rank's own RNG states, gathered (a collective: every rank calls it):
    {"world": W, "ranks": [rank 0's rng_state, rank 1's, ...]}."""
    state = rng_state(d.device)
    states = [state]
    if d.world > 1:
        import torch.distributed as dist

        states = [None] * d.world
        dist.all_gather_object(states, state)
    return {"world": d.world, "ranks": states}


def restore_rank_rng(saved: dict, d) -> str | None:
    """Give this rank its own saved RNG states; returns a note (for the log) when they cannot be
    restored: a checkpoint of another world size (its ranks' states do not map onto ours), or a
    CUDA state saved on another device. Then the caller reseeds, and a resumed run is no longer
    bitwise an uninterrupted one."""
    if "ranks" not in saved:  # a single-process checkpoint written before per-rank states
        saved = {"world": 1, "ranks": [saved]}
    if saved["world"] != d.world:
        return (f"RNG states not restored: the checkpoint was written by {saved['world']} rank(s), "
                f"this run has {d.world}; each rank is reseeded (dropout masks differ from an uninterrupted run)")
    return set_rng_state(saved["ranks"][d.rank], d.device)


class _TensorSlot:
    """Where a tensor sat in a broadcast object: its index in the tensor list, shape and dtype."""

    def __init__(self, index: int, shape: tuple, dtype) -> None:
        self.index, self.shape, self.dtype = index, shape, dtype


def broadcast_from_rank0(obj: Any, d) -> Any:
    """Rank 0's `obj` (nested dicts/lists/tuples of tensors and plain values, e.g. a checkpoint)
    on every rank; `obj` is ignored on the others. The structure travels pickled, the tensors one
    by one through the process group (NCCL: via this rank's GPU), and arrive on the CPU."""
    if d.world == 1:
        return obj
    import torch
    import torch.distributed as dist

    tensors: list = []

    def strip(x):
        if isinstance(x, torch.Tensor):
            tensors.append(x)
            return _TensorSlot(len(tensors) - 1, tuple(x.shape), x.dtype)
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(strip(v) for v in x)
        return x

    box = [strip(obj) if d.rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    slots: list[_TensorSlot] = []

    def collect(x):
        if isinstance(x, _TensorSlot):
            slots.append(x)
        elif isinstance(x, dict):
            for v in x.values():
                collect(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                collect(v)

    collect(box[0])
    comm = d.device if dist.get_backend() == "nccl" else torch.device("cpu")
    received = {}
    for slot in sorted(slots, key=lambda s: s.index):
        t = tensors[slot.index].to(comm) if d.rank == 0 else torch.empty(slot.shape, dtype=slot.dtype, device=comm)
        dist.broadcast(t, src=0)
        received[slot.index] = t.cpu()

    def fill(x):
        if isinstance(x, _TensorSlot):
            return received[x.index]
        if isinstance(x, dict):
            return {k: fill(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(fill(v) for v in x)
        return x

    return fill(box[0])


def _py_state_to_list(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _py_state_from_list(state: list) -> tuple:
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def make_payload(net, *, dataset_dir: str | Path, manifest: dict, step: int = 0, epoch: int = 0,
                 step_in_epoch: int = 0, optimizer=None, scaler=None, recipe: dict | None = None,
                 train: dict | None = None, best: dict | None = None, metrics: dict | None = None,
                 dataset: str | None = None, rng: Any = "this process") -> dict:
    """The checkpoint dict of a model built by `models.build` (the one place its layout is written).

    `dataset_dir` is the prepared dataset folder the model is trained or scored on (its
    manifest is hashed here), `dataset` its name (default: the manifest's), `rng` the RNG states to
    store (default: this process's, `rng_state()`; None for none); `optimizer` / `scaler` None make a weights-only checkpoint that
    evaluates but does not resume.
    """
    return {
        "model": {"name": net.model_name, "variant": net.variant, "config": dataclasses.asdict(net.config)},
        "state_dict": net.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "step": step, "epoch": epoch, "step_in_epoch": step_in_epoch,
        "recipe": recipe,
        "train": train,
        "rng": rng_state() if rng == "this process" else rng,
        "dataset": {"name": dataset or manifest["name"], "manifest_sha256": remote.sha256(remote.join(dataset_dir, "manifest.json")),
                    "context_length": manifest["tokenizer"]["context_length"]},
        "best": best,
        "metrics": metrics,
    }


def save(path: str | Path, payload: dict[str, Any]) -> Path:
    """Atomically write a checkpoint dict (format fields are added here)."""
    path = Path(path)
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "refbench_version": __version__, **payload}
    buf = io.BytesIO()
    torch.save(payload, buf)
    with atomic_write(path, "wb") as f:
        f.write(buf.getbuffer())
    return path


def load(path: str | Path, map_location: str = "cpu") -> dict:
    """Load and validate a refbench checkpoint; one clear error line for anything else."""
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
    spec = ckpt["model"]
    try:
        # a field newer than the checkpoint takes the value its absence meant, not today's default
        config = {**models.get_spec(spec["name"]).absent_means, **spec["config"]}
        config["pretrained"] = None  # the weights come from the checkpoint, never from the network
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

"""Training curves: loss and validation metrics from a run's log.jsonl, drawn to a PNG."""

from __future__ import annotations

import json
from pathlib import Path


def read_log(path: str | Path) -> tuple[list[dict], list[dict]]:
    """(train records, validation records) of a run's JSON-lines log; torn lines are skipped."""
    train, val = [], []
    for line in Path(path).read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "val" in rec:
            val.append(rec)
        elif "loss" in rec:
            train.append(rec)
    return train, val


def plot_curves(log_path: str | Path, out: str | Path, title: str = "") -> Path:
    """Write a two-panel PNG: train loss per step, and val mIoU / oIoU per step (gIoU / cIoU for a
    gRefCOCO run, whose validations carry those) (atomic)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from refbench.fsutil import atomic_write_bytes

    train, val = read_log(log_path)
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(10, 3.6))
    if train:
        ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1.2)
    ax_loss.set(xlabel="step", ylabel="train loss", title="training loss")
    if val:
        steps = [r["step"] for r in val]
        keys = ("gIoU", "cIoU") if "gIoU" in val[-1]["val"] else ("mIoU", "oIoU")
        for key, style in zip(keys, ("o-", "s--")):
            ax_val.plot(steps, [r["val"].get(key) for r in val], style, label=f"val {key}")
        ax_val.legend()
    ax_val.set(xlabel="step", ylabel="IoU", title="validation", ylim=(0, 1))
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(out, buf.getvalue())
    return Path(out)

"""`refbench bench`: refbench measured against its baselines, side by side in one run.

Each benchmark is a function `bench_x(workdir, images) -> list[row]` registered in `BENCHES`.
A row is a dict: bench, what (the quantity, with its unit, setting and batch), ours,
baseline, ratio (ours / baseline), target (e.g. "<= 1.15", or None for information only)
and ok. `main` runs the chosen benchmarks, prints one rich table and appends one JSON line
per run (time, git commit, torch threads, rows) to the log file, atomically.

Timings are medians over several interleaved repetitions after a warm-up: the two sides
alternate step by step, and a time ratio is the median of the per-repetition ratios, so a
noisy neighbour on the machine slows both sides of a pair alike.
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

from refbench.errors import RefbenchError
from refbench.fsutil import atomic_write_text

MODEL_STEP_TARGET = 1.15  # EAVL fwd+bwd step time <= 1.15 x CRIS's (issue 7)

# (variant, batch size, timed repetitions): the tiny CPU backbone and the paper's RN50 at 480
MODEL_SETTINGS: tuple[tuple[str, int, int], ...] = (("tiny", 32, 7), ("rn50", 2, 3))
MODEL_WARMUP = 2  # untimed steps per model before timing


def _step_time(model, image, tokens, mask) -> float:
    """Seconds for one forward + loss + backward (gradients cleared first)."""
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    out = model(image, tokens)
    model.loss(out, mask)["loss"].backward()
    return time.perf_counter() - start


def bench_model(workdir: Path, images: int) -> list[dict]:
    """EAVL vs CRIS: fwd+bwd step time on the same backbone, batch and inputs; parameter counts.

    Settings: `MODEL_SETTINGS`; `images` (the data benchmarks' size) does not apply here.
    """
    import torch

    import models

    rows = []
    warmup = MODEL_WARMUP
    for variant, batch, reps in MODEL_SETTINGS:
        torch.manual_seed(0)
        nets = {name: models.build(name, variant).train() for name in ("eavl", "cris")}
        size = nets["eavl"].image_size
        g = torch.Generator().manual_seed(0)
        image = torch.randn(batch, 3, size, size, generator=g)
        mask = (torch.rand(batch, 1, size, size, generator=g) > 0.5).float()
        tokens = torch.zeros(batch, 17, dtype=torch.long)
        tokens[:, 0], tokens[:, 1:6], tokens[:, 6] = 49406, torch.randint(1, 49400, (batch, 5), generator=g), 49407
        times: dict[str, list[float]] = {name: [] for name in nets}
        for rep in range(warmup + reps):
            for name, net in nets.items():  # interleaved: eavl, cris, eavl, cris, ...
                t = _step_time(net, image, tokens, mask)
                if rep >= warmup:
                    times[name].append(t)
        step = {name: statistics.median(ts) for name, ts in times.items()}
        # the ratio is the median of per-repetition ratios: each pair ran back to back, so load
        # from other processes that comes and goes cancels within a pair
        ratio = statistics.median(e / c for e, c in zip(times["eavl"], times["cris"]))
        params = {name: sum(p.numel() for p in net.parameters()) for name, net in nets.items()}
        setting = f"{variant}, {size}px, batch {batch}, L=17, median of {reps}"
        rows.append(_row("model", f"EAVL/CRIS fwd+bwd step, s ({setting})", step["eavl"], step["cris"], MODEL_STEP_TARGET, ratio))
        rows.append(_row("model", f"EAVL/CRIS parameters, M ({variant})", params["eavl"] / 1e6, params["cris"] / 1e6, None))
        del nets
    return rows


def _row(bench: str, what: str, ours: float, baseline: float, target: float | None, ratio: float | None = None) -> dict:
    """One result; `ratio` defaults to ours / baseline."""
    ratio = ours / baseline if ratio is None else ratio
    return {
        "bench": bench,
        "what": what,
        "ours": ours,
        "baseline": baseline,
        "ratio": ratio,
        "target": f"<= {target}" if target is not None else None,
        "ok": None if target is None else ratio <= target,
    }


BENCHES: dict[str, Callable[[Path, int], list[dict]]] = {
    "model": bench_model,
}


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent)
        return out.stdout.strip() or None
    except OSError:
        return None


def _append_jsonl(log: Path, record: dict) -> None:
    """Append one JSON line; the whole file is rewritten atomically (temp + rename)."""
    old = log.read_text() if log.exists() else ""
    if old and not old.endswith("\n"):
        old += "\n"
    atomic_write_text(log, old + json.dumps(record) + "\n")


def print_rows(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="refbench bench (ratio = ours / baseline)")
    for col in ("bench", "what", "ours", "baseline", "ratio", "target", "ok"):
        table.add_column(col, justify="right" if col in ("ours", "baseline", "ratio") else "left")
    for r in rows:
        ok = "-" if r["ok"] is None else ("[green]yes[/]" if r["ok"] else "[red]NO[/]")
        table.add_row(r["bench"], r["what"], f"{r['ours']:.4g}", f"{r['baseline']:.4g}", f"{r['ratio']:.3f}", r["target"] or "-", ok)
    Console().print(table)


def main(which, workdir: Path, images: int, log: Path) -> list[dict]:
    """Run the benchmarks named in `which` ("all" = every registered one), print, log."""
    import torch

    names = list(BENCHES) if "all" in which else list(dict.fromkeys(which))
    missing = [n for n in names if n not in BENCHES]
    if missing:
        raise RefbenchError(
            f"benchmark(s) {', '.join(missing)} not implemented yet",
            hint=f"available: {', '.join(BENCHES)}",
        )
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names:
        rows.extend(BENCHES[name](workdir, images))
    print_rows(rows)
    _append_jsonl(
        Path(log),
        {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "git_commit": _git_commit(),
            "machine": platform.machine(),
            "torch_threads": torch.get_num_threads(),
            "benches": names,
            "rows": rows,
        },
    )
    return rows

"""Every registered model and every ablation configuration trains under DDP (2 ranks, gloo, CPU).

DDP without `find_unused_parameters` fails on the second step ("Expected to have finished
reduction in the prior iteration") when any trainable parameter gets no gradient, e.g. an F_vg
projection that a model never reads. Two checks: in one process, every trainable parameter of
every configuration receives a gradient; and two gloo ranks run three DDP steps of each
configuration and end with identical weights.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch

from refbench import models
from _model_helpers import make_tokens


def ddp_configs() -> list[tuple[str, str, dict]]:
    """(model, variant, config overrides): every registered model's tiny variants, and the tiny
    EAVL of every distinct ablation run (refbench ablate's Tables 2-4)."""
    from refbench import ablate

    configs = [(name, variant, {}) for name in models.names() for variant in models.get_spec(name).variants
               if variant.startswith("tiny")]
    for run in ablate.plan_runs(ablate.AblationConfig(workdir=Path("unused"))):
        configs.append(("eavl", "tiny", run.setting.overrides()))
    return configs


CONFIGS = ddp_configs()
IDS = [f"{n}-{v}-" + "-".join(f"{k}={o[k]}" for k in sorted(o)) if o else f"{n}-{v}" for n, v, o in CONFIGS]


def _batch(model, seed: int, batch: int = 2):
    g = torch.Generator().manual_seed(seed)
    size = model.image_size
    image = torch.randn(batch, 3, size, size, generator=g)
    mask = (torch.rand(batch, 1, size, size, generator=g) > 0.5).float()
    return image, make_tokens(batch, 17, seed=seed), mask


@pytest.mark.parametrize("name,variant,overrides", CONFIGS, ids=IDS)
def test_every_trainable_parameter_gets_a_gradient(name, variant, overrides, one_torch_thread):
    torch.manual_seed(0)
    model = models.build(name, variant, **overrides).train()
    image, tokens, mask = _batch(model, 0)
    model.loss(model(image, tokens), mask)["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"{name}/{variant} {overrides}: no gradient reaches {missing}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, configs: list, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    results = []
    try:
        for name, variant, overrides in configs:
            torch.manual_seed(0)  # the same init on every rank
            net = models.build(name, variant, **overrides).train()
            ddp = DistributedDataParallel(net)  # find_unused_parameters=False, as refbench train
            opt = torch.optim.SGD(net.parameters(), lr=1e-3)
            for step in range(3):  # the unused-parameter error shows on the second step
                image, tokens, mask = _batch(net, seed=100 * step + rank)  # different data per rank
                opt.zero_grad(set_to_none=True)
                net.loss(ddp(image, tokens), mask)["loss"].backward()
                opt.step()
            checksum = torch.stack([p.detach().double().sum() for p in net.parameters()]).sum()
            sums = [torch.zeros_like(checksum) for _ in range(world)]
            dist.all_gather(sums, checksum)
            results.append(float(sums[0]) == float(sums[1]))
    except Exception as e:  # reported through the file, so the parent shows the config that failed
        results.append(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    finally:
        dist.destroy_process_group()
    if rank == 0:
        with open(out, "w") as f:
            f.write(repr(results))


def test_every_model_and_ablation_trains_under_two_rank_gloo_ddp(tmp_path):
    import ast

    import torch.multiprocessing as mp

    out = tmp_path / "results.txt"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_ddp_worker, args=(2, _free_port(), CONFIGS, str(out)), nprocs=2, join=True)
    results = ast.literal_eval(out.read_text())
    failed = {IDS[i]: r for i, r in enumerate(results) if r is not True}
    assert len(results) == len(CONFIGS) and not failed, failed

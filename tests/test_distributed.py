"""refbench.distributed: rank/world discovery and precision selection in one process."""

import pytest
import torch

from refbench import distributed


def test_dist_info_defaults_and_checks():
    assert distributed.dist_info() == (0, 1)
    assert distributed.dist_info(1, 2) == (1, 2)
    with pytest.raises(ValueError):
        distributed.dist_info(2, 2)


def test_setup_distributed_single_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    d = distributed.setup_distributed()
    assert (d.rank, d.world, d.local_rank, d.main) == (0, 1, 0, True)
    assert distributed.all_gather_object(d, {"a": 1}) == [{"a": 1}]
    distributed.barrier(d)  # a no-op, must not need a process group


def test_autocast_dtype():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert distributed.autocast_dtype("auto", cpu) is None
    assert distributed.autocast_dtype("auto", cuda) is torch.bfloat16
    assert distributed.autocast_dtype("bf16", cpu) is torch.bfloat16
    assert distributed.autocast_dtype("fp16", cuda) is torch.float16
    assert distributed.autocast_dtype("off", cuda) is None
    with pytest.raises(ValueError, match="unknown amp mode"):
        distributed.autocast_dtype("fp8", cpu)

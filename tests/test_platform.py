"""Platform layer: the CPU emulation of CUDA calls, world-size checks, and a TP=2 forward equal to TP=1."""

import pytest
import torch

from spin_mcore.config import ConfigError, ParallelConfig
from spin_mcore.launcher import WorkerError, run_local
from spin_mcore.platform.distributed import check_parallel_sizes


def test_world_size_must_divide():
    with pytest.raises(ConfigError, match=r"world size 6 is not divisible by parallel.tp\*pp\*cp = 2\*2\*1 = 4"):
        check_parallel_sizes(6, ParallelConfig(tp=2, pp=2))
    check_parallel_sizes(8, ParallelConfig(tp=2, pp=2))


def _emulation_probe():
    from spin_mcore.platform import cpu_emulation

    cpu_emulation.enable()
    t = torch.empty(3, device="cuda")
    u = torch.zeros(2, device=torch.device("cuda", 0)).cuda()
    v = torch.ones(2).to("cuda")
    rng_before = torch.cuda.get_rng_state()
    torch.cuda.manual_seed(7)
    a = torch.cuda.get_rng_state()
    torch.cuda.manual_seed(7)
    b = torch.cuda.get_rng_state()
    with torch.cuda.stream(torch.cuda.Stream()):
        torch.cuda.synchronize()
    return {
        "devices": [str(x.device) for x in (t, u, v)],
        "type": torch.zeros(1).type(),
        "bf16_type": torch.zeros(1, dtype=torch.bfloat16).type(),
        "current_device": torch.cuda.current_device(),
        "rng_repeatable": bool(torch.equal(a, b)),
        "rng_changed": not torch.equal(rng_before, a),
    }


def test_cpu_emulation_maps_cuda_to_cpu():
    if torch.cuda.is_available():
        pytest.skip("emulation is CPU-only")
    (r,) = run_local(_emulation_probe, 1)
    assert r["devices"] == ["cpu", "cpu", "cpu"]
    assert r["type"] == "torch.cuda.FloatTensor" and r["bf16_type"] == "torch.cuda.BFloat16Tensor"
    assert r["current_device"] == 0 and r["rng_repeatable"] and r["rng_changed"]


def _bad_world():
    from spin_mcore.platform import init_distributed

    init_distributed(ParallelConfig(tp=2))


def test_init_refuses_bad_world_with_clear_message():
    with pytest.raises(WorkerError, match=r"ConfigError: world size 1 is not divisible by parallel.tp\*pp\*cp = 2\*1\*1 = 2"):
        run_local(_bad_world, 1)

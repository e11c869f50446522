"""On a GPU node: the agent's inventory comes from the real nvidia-smi, and intra-node GPU-to-GPU bandwidth
is measured with NCCL through torch (every GPU pair; skipped with a reason on a single-GPU node)."""

from __future__ import annotations

import pytest
from test_agent import get

from thunderops.netbench import measure, nccl_pairwise_gbps

pytestmark = pytest.mark.gpu


def test_agent_inventory_and_intra_node_nccl(agents):
    import torch

    n = torch.cuda.device_count()
    a, b = agents.start("gpu-a", "--gpu", "declared-but-ignored"), agents.start("gpu-b")
    inv = get(a.url + "/v1/gpus")[1]
    assert inv["source"] == "nvidia-smi" and inv["count"] == n
    assert inv["name"] == torch.cuda.get_device_name(0)
    assert all(g["memory_mib"] > 1000 for g in inv["gpus"])

    r = measure([a.endpoint(), b.endpoint()], duration_s=0.5, streams=2, tool="builtin", nccl_size_mb=64)
    assert r.pair("gpu-a", "gpu-b").known
    intra = r.intra["gpu-a"]
    if n < 2:
        assert intra["gbps"] is None and "needs >= 2" in intra["skipped"]
        assert "gpu-a" not in r.bandwidth_gbps().get("gpu-a", {})
    else:
        assert len(intra["pairs"]) == n * (n - 1) // 2 and intra["gbps"] > 10  # NVLink/PCIe, not a network
        assert r.bandwidth_gbps()["gpu-a"]["gpu-a"] == round(intra["gbps"], 3)


def test_nccl_pairwise_covers_every_gpu_pair():
    import torch

    n = torch.cuda.device_count()
    res = nccl_pairwise_gbps(size_mb=64, iters=5)
    if n < 2:
        assert res["pairs"] == {} and "needs >= 2 GPUs" in res["skipped"]
        return
    assert sorted(res["pairs"]) == sorted(f"{i}-{j}" for i in range(n) for j in range(i + 1, n))
    assert all(v > 10 for v in res["pairs"].values())

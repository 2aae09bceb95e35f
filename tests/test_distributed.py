"""fusedemb.FusedEmbedding under DDP and FSDP2: gradients of a 2-process gloo job equal single-process ones.

The job (tests/distributed_worker.py) runs as two CPU processes wired together with the
environment variables torchrun would set; each saves its gradients and this test compares them.
Sharded (DTensor) tables, which the kernels cannot take, are refused by name.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import fusedemb

WORLD_SIZE = 2
WORKER = Path(__file__).resolve().parent / "distributed_worker.py"
JOB_TIMEOUT_S = 180

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with the gloo backend is unavailable"
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def rank_gradients(tmp_path_factory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("distributed")
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": str(WORLD_SIZE),
        # The workers import the same fusedemb as this process does.
        "PYTHONPATH": os.pathsep.join(path for path in sys.path if path),
    }
    workers = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(out_dir)],
            env={**env, "RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(WORLD_SIZE)
    ]
    try:
        outputs = [worker.communicate(timeout=JOB_TIMEOUT_S)[0] for worker in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
    for rank, (worker, output) in enumerate(zip(workers, outputs)):
        assert worker.returncode == 0, f"rank {rank} exited with {worker.returncode}:\n{output}"
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)]


def assert_same_gradients(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name in want:
        # Equal up to float32 summation order (halves summed, then averaged across ranks).
        torch.testing.assert_close(got[name], want[name], msg=lambda message, name=name: f"{name}: {message}")


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp"])
def test_distributed_gradients_equal_single_process(rank_gradients, wrapper):
    for results in rank_gradients:
        assert "embedding.tok_emb.weight" in results["single"] and "embedding.pos_emb.weight" in results["single"]
        assert_same_gradients(results[wrapper], results["single"])
    # After the wrapper's reduction every rank holds the same gradient.
    assert_same_gradients(rank_gradients[1][wrapper], rank_gradients[0][wrapper])


def test_sharded_tables_are_refused_by_name():
    """Tensor parallelism (or fully_shard) on tok_emb makes its weight a DTensor, which the
    kernels cannot take; the error says to shard the FusedEmbedding as a whole."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import RowwiseParallel, parallelize_module

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # this process alone
    try:
        embedding = fusedemb.FusedEmbedding(11, 4, 8)
        parallelize_module(embedding, init_device_mesh("cpu", (1,)), {"tok_emb": RowwiseParallel()})
        with pytest.raises(TypeError, match=r"tok_weight is a DTensor .* shard the FusedEmbedding as a whole"):
            with pytest.warns(UserWarning, match="hooks on FusedEmbedding.tok_emb"):  # the plan's own hooks
                embedding(torch.randint(0, 11, (2, 5)))
    finally:
        dist.destroy_process_group()

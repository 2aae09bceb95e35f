"""One rank of the 2-process gloo job that tests/test_distributed.py launches on the CPU.

    RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python tests/distributed_worker.py OUT_DIR

Every rank builds the same seeded language model whose first layer is fusedemb.FusedEmbedding
(output head tied to the token table) and computes the gradients of one batch three ways:

- single: no process group involved, the full batch on this rank alone (the ground truth);
- ddp:    DistributedDataParallel, this rank's half of the batch; DDP all-reduces the
          gradients and divides by the world size;
- fsdp:   FSDP2 ``fully_shard``, this rank's half; parameters are sharded by rows, all-gathered
          for the forward and backward, and the gradients reduce-scattered and averaged.

The loss is a mean over tokens and both halves hold the same number of tokens, so the mean of
the two half-batch gradients is the full-batch gradient: all three must agree. The rank saves
its three gradient dicts (full tensors, keyed by parameter name) to OUT_DIR/rank{RANK}.pt.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from fusedemb import FusedEmbedding

VOCAB_SIZE, EMBEDDING_DIM, CONTEXT_LENGTH, BATCH_SIZE = 61, 16, 8, 4


class TiedLanguageModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = FusedEmbedding(VOCAB_SIZE, EMBEDDING_DIM, CONTEXT_LENGTH)
        self.norm = nn.LayerNorm(EMBEDDING_DIM)
        self.head = nn.Linear(EMBEDDING_DIM, VOCAB_SIZE, bias=False)
        self.head.weight = self.embedding.tok_emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.embedding(ids)))


def build_model() -> TiedLanguageModel:
    torch.manual_seed(0)
    return TiedLanguageModel()


def full_batch() -> tuple[torch.Tensor, torch.Tensor]:
    # Few distinct ids, so that ids repeat within and across the ranks' halves.
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB_SIZE // 4, (BATCH_SIZE, CONTEXT_LENGTH + 1), generator=generator)
    return tokens[:, :-1], tokens[:, 1:]


def backward_on(model: nn.Module, ids: torch.Tensor, targets: torch.Tensor) -> None:
    logits = model(ids)
    F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()


def full_gradients(module: nn.Module) -> dict[str, torch.Tensor]:
    # FSDP2 leaves DTensor gradients sharded by rows: full_tensor() all-gathers them (every rank must call it).
    return {
        name: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone()
        for name, p in module.named_parameters()
    }


def main(out_dir: Path) -> None:
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    ids, targets = full_batch()
    shard = slice(rank * BATCH_SIZE // world_size, (rank + 1) * BATCH_SIZE // world_size)

    single = build_model()
    backward_on(single, ids, targets)

    ddp = DistributedDataParallel(build_model())
    backward_on(ddp, ids[shard], targets[shard])

    fsdp = build_model()
    fully_shard(fsdp, mesh=init_device_mesh("cpu", (world_size,)))
    backward_on(fsdp, ids[shard], targets[shard])

    results = {"single": full_gradients(single), "ddp": full_gradients(ddp.module), "fsdp": full_gradients(fsdp)}
    torch.save(results, out_dir / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))

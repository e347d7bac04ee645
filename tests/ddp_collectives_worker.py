"""Run under torchrun by tests/test_resilience.py: gpt.distributed's helpers on 2 CPU ranks,
each given its own value; writes what this rank got back to OUT/rank{RANK}.json."""
import json
import os
import sys
import weakref

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from torch.distributed.fsdp import FSDPModule  # noqa: E402

from gpt import GPT, GPTConfig, distributed  # noqa: E402

world, device = distributed.init("cpu")
r = world.rank
own = torch.tensor([1.0 + 2 * r, 4.0])
model = GPT(GPTConfig(vocab_size=16, block_size=8, n_layer=2, n_head=2, n_embd=16, kernels="torch"))
sharded = distributed.wrap(model, world, device, fsdp=True)
got = {
    "world": [world.rank, world.local_rank, world.size, world.main, world.distributed],
    "any_one": distributed.any_rank(r == 1, world, device),  # rank 1's flag alone
    "any_none": distributed.any_rank(False, world, device),
    "max": distributed.max_over_ranks(10 * r + 1, world, device),  # 1 and 11
    "mean": distributed.mean(own, world).tolist(),  # [1, 4] and [3, 4]
    "own_kept": own.tolist() == [1.0 + 2 * r, 4.0],  # the rank's own value, not summed in place
    "from_main": distributed.from_main(100.0 + r, world, device),
    "blocks_sharded": [isinstance(b, FSDPModule) for b in sharded.transformer.h],
    "root_sharded": isinstance(sharded, FSDPModule),
}
distributed.barrier(world, patient=True)
patient = weakref.ref(world.patient)
del sharded, model  # as train.py's model is gone by then
distributed.shutdown(world)
got["patient_group_freed"] = patient() is None  # before exit, not in the interpreter's teardown
with open(os.path.join(sys.argv[1], f"rank{r}.json"), "w") as f:
    json.dump(got, f)

"""Run under torchrun by tests/test_resilience.py: trains, then saves this rank's parameters."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402

out = sys.argv[1]
with open(os.path.join(out, f"pid{os.environ['RANK']}"), "w") as f:  # for tests that signal one rank
    f.write(str(os.getpid()))
result = train.train(train.parse_args(sys.argv[2:]))
state = result["model"].state_dict()
if not any(hasattr(v, "full_tensor") for v in state.values()):  # FSDP shards: rank 0's ckpt.pt has the whole
    torch.save(state, os.path.join(out, f"rank{os.environ['RANK']}.pt"))

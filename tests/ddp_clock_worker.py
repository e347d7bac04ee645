"""Run under torchrun by tests/test_resilience.py: train.py on a clock that moves 1 s a step on
rank 0 and 100 s a step on rank 1 (as the one_second_steps fixture, each rank its own), with a
card of peak 1e8 FLOP/s so that the MFU shows on CPU. Each rank notes in OUT/probe{RANK}.json
the seed its dropout masks were drawn from at each step and whether it wrote a checkpoint."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402

out, rank = sys.argv[1], int(os.environ["RANK"])
clock, seeds, saves = [0.0], [], []
real_batches, real_save = train.train_batches, train.checkpoint.save


def stepped(*args, **kwargs):
    seeds.append(train.torch.initial_seed())  # set by the step before this one (or at startup)
    clock[0] += 1.0 if rank == 0 else 100.0
    return real_batches(*args, **kwargs)


def save(state, path):
    saves.append(os.path.basename(path))
    real_save(state, path)


train.time.time = lambda: clock[0]
train.train_batches = stepped
train.checkpoint.save = save
train.peak_flops = lambda device, dtype: 1e8
train.Metrics.plot = lambda self: None
code = train.main(sys.argv[2:])
with open(os.path.join(out, f"probe{rank}.json"), "w") as f:
    json.dump({"seeds": seeds[1:], "saves": saves}, f)
sys.exit(code)

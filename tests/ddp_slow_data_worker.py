"""Run under torchrun by tests/test_resilience.py: train.py whose collectives time out after 4 s
(NCCL's default is 10 minutes) and whose rank 0 takes 8 s to read the corpus (a large one, longer).
Its loss plot is left out: drawing it on a busy machine could outlast the timeout at the eval's barrier."""
import datetime
import os
import sys
import time

import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402

init_process_group, load_dataset = dist.init_process_group, train.load_dataset


def slow_load(*args, **kwargs):
    if os.environ["RANK"] == "0":
        time.sleep(8)
    return load_dataset(*args, **kwargs)


dist.init_process_group = lambda *a, **k: init_process_group(*a, **k, timeout=datetime.timedelta(seconds=4))
train.load_dataset = slow_load
train.Metrics.plot = lambda self: None
sys.exit(train.main(sys.argv[1:]))

"""A process forked after a DALI pipeline became garbage does not hang in its first collection.

A torch DataLoader's fork workers inherit every object of the parent; an abandoned DALI epoch
left in a reference cycle used to be finalised by the child's garbage collector, whose
destructor waits forever for executor threads that exist only in the parent (seen as a hung
test suite). The scenario runs in its own interpreter, so that a hang is a failed test.
"""

import subprocess
import sys
from pathlib import Path

SCENARIO = r'''
import gc, os, sys, time
import numpy as np
from carp_fast.pipelines.dali_loader import dali_eval_loader
from carp_fast.pipelines.sources import ArraySource

source = ArraySource((np.random.default_rng(0).random((64, 28, 28)) * 255).astype(np.uint8), np.zeros(64, dtype=np.int64))
loader = dali_eval_loader(source, size=28, resize=None, mean=(0.5,) * 3, std=(0.5,) * 3, workers=2, batch_size=8,
                          shard_id=0, num_shards=1, device="cpu")
epoch = iter(loader)
next(epoch)  # a pipeline with running executor threads


class Cycle:
    pass


cycle = Cycle()
cycle.self, cycle.epoch = cycle, epoch  # the abandoned epoch, garbage only at the next collection
del epoch, cycle, loader
gc.disable()
pid = os.fork()
if pid == 0:
    gc.enable()
    gc.collect()
    os._exit(0)
deadline = time.time() + 30
while time.time() < deadline:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        print("child exited", status)
        sys.exit(0)
    time.sleep(0.1)
os.kill(pid, 9)
print("child hung")
sys.exit(1)
'''


def test_a_fork_child_does_not_run_an_inherited_dali_pipelines_destructor():
    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", SCENARIO], cwd=repo, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "child exited 0" in result.stdout, result.stdout + result.stderr[-2000:]

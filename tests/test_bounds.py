"""Every kernel reads and writes only inside its tensors (tests/bounds.py: guard pages
around each input and each buffer the launchers allocate, one process per case, as an
access past them ends it with SIGSEGV)."""
import os
import subprocess
import sys

import pytest

from bounds import CASES

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize("case", sorted(CASES))
def test_accesses_stay_inside_the_tensors(case, device):
    if device == "cuda":
        pytest.skip("guard pages check the interpreter's loads; on a GPU, compute-sanitizer does this")
    if not sys.platform.startswith("linux"):
        pytest.skip("guard pages via mprotect: Linux")
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, os.path.join(HERE, "bounds.py"), case], env=env, capture_output=True,
                          text=True, timeout=300)
    if done.returncode < 0:
        pytest.fail(f"{case}: a kernel read or wrote outside its tensors (signal {-done.returncode})")
    assert done.returncode == 0, done.stderr[-3000:]

"""Without Triton (macOS, Windows, torch's CPU wheels) the model trains and samples on its
torch ops, and only asking for the kernels is an error, one line that says why.

Each run is a process in which `import triton` fails (sys.modules["triton"] = None), as it
does where the package is not installed."""
import os
import subprocess
import sys
import types

import pytest

from gpt import GPTConfig, ops
from kernels import _utils, reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_TRITON = "import sys, runpy; sys.modules['triton'] = None; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
MISSING = "Triton is not installed (pip install 'triton>=3.6'"


def without_triton(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", NO_TRITON, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("def add(a, b):\n    return a + b\n\n" * 200)
    return str(path)


def test_train_and_sample_run_on_torch_without_triton(tmp_path, corpus):
    out = str(tmp_path / "out")
    trained = without_triton("train.py", "--data", corpus, "--out-dir", out, "--cache-dir", str(tmp_path / "cache"),
                             "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32",
                             "--max-steps", "4", "--eval-interval", "4", "--eval-iters", "1")
    assert trained.returncode == 0, trained.stderr
    assert "done: step 4" in trained.stdout
    sampled = without_triton("sample.py", "--checkpoint", out, "--prompt", "def ", "--max-new-tokens", "8", "--seed", "0")
    assert sampled.returncode == 0, sampled.stderr
    assert sampled.stdout.startswith("def ")


def test_asking_for_the_kernels_without_triton_is_a_one_line_error(tmp_path, corpus):
    refused = without_triton("train.py", "--data", corpus, "--out-dir", str(tmp_path / "out"), "--kernels", "triton")
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [f"error: --kernels triton: {MISSING}; it is built for Linux only); "
                                                   "or use --kernels torch"]
    probe = ("import kernels\n"
             "assert kernels.reference.attention and kernels.TRITON_MISSING.startswith(\"" + MISSING + "\")\n"
             "try:\n    from kernels import attention\nexcept ImportError as e:\n    print(e)\n")
    script = tmp_path / "probe.py"
    script.write_text(probe)
    imported = without_triton(str(script))
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.startswith(f"kernels.attention cannot run here: {MISSING}")
    assert "kernels.reference holds the torch versions" in imported.stdout


def test_auto_runs_torch_on_a_gpu_without_triton(monkeypatch):
    monkeypatch.setattr(ops, "TRITON_MISSING", "Triton is not installed")
    gpu_tensor = types.SimpleNamespace(is_cuda=True)
    assert ops.backend(gpu_tensor, "auto") is reference
    assert ops.triton_unsupported(GPTConfig(), None, None) == "Triton is not installed"


@pytest.mark.parametrize("version, ok", [("3.5.1", False), ("3.6.0", True), ("3.9.0+git1234", True), ("3.10.0", True),
                                         ("2.3.1", False)])
def test_the_kernels_need_triton_3_6_or_newer(monkeypatch, version, ok):
    monkeypatch.setitem(sys.modules, "triton", types.SimpleNamespace(__version__=version))
    missing = _utils._triton_missing()
    if ok:
        assert missing is None
    else:
        assert missing == f"Triton {version} is installed and the kernels need 3.6 or newer (pip install 'triton>=3.6')"

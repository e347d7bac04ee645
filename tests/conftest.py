import os

import torch

# The Triton interpreter runs kernels on CPU tensors; it must be switched on
# before the first `import triton` in the process.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import candidates  # noqa: E402
from kernels._utils import TRITON_MISSING  # noqa: E402

# The kernels' own test modules. Where Triton is missing (macOS, Windows, torch's CPU wheels)
# they are skipped whole and the tests marked `triton` (the model on the kernels) are skipped:
# the rest of the suite tests the model on its torch path, the one that runs there.
KERNEL_MODULES = ["test_attention.py", "test_bench.py", "test_bounds.py", "test_codegen.py", "test_cross_entropy.py",
                  "test_decode_attention.py", "test_ffn.py", "test_kernel_api.py", "test_layer_norm.py",
                  "test_model_kernels.py", "test_sampling.py"]


def pytest_addoption(parser):
    parser.addoption("--candidates", action="store_true",
                     help="force the kernels' untimed Hopper candidates on (tests/candidates.py)")


@pytest.fixture(autouse=True)
def _candidates(request, monkeypatch):
    if request.config.getoption("--candidates"):
        candidates.force(monkeypatch)


class _SkippedModule(pytest.Module):
    def collect(self):
        pytest.skip(TRITON_MISSING)


def pytest_pycollect_makemodule(module_path, parent):
    # Also for modules named on the command line (make test's --candidates run), which
    # collect_ignore would not leave out.
    if TRITON_MISSING and module_path.name in KERNEL_MODULES:
        return _SkippedModule.from_parent(parent, path=module_path)
    return None


def pytest_report_header(config):
    if TRITON_MISSING:
        return f"the Triton kernels' tests are skipped: {TRITON_MISSING}"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_triton = pytest.mark.skip(reason=TRITON_MISSING or "")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "triton" in item.keywords and TRITON_MISSING:
            item.add_marker(skip_triton)


@pytest.fixture
def device() -> str:
    """Where kernel tests run: the GPU if there is one, else CPU tensors in the interpreter."""
    return "cuda" if torch.cuda.is_available() else "cpu"


SHAKESPEARE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "tinyshakespeare.txt")


@pytest.fixture(scope="session")
def shakespeare() -> str:
    """The classic tiny corpus, read by path from ../shared (never copied into the project)."""
    if not os.path.exists(SHAKESPEARE):
        pytest.skip(f"{SHAKESPEARE} not found")
    with open(SHAKESPEARE, encoding="utf-8") as f:
        return f.read()


@pytest.fixture
def one_second_steps(monkeypatch):
    """train.py's clock, moved 1 s as each step draws its batches: rates and etas come exact."""
    import train

    clock, real_batches = [0.0], train.train_batches

    def one_second(*args, **kwargs):
        clock[0] += 1.0
        return real_batches(*args, **kwargs)
    monkeypatch.setattr(train.time, "time", lambda: clock[0])
    monkeypatch.setattr(train, "train_batches", one_second)
    return clock

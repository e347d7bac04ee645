import os

import torch

# The Triton interpreter runs kernels on CPU tensors; it must be switched on
# before the first `import triton` in the process.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import candidates  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--candidates", action="store_true",
                     help="force the kernels' untimed Hopper candidates on (tests/candidates.py)")


@pytest.fixture(autouse=True)
def _candidates(request, monkeypatch):
    if request.config.getoption("--candidates"):
        candidates.force(monkeypatch)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


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

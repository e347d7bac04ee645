"""The benchmarks check before they time: a peer with wrong numbers is left out of the
table, wrong numbers of ours end the run (bench/common.py's check_close, unless_failing)."""
import pytest
import torch

from bench import bench_layer_norm
from kernels import add_layer_norm, layer_norm


def wrong_gradient(x, w, b, eps):
    """The right forward, and dx off by dy."""
    return bench_layer_norm.torch_layer_norm(x, w, b, eps) + (x - x.detach())


def run_with(monkeypatch, ln: dict):
    add = {"triton": add_layer_norm, "torch": bench_layer_norm.torch_add_layer_norm}
    monkeypatch.setattr(bench_layer_norm, "peers", lambda use_compile, cuda: (ln, add))
    monkeypatch.setattr(bench_layer_norm, "plot", lambda *args, **kwargs: None)
    bench_layer_norm.run(sizes=[32], elements=64, dtype=torch.float32, device="cpu", use_compile=False, plot_suffix="")


def test_a_peer_with_a_wrong_gradient_is_left_out(monkeypatch, capsys):
    run_with(monkeypatch, {"triton": layer_norm, "torch": bench_layer_norm.torch_layer_norm, "liger": wrong_gradient})
    out = capsys.readouterr().out
    assert "liger: skipped at N=32 (AssertionError: liger layer_norm at N=32, tensor 1" in out
    forward_table = out[out.index("layer_norm forward, GB/s"):]
    row = next(line for line in forward_table.splitlines() if line.startswith("| 32 |"))
    assert row.split("|")[5].strip() == "—"  # | N | M | triton | torch | liger |


def test_ours_with_a_wrong_gradient_ends_the_run(monkeypatch):
    with pytest.raises(AssertionError, match="triton layer_norm at N=32, tensor 1"):
        run_with(monkeypatch, {"triton": wrong_gradient, "torch": bench_layer_norm.torch_layer_norm, "liger": None})

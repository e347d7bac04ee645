"""The benchmarks check before they time: a peer with wrong numbers is left out of the
table, wrong numbers of ours end the run (bench/common.py's check_close, unless_failing)."""
import argparse
import importlib
import os
import re
import shlex
import subprocess
import sys
import time

import pytest
import torch

import train

from bench import bench_layer_norm
from kernels import add_layer_norm, layer_norm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The benchmarks' CPU paths run the kernels on CPU tensors, in the interpreter, which
# conftest turns on only where there is no GPU; there the benchmarks themselves check.
cpu_smoke = pytest.mark.skipif(torch.cuda.is_available(), reason="a benchmark's CPU path: needs the Triton interpreter")


def wrong_gradient(x, w, b, eps):
    """The right forward, and dx off by dy."""
    return bench_layer_norm.torch_layer_norm(x, w, b, eps) + (x - x.detach())


def run_with(monkeypatch, ln: dict):
    add = {"triton": add_layer_norm, "torch": bench_layer_norm.torch_add_layer_norm}
    monkeypatch.setattr(bench_layer_norm, "peers", lambda use_compile, cuda: (ln, add))
    monkeypatch.setattr(bench_layer_norm, "plot", lambda *args, **kwargs: None)
    bench_layer_norm.run(sizes=[32], elements=64, dtype=torch.float32, device="cpu", use_compile=False, plot_suffix="")


@cpu_smoke
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


class _Parsed(Exception):
    """Raised in place of running a benchmark, once its arguments have parsed."""


def _gpu_check_steps(tmp_path) -> dict[str, list[str]]:
    env = {k: v for k, v in os.environ.items() if k != "GPU_CHECK_DRY"} | {"GPU_CHECK_DRY": "1"}
    done = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh"), str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60, check=True)
    return {line[0]: line[1:] for line in map(shlex.split, done.stdout.splitlines())}


def test_gpu_check_commands_parse(tmp_path, monkeypatch):
    """A GPU lease is minutes long: every command bench/gpu_check.sh runs must take its flags,
    and every pytest step must select tests, checked here rather than on the GPU."""
    steps = _gpu_check_steps(tmp_path)
    assert len(steps) >= 20 and "--no-warp-specialized" in steps["ffn-sweep"]
    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        parse(self, args, namespace)
        raise _Parsed

    for name, cmd in steps.items():
        assert cmd[0] == "python3", (name, cmd)
        if cmd[1:3] == ["-m", "pytest"]:
            args = [a for i, a in enumerate(cmd[3:]) if a != "-n" and cmd[3:][i - 1] != "-n"]
            done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", *args], cwd=ROOT,
                                  capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, (name, done.stdout[-2000:], done.stderr[-2000:])
        elif cmd[1] == "-m":
            module = importlib.import_module(cmd[2])
            monkeypatch.setattr(sys, "argv", cmd[2:])
            monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
            with pytest.raises(_Parsed):
                module.main()
            monkeypatch.undo()
        else:
            assert cmd[1] == "train.py", (name, cmd)
            train.parse_args(cmd[2:])


@cpu_smoke
def test_the_compiled_sampling_peer_is_one_graph(monkeypatch):
    """bench_sampling's torch.compile peer ran sample_next, whose NaN check syncs with the host:
    two graphs and a sync a draw, which kernels.sample does not pay (and the CUDA-graph peer
    cannot capture). Its graphs, Dynamo's alone here, must hold the whole draw."""
    from torch._dynamo.utils import counters

    from bench import bench_sampling

    monkeypatch.setattr(bench_sampling, "compile_static", lambda fn: torch.compile(fn, dynamic=False, backend="eager"))
    for timing in ("bench", "bench_graph"):
        monkeypatch.setattr(bench_sampling, timing, lambda fn: (fn(), 1.0)[1])
    counters.clear()
    bench_sampling.run([2], 300, [20], torch.float32, "cpu", compile=True)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"], dict(counters["graph_break"])


@cpu_smoke
def test_the_ffn_on_triton_generation_row_runs_the_triton_ffn(monkeypatch):
    """bench_sample's "FFN on Triton" row lowered FFN_MIN_ROWS only, which "auto" reads only
    once AUTO_TRITON_FFN is on: the row timed cuBLAS's FFN again. Its steps must call the
    Triton FFN (CUDA's dispatch simulated, on a model as wide as the gpt2 preset it times)."""
    import kernels
    from bench import bench_sample
    from gpt import GPT, GPTConfig, ops
    from kernels import reference

    monkeypatch.setattr(ops, "backend", lambda x, mode="auto": reference if mode == "torch" else kernels)
    monkeypatch.setattr(ops, "AUTO_MIN_WIDTH", 32)
    calls = []
    triton_ffn = kernels.ffn
    monkeypatch.setattr(kernels, "ffn", lambda *a, **k: calls.append(1) or triton_ffn(*a, **k))
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=30, block_size=16, n_layer=1, n_head=2, n_embd=32)).eval()
    bench_sample.with_triton_ffn(lambda: bench_sample.run_ours(model, [[1, 2, 3]], 2, "cpu"))
    assert calls
    assert not ops.AUTO_TRITON_FFN and ops.FFN_MIN_ROWS == 256  # restored


@cpu_smoke
def test_the_layer_norm_sweep_times_with_no_autograd_graph_alive(monkeypatch):
    """A live output keeps its autograd graph, and with it x's AccumulateGrad node from the
    default stream: a backward captured into a CUDA graph beside it fails (run 6, the
    sweep's Liger row). Every output is dead by the time anything is timed."""
    import gc
    import weakref

    outputs = []

    def recorded(fn):
        def wrapper(*args):
            y = fn(*args)
            outputs.append(weakref.ref(y))
            return y
        return wrapper

    def timed(fn, grad_to_none=None):
        gc.collect()
        alive = [ref() for ref in outputs if ref() is not None]
        assert not alive, f"{len(alive)} outputs alive while timing"
        return 1.0

    monkeypatch.setattr(bench_layer_norm, "torch_layer_norm", recorded(bench_layer_norm.torch_layer_norm))
    monkeypatch.setattr(bench_layer_norm, "layer_norm", recorded(layer_norm))
    monkeypatch.setattr(bench_layer_norm, "bench_graph", timed)
    for name, value in dict(SWEEP_TILES=(1024,), SWEEP_PER_THREAD=(8,), SWEEP_FWD_TILES=(1024,), SWEEP_FWD_PER_THREAD=(8,),
                            SWEEP_STAGES=(1,), SWEEP_FWD=((2, 2),)).items():
        monkeypatch.setattr(bench_layer_norm, name, value)
    bench_layer_norm.sweep([64], 64 * 8, torch.float32, "cpu")
    assert len(outputs) >= 3  # the reference and at least two candidates were checked


@cpu_smoke
def test_the_ffn_profile_lists_each_op_with_its_fastest_and_slowest_call(capsys):
    """bench_ffn --profile: per kernel (per op on the CPU) its calls a step and the spread of
    its calls, ours and eager's, the tool for C = 768's unsteady forward+backward."""
    from bench import bench_ffn

    bench_ffn.profile([16], {16: 40}, torch.float32, "cpu", steps=2)
    out = capsys.readouterr().out
    for name in ("triton", "torch"):
        table = out[out.index(f"FFN forward+backward, {name}, C=16"):]
        row = next(line for line in table.splitlines() if line.startswith("| aten::mm |") or line.startswith("| aten::addmm |"))
        calls, us, share, fastest, slowest = (float(v) for v in row.strip("|").split("|")[1:])
        assert calls >= 1 and 0 < fastest <= slowest and 0 < share <= 100
    table = out[out.index("FFN forward+backward, microseconds a pass"):out.index("FFN products one at a time")]
    rows = [line.strip("|").split("|") for line in table.splitlines() if line.startswith("| 16 |")]
    assert [r[1].strip() for r in rows] == ["triton", "torch"]
    for _, _, host, device, launched, kernels, ratio in rows:
        assert 0 < float(host) and 0 < float(device) and 0 < float(kernels)
        assert float(ratio) == pytest.approx(float(launched) / float(device), rel=0.02, abs=0.006)
    table = out[out.index("FFN products one at a time"):]
    rows = [line.strip("|").split("|") for line in table.splitlines() if line.startswith("| 16 |")]
    assert [r[2].strip() for r in rows] == ["40 x 64 x 16", "40 x 16 x 64", "16 x 64 x 40", "40 x 64 x 16",
                                            "64 x 16 x 40", "40 x 16 x 64"]
    for row in rows:
        assert all(float(v) > 0 for v in row[3:7])


@cpu_smoke
def test_the_ffn_sweep_times_only_the_rows_asked_for(capsys):
    """bench_ffn --sweep --only (gpu_check's ffn-candidates): eager and the rows named, no other."""
    from bench import bench_ffn

    bench_ffn.sweep([16], torch.float32, "cpu", only=["table", "TMA + tail split"])
    out = capsys.readouterr().out
    table = out[out.index("FFN tile sweep"):]
    names = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert names[1:] == ["torch eager", "table", "TMA + tail split K", "TMA + tail split K + approx GELU"]


def test_the_fused_qkv_layout_is_the_models(monkeypatch):
    """bench_attention --fused-qkv times q, k, v laid out as gpt/model.py passes them (views
    of the QKV projection's output), and their gradients reach the one projection tensor."""
    from bench import bench_attention
    from gpt import GPT, GPTConfig, ops

    B, H, T, D = 2, 3, 5, 16
    model = GPT(GPTConfig(vocab_size=8, block_size=T, n_layer=1, n_head=H, n_embd=H * D, kernels="torch"))
    seen = []
    attention = ops.attention
    monkeypatch.setattr(ops, "attention", lambda q, k, v, **kw: seen.append((q, k, v)) or attention(q, k, v, **kw))
    model(torch.zeros(B, T, dtype=torch.long))
    views, leaves = bench_attention.qkv_inputs(B, H, T, D, torch.float32, "cpu", fused=True)
    assert [(t.shape, t.stride()) for t in views] == [(t.shape, t.stride()) for t in seen[0]]
    sum(views).sum().backward()
    assert len(leaves) == 1 and torch.equal(leaves[0].grad, torch.ones_like(leaves[0]))


@cpu_smoke
def test_the_grouped_query_run_checks_and_times_k_and_v_with_fewer_heads(monkeypatch, capsys):
    """bench_attention --gqa 2: ours and the peers get k and v with half of q's heads, and
    each is checked against SDPA's enable_gqa before it is timed; a peer that attends to
    the wrong key/value head is left out of the table."""
    from bench import bench_attention

    shapes = []
    monkeypatch.setattr(bench_attention, "plot", lambda *args, **kwargs: None)
    monkeypatch.setattr(bench_attention, "naive_maker", lambda budget, dtype, window=None: lambda B, H, T, device: (
        lambda q, k, v, dropout_p=0.0: shapes.append((q.shape[1], k.shape[1]))
        or bench_attention.naive(q, k.flip(1), v.flip(1))))  # head h // G taken from the wrong end
    bench_attention.run(seq_lens=[16], tokens=16, hidden=64, head_dims=[16], dtype=torch.float32, device="cpu",
                        use_flex=False, plot_suffix="", group=2)
    out = capsys.readouterr().out
    assert shapes == [(4, 2)] and "naive at T=16, D=16" in out
    assert "2 query heads a key/value head" in out
    assert re.search(r"\| 16 \| 1 \| 4 \| [0-9.]+ \| — \|", out)  # ours timed, the wrong peer left out


@cpu_smoke
def test_the_loss_benchmark_leaves_out_a_peer_with_a_wrong_gradient(monkeypatch, capsys):
    """bench_cross_entropy checks the loss and both gradients against float64 first: a peer
    whose dx is off is left out of its three tables, ours and torch's are timed."""
    from bench import bench_cross_entropy

    def wrong(x, w, t):
        return bench_cross_entropy.torch_loss(x, w, t) + (x - x.detach()).sum()

    ours = bench_cross_entropy.peers(use_compile=False, cuda=False)["triton"]
    monkeypatch.setattr(bench_cross_entropy, "peers", lambda use_compile, cuda: {
        "triton": ours, "torch": bench_cross_entropy.torch_loss, "liger": wrong})
    monkeypatch.setattr(bench_cross_entropy, "plot", lambda *args, **kwargs: None)
    bench_cross_entropy.run([24], 16, 100, torch.float32, "cpu", use_compile=False, plot_suffix="")
    out = capsys.readouterr().out
    assert "liger: skipped at M=24 (AssertionError: liger at M=24: tensor 1 off by" in out
    row = next(line for line in out.splitlines() if line.startswith("| 24 |"))
    cells = [c.strip() for c in row.split("|")[1:-1]]  # M, triton, torch, liger, torch / triton, liger / triton
    assert cells[3] == "—" and cells[5] == "—" and float(cells[1]) > 0 and float(cells[2]) > 0


@cpu_smoke
def test_the_window_run_checks_every_provider_under_the_windows_mask(monkeypatch, capsys):
    """bench_attention --window 5: ours and each peer are checked against SDPA with the
    window's mask before they are timed; a peer that ignores the window is left out."""
    from bench import bench_attention

    monkeypatch.setattr(bench_attention, "plot", lambda *args, **kwargs: None)
    monkeypatch.setattr(bench_attention, "naive_maker", lambda budget, dtype, window=None: lambda B, H, T, device: (
        lambda q, k, v, dropout_p=0.0: bench_attention.naive(q, k, v)))  # plain causal: no window
    bench_attention.run(seq_lens=[16], tokens=16, hidden=32, head_dims=[16], dtype=torch.float32, device="cpu",
                        use_flex=False, plot_suffix="", window=5)
    out = capsys.readouterr().out
    assert "naive: skipped at T=16, D=16" in out and "sliding window 5" in out
    assert re.search(r"\| 16 \| 1 \| 2 \| [0-9.]+ \| — \|", out)  # ours timed, the windowless peer left out


def test_a_windows_flops_count_the_pairs_it_keeps():
    """W keys a query, fewer for the first W - 1 queries: T at W = 1, T(T+1)/2 at W >= T."""
    from bench import bench_attention

    per_pair = lambda window: bench_attention.flops_per_s(1, 1, 100, 1, 1e3, 1.0, 1.0, window) / 4  # noqa: E731
    assert per_pair(1) == 100 and per_pair(100) == per_pair(10**6) == 100 * 101 / 2
    assert per_pair(None) == 100 * 100 / 2  # causal without a window: the tutorial's T^2 / 2


class _Event:
    """torch.cuda.Event as host_ms uses it: every sleep lasts 500 ms."""
    def __init__(self, enable_timing: bool = False):
        pass

    def record(self) -> None:
        pass

    def elapsed_time(self, end) -> float:
        return 500.0


def test_the_training_steps_host_time_and_profile(monkeypatch, capsys):
    """bench_train's host column and --host-profile, run here on a CPU step with the CUDA
    calls faked: a step that waits as long as the device's sleep reads as waited, a quick
    one is timed and profiled down to the functions it calls."""
    from bench import bench_train

    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: None, raising=False)
    monkeypatch.setattr(torch.cuda, "Event", _Event)

    def quick_step():
        return torch.ones(4).sum()

    ms = bench_train.host_ms(quick_step)
    assert ms is not None and 0 < ms < 400
    slept = []
    assert bench_train.host_ms(lambda: slept.append(time.sleep(0.41))) is None
    assert len(slept) == 1  # no more rounds once one waited
    bench_train.print_host_profile("quick", quick_step)
    out = capsys.readouterr().out
    assert out.startswith("### host profile of quick, three steps, by own time")
    assert "tottime" in out and "quick_step" in out
    assert "### host profile of quick, three steps, by time with callees" in out
    bench_train.print_host_profile("slow", lambda: time.sleep(0.41))
    assert "host profile of slow: the step waited on the device; not profiled" in capsys.readouterr().out


def test_the_training_benchmarks_torch_loss_row_turns_the_fused_loss_off_for_its_steps_alone():
    from bench import bench_train
    from gpt import ops

    seen = []

    def step():
        seen.append(ops.AUTO_TRITON_LOSS)
        if len(seen) == 2:
            raise RuntimeError("a failing step")
        return torch.zeros(())

    wrapped = bench_train.with_torch_loss(step)
    wrapped()
    with pytest.raises(RuntimeError):
        wrapped()
    assert seen == [False, False] and ops.AUTO_TRITON_LOSS is True

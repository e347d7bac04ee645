"""Shared benchmark plumbing: timing, environment header, table and plot output."""
from __future__ import annotations

import datetime
import os
import platform
import time
from typing import Callable, Sequence, TypeVar

import torch

PLOTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plots")


def environment() -> str:
    """One line naming device, versions and date, for the top of every result table."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    device = (
        torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    )
    return (
        f"{device} | torch {torch.__version__} | triton {triton_version} | "
        f"CUDA {torch.version.cuda} | {datetime.date.today().isoformat()}"
    )


def compile_static(fn: Callable[..., T]) -> Callable[..., T]:
    """torch.compile(fn, dynamic=False), with room for a static graph per benchmarked shape:
    past the default recompile limit (8) Dynamo runs fn eagerly, with only a warning, and
    the peer would still be reported as compiled."""
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
    return torch.compile(fn, dynamic=False)


def bench_graph(fn: Callable[[], object], grad_to_none: Sequence[torch.Tensor] | None = None) -> float:
    """Median milliseconds of fn's device work alone, replayed from a CUDA graph (triton's
    do_bench_cudagraph); `bench` on CPU.

    For kernels of tens of microseconds: there `bench` also times the host's launch path.
    On the H200 (2026-11-26) the same LayerNorm forward read 506-3080 GB/s through
    `bench` and 2909-3459 GB/s, repeatable to 0.3%, through this.
    """
    if not torch.cuda.is_available():
        return bench(fn, grad_to_none)
    from triton.testing import do_bench_cudagraph

    return do_bench_cudagraph(fn, grad_to_none=grad_to_none, return_mode="median")


def bench(fn: Callable[[], object], grad_to_none: Sequence[torch.Tensor] | None = None) -> float:
    """Milliseconds per call: on CUDA the best of three medians of triton's do_bench (each
    over ~40 ms of calls, L2 flushed before every call), a wall-clock median on CPU.

    One 100 ms median let a transient slowdown of the shared device decide a row: run 1's
    LayerNorm table had mature peers (torch.compile, Liger) swinging 2-3x between
    neighbouring N; three shorter rounds cost the same time and keep the settled one.
    """
    if torch.cuda.is_available():
        from triton.testing import do_bench

        return min(do_bench(fn, warmup=10, rep=40, grad_to_none=grad_to_none, return_mode="median") for _ in range(3))
    fn()  # warm-up
    times = []
    deadline = time.perf_counter() + 1.0
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 50):
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def launch_costs(fn: Callable[[], object], grad_to_none: Sequence[torch.Tensor] | None = None,
                 calls: int = 20) -> tuple[float, float, float]:
    """Milliseconds per call of fn three ways: the host's alone (the best of three rounds of
    `calls` calls enqueued with nothing waited on, so the device cannot hold the host back),
    the device's alone (bench_graph), and both as `bench` times them. Where the host's time
    passes the device's, the device waits for launches and `bench` times the host."""
    def call() -> None:
        for t in grad_to_none or ():
            t.grad = None
        fn()

    def sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    call()
    host = []
    for _ in range(3):
        sync()
        start = time.perf_counter()
        for _ in range(calls):
            call()
        host.append((time.perf_counter() - start) * 1e3 / calls)
    sync()
    return min(host), bench_graph(fn, grad_to_none), bench(fn, grad_to_none)


def outputs_and_grads(out: torch.Tensor | Sequence[torch.Tensor], inputs: Sequence[torch.Tensor],
                      cotangents: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """A provider's outputs, then the gradients of inputs given the outputs' cotangents:
    everything a forward+backward row times, to check before it is timed."""
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    return [o.detach() for o in outs] + list(torch.autograd.grad(outs, inputs, cotangents))


def check_close(got: Sequence[torch.Tensor], expected: Sequence[torch.Tensor], what: str, **tol: float) -> None:
    """Never time a provider that gives wrong answers: raises naming `what` and the tensor."""
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        torch.testing.assert_close(g.float(), e.float(), **tol, msg=lambda m: f"{what}, tensor {i}: {m}")


T = TypeVar("T")


def unless_failing(name: str, where: str, measure: Callable[[], T]) -> T | None:
    """measure() for a peer; a peer that fails (a version mismatch, a shape it refuses, out of
    memory, wrong numbers) is reported and left out of the table rather than ending the run.
    Ours is measured directly, so that its failure does end it."""
    try:
        return measure()
    except Exception as e:
        print(f"{name}: skipped at {where} ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # what an out-of-memory peer left
        return None


def profile_table(title: str, fn: Callable[[], object], steps: int, top: int = 25) -> float:
    """Runs fn `steps` times under torch.profiler and prints, per kernel (per op on the CPU),
    its calls a step, total microseconds a step, and the fastest and slowest call: a kernel
    whose slowest call is far off its fastest is what makes a benchmark's repeats disagree.
    Returns the microseconds a step, summed over every kernel."""
    from collections import defaultdict

    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        if cuda:
            torch.cuda.synchronize()
    calls: dict[str, list[float]] = defaultdict(list)
    for e in prof.events():
        # On CUDA the kernels themselves: the ops that launch them carry the same time.
        if cuda and e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = e.time_range.elapsed_us() if cuda else e.self_cpu_time_total
        if us > 0:
            calls[e.key].append(us)
    ranked = sorted(calls.items(), key=lambda kv: sum(kv[1]), reverse=True)
    total = sum(sum(t) for t in calls.values()) / steps
    count = sum(len(t) for t in calls.values()) / steps
    rows = [[key[:70], len(t) / steps, sum(t) / steps, 100 * sum(t) / steps / total, min(t), max(t)] for key, t in ranked[:top]]
    print_table(f"{title} ({'kernels' if cuda else 'CPU ops'}: {count:.0f} calls, {total:.0f} us a step)",
                ["kernel" if cuda else "op", "calls", "us", "%", "fastest call us", "slowest call us"], rows)
    return total


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Prints and returns a Markdown table (paste-able into bench/RESULTS.md)."""
    # Ratios (small floats) keep two decimals: a 1.05x target must be readable.
    fmt = lambda v: (f"{v:.2f}" if abs(v) < 10 else f"{v:.1f}") if isinstance(v, float) else ("—" if v is None else str(v))
    lines = [f"### {title}", "", f"_{environment()}_", ""]
    lines.append("| " + " | ".join(headers) + " |")
    lines.append("|" + "|".join("---" for _ in headers) + "|")
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    return text


def _provider(series_name: str) -> str:
    """'flex fwd+bwd' -> 'flex': the provider a plotted series belongs to."""
    for suffix in (" fwd+bwd", " fwd"):
        if series_name.endswith(suffix):
            return series_name[: -len(suffix)]
    return series_name


def plot(path: str, title: str, x_label: str, y_label: str, x: Sequence[float], series: dict[str, Sequence[float | None]]) -> None:
    """Line plot of several providers over one swept size, written as PNG under bench/plots/."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # One colour per provider, its forward solid and its forward+backward dashed, so that
    # a dozen series stay tellable apart; the legend beside the axes, not over the lines.
    providers = list(dict.fromkeys(_provider(name) for name in series))
    colours = plt.get_cmap("tab10").colors
    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    for name, ys in series.items():
        pts = [(a, b) for a, b in zip(x, ys) if b is not None]
        if pts:
            colour = colours[providers.index(_provider(name)) % len(colours)]
            style = "--" if name.endswith("fwd+bwd") else "-"
            ax.plot(*zip(*pts), marker="o", linestyle=style, color=colour, label=name)
    ax.set(title=title, xlabel=x_label, ylabel=y_label)
    ax.set_xscale("log", base=2)
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot written to {path}")

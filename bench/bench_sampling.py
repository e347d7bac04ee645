"""Drawing the next token from GPT-2-sized logits: kernels.sample against torch's ops.

    python -m bench.bench_sampling            # CUDA: microseconds per draw
    python -m bench.bench_sampling --smoke    # CPU (interpreter): checks the script runs

Logits (B, 50257) in bf16, N(0, 2^2) like a trained model's spread. Columns:
  kernels.sample       our kernels (4 launches, 2 without top-k), device time (CUDA-graph replay)
  torch, graph         gpt.generate.sample_next's ops (topk, softmax, multinomial), device time
  torch, launched      the same launched from Python, as generation ran it before: host
                       time included, which is what a batch-1 decode step pays
  torch.compile        the same through torch.compile, launched
The torch columns leave out sample_next's NaN check (torch_draw), a host sync that
kernels.sample does not make.
"""
from __future__ import annotations

import argparse
import os
import sys

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from bench.common import bench, bench_graph, compile_static, print_table  # noqa: E402
from gpt.generate import filter_logits  # noqa: E402
from kernels import sample  # noqa: E402


def torch_draw(logits: torch.Tensor, temperature: float, top_k: int | None) -> torch.Tensor:
    """gpt.generate.sample_next's draw without its NaN check, whose host sync broke the
    torch.compile peer's graph in two around it, and which a CUDA-graph capture cannot hold."""
    return torch.multinomial(torch.softmax(filter_logits(logits.float() / temperature, top_k), dim=-1), 1)


def run(batch_sizes: list[int], V: int, top_ks: list[int | None], dtype: torch.dtype, device: str, compile: bool) -> None:
    # A static graph per (B, top_k), as the peer runs at its best: left dynamic, B and k
    # turned symbolic after the first recompiles.
    compiled = compile_static(torch_draw) if compile else None
    rows = []
    for B in batch_sizes:
        logits = (torch.randn(B, V, device=device) * 2).to(dtype)
        seed = torch.tensor([1], device=device)
        offsets = torch.zeros(B, dtype=torch.long, device=device)
        out = torch.empty(B, 1, dtype=torch.long, device=device)
        for k in top_ks:
            # Never time a wrong draw: each row's token among its k largest logits (by value,
            # as bf16 logits tie), a valid id without top-k.
            sample(logits, seed, offsets, 1.0, k, out=out)
            floor = torch.topk(logits, k, dim=-1).values[:, -1:] if k else logits.new_full((B, 1), float("-inf"))
            assert bool(((out >= 0) & (out < V)).all()) and bool((logits.gather(-1, out) >= floor).all()), (
                f"kernels.sample at B={B}, top_k={k}: drew a token outside the top k")
            times = {}
            candidates = {
                "kernels.sample": lambda: bench_graph(lambda: sample(logits, seed, offsets, 1.0, k, out=out)),
                "torch, graph": lambda: bench_graph(lambda: torch_draw(logits, 1.0, k)),
                "torch, launched": lambda: bench(lambda: torch_draw(logits, 1.0, k)),
                "torch.compile": lambda: bench(lambda: compiled(logits, 1.0, k)) if compiled else None,
            }
            for name, timing in candidates.items():
                try:
                    ms = timing()
                    times[name] = None if ms is None else ms * 1e3
                except Exception as e:  # a peer that cannot run here is reported, not fatal
                    print(f"B={B} top_k={k} {name}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:100]})")
                    times[name] = None
            ours = times["kernels.sample"]
            best_torch = min((t for n, t in times.items() if n != "kernels.sample" and t), default=None)
            rows.append([B, k or "all", *times.values(), f"{best_torch / ours:.1f}x" if ours and best_torch else None])
    print_table(
        f"sampling one token, (B, {V}) {str(dtype).removeprefix('torch.')} logits, us per draw",
        ["batch", "top_k", "kernels.sample", "torch, graph", "torch, launched", "torch.compile", "best torch / ours"],
        rows,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU in the Triton interpreter")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile column")
    args = p.parse_args()
    if args.smoke:
        run([1, 2], 300, [None, 20], torch.float32, "cpu", compile=False)
        return
    if not torch.cuda.is_available():
        p.exit(1, "bench_sampling: no CUDA GPU; use --smoke to check the script on CPU\n")
    run([1, 8, 32, 128], 50257, [None, 50, 200], torch.bfloat16, "cuda", compile=not args.no_compile)


if __name__ == "__main__":
    main()

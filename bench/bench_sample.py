"""Generation throughput: tokens/s and time to first token, like gpt-fast's generate.py.

    python -m bench.bench_sample                          # 124M, batch 1 and 32 on CUDA
    python -m bench.bench_sample --preset tiny --batch-sizes 1 --prompt-tokens 32 --new-tokens 96   # a CPU run
    python -m bench.bench_sample --profile                # where a decode step's time goes

Random weights (throughput barely depends on them: only the top-k draw's candidate count
does). Rows:
  - our fast path: KV cache + CUDA graph, top-k sampling on kernels.sample in the graph;
  - the same drawing with torch's ops outside the graph (the fast path before it);
  - the same with top-p 0.9 (the nucleus kept with torch's ops inside the draw's graph);
  - the same with the decode FFN's GELU moved in or out of cuBLAS's epilogue
    (gpt/ops.py GELU_EPILOGUE);
  - the same with the FFN on our Triton kernel instead of cuBLAS (gpt/ops.py AUTO_TRITON_FFN, FFN_MIN_ROWS);
  - torch.compile(mode="reduce-overhead") of the decode step on the torch reference ops
    (Inductor writes its own kernels);
  - our plain KV-cache path, eager;
  - the no-cache loop nanoGPT's generate() uses;
  - Hugging Face transformers' GPT-2 generate(), when it is installed.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

from bench.common import print_table, profile_table
from gpt import GPT, ops, preset
from gpt.generate import Decoder, generate, generate_uncached
from kernels import reference
from train import DTYPES


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def run_ours(model, prompts, new_tokens, device, cuda_graph=False, compile=False, torch_sampling=False,
             top_p=None) -> tuple[float, float]:
    decoder = Decoder(model, len(prompts), cuda_graph=cuda_graph, compile=compile)
    if torch_sampling:  # draw with torch's ops outside the graph, as before kernels.sample
        decoder.sampler = reference
    go = lambda n: generate(model, prompts, n, temperature=1.0, top_k=200, top_p=top_p, decoder=decoder, check_every=64)
    go(8)  # warm-up (compilation, graph capture, allocator)
    ttft = timed(lambda: go(1), device)
    return ttft, timed(lambda: go(new_tokens), device)


def with_triton_ffn(fn):
    """Runs fn with the decode step's FFN on the Triton kernel (16-row tiles, bias and GELU
    fused) instead of cuBLAS, where gpt/ops.py's AUTO_TRITON_FFN and FFN_MIN_ROWS send it:
    the end-to-end side of what `bench_ffn --few-rows` measures per call. FFN_MIN_ROWS alone
    does nothing while AUTO_TRITON_FFN is off: the row then timed cuBLAS again."""
    saved = ops.AUTO_TRITON_FFN, ops.FFN_MIN_ROWS
    ops.AUTO_TRITON_FFN, ops.FFN_MIN_ROWS = True, 0
    try:
        return fn()
    finally:
        ops.AUTO_TRITON_FFN, ops.FFN_MIN_ROWS = saved


def with_gelu_epilogue(fn):
    """Runs fn with the decode FFN's GELU folded into cuBLAS's matmul epilogue
    (gpt/ops.py GELU_EPILOGUE): the candidate for that switch's default."""
    saved, ops.GELU_EPILOGUE = ops.GELU_EPILOGUE, not ops.GELU_EPILOGUE
    try:
        return fn()
    finally:
        ops.GELU_EPILOGUE = saved


def run_uncached(model, prompts, new_tokens, device) -> tuple[float, float]:
    idx = torch.tensor(prompts, device=device)
    generate_uncached(model, idx, 2)
    ttft = timed(lambda: generate_uncached(model, idx, 1, top_k=200), device)
    return ttft, timed(lambda: generate_uncached(model, idx, new_tokens, top_k=200), device)


def run_hf(cfg, prompts, new_tokens, device, dtype) -> tuple[float, float]:
    if len(prompts[0]) + new_tokens > cfg.block_size:
        raise ValueError(f"generate has no sliding window: the {len(prompts[0])}-token prompt and {new_tokens} new tokens "
                         f"pass the context of {cfg.block_size}")
    from transformers import GPT2Config, GPT2LMHeadModel

    hf = GPT2LMHeadModel(GPT2Config(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, n_positions=cfg.block_size,
                                    vocab_size=cfg.vocab_size)).to(device=device, dtype=dtype).eval()
    idx = torch.tensor(prompts, device=device)
    go = lambda n: hf.generate(idx, max_new_tokens=n, min_new_tokens=n, do_sample=True, top_k=200, pad_token_id=0)
    with torch.no_grad():
        go(2)
        return timed(lambda: go(1), device), timed(lambda: go(new_tokens), device)


PROFILE_STEPS = 20


@torch.no_grad()  # as generate(): the decode FFN's GELU epilogue applies at inference only
def profile_decode(model, B: int, prompt_tokens: int, steps: int, device: str) -> None:
    """Per-kernel device time of a decode step plus its sampling (eager, so that every kernel
    is seen), against the CUDA-graph replay of the same step: the kernels to fuse first,
    and how much of a replayed step is gaps between kernels rather than kernels."""
    prompts = torch.randint(0, model.config.vocab_size, (B, prompt_tokens)).tolist()
    decoder = Decoder(model, B)
    decoder.reseed()
    decoder.prefill(prompts)

    def token() -> None:
        decoder.draw(1.0, 200)
        decoder.step()

    for _ in range(3):  # warm-up: compilation, allocator
        token()
    total = profile_table(f"decode step + sampling, batch {B}, per token", token, steps)
    if device == "cuda":
        graphed = Decoder(model, B, cuda_graph=True)
        graphed.reseed()
        graphed.prefill(prompts)
        step = lambda: (graphed.draw(1.0, 200), graphed.step())
        for _ in range(3):
            step()
        seconds = timed(lambda: [step() for _ in range(steps)], device)
        print(f"batch {B}: CUDA-graph decode step with its draw {seconds / steps * 1e6:.0f} us; "
              f"its kernels above sum to {total:.0f} us")


def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpt2")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32] if cuda else [1])
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=512)
    p.add_argument("--dtype", default="bf16" if cuda else "fp32", choices=sorted(DTYPES))
    p.add_argument("--skip", nargs="*", default=[], help="rows to leave out: fast fast-torch-sampling fast-top-p fast-gelu fast-ffn compile cached uncached hf")
    p.add_argument("--profile", action="store_true", help="per-kernel time of a decode step instead of the table")
    args = p.parse_args()
    device = "cuda" if cuda else "cpu"
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    cfg = preset(args.preset).updated(vocab_size=50257)
    model = GPT(cfg).to(device=device, dtype=dtype).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if args.profile:
        if args.prompt_tokens + PROFILE_STEPS + 3 > cfg.block_size:  # 3 warm-up steps
            p.error(f"--profile decodes {PROFILE_STEPS + 3} tokens after the prompt: --prompt-tokens must be at most "
                    f"{cfg.block_size - PROFILE_STEPS - 3} for the {args.preset} preset's block size {cfg.block_size}")
        for B in args.batch_sizes:
            profile_decode(model, B, args.prompt_tokens, PROFILE_STEPS, device)
        return

    rows = []
    for B in args.batch_sizes:
        prompts = torch.randint(0, cfg.vocab_size, (B, args.prompt_tokens)).tolist()
        runs = {
            "ours: KV cache + CUDA graph": lambda: run_ours(model, prompts, args.new_tokens, device, cuda_graph=True),
            "ours: KV cache + CUDA graph, torch sampling": lambda: run_ours(
                model, prompts, args.new_tokens, device, cuda_graph=True, torch_sampling=True
            ),
            "ours: KV cache + CUDA graph, top-p 0.9": lambda: run_ours(
                model, prompts, args.new_tokens, device, cuda_graph=True, top_p=0.9
            ),
            f"ours: KV cache + CUDA graph, GELU epilogue {'off' if ops.GELU_EPILOGUE else 'on'}": lambda: with_gelu_epilogue(
                lambda: run_ours(model, prompts, args.new_tokens, device, cuda_graph=True)
            ),
            "ours: KV cache + CUDA graph, FFN on Triton": lambda: with_triton_ffn(
                lambda: run_ours(model, prompts, args.new_tokens, device, cuda_graph=True)
            ),
            "ours: KV cache + torch.compile": lambda: run_ours(
                copy.deepcopy(model).set_kernels("torch"), prompts, args.new_tokens, device, compile=True
            ),
            "ours: KV cache": lambda: run_ours(model, prompts, args.new_tokens, device),
            "no cache (nanoGPT-style loop)": lambda: run_uncached(model, prompts, args.new_tokens, device),
            "HF transformers generate": lambda: run_hf(cfg, prompts, args.new_tokens, device, dtype),
        }
        keys = dict(zip(runs, ["fast", "fast-torch-sampling", "fast-top-p", "fast-gelu", "fast-ffn", "compile", "cached", "uncached", "hf"]))
        baseline = None
        for name, fn in runs.items():
            if keys[name] in args.skip or (not cuda and keys[name].startswith("fast")):
                continue
            try:
                ttft, total = fn()
            except Exception as e:  # a missing or failing peer is reported, not fatal
                print(f"{name} (batch {B}): skipped ({type(e).__name__}: {str(e).splitlines()[0][:100]})")
                continue
            tok_s = B * args.new_tokens / total
            baseline = baseline if keys[name] != "uncached" else tok_s
            gbs = weight_bytes * args.new_tokens / total / 1e9  # weights read once per step
            rows.append([B, name, f"{tok_s:,.0f}" if tok_s >= 100 else f"{tok_s:.1f}", ttft * 1e3, f"{gbs:,.0f}", tok_s])
            print(f"batch {B}, {name}: {tok_s:,.0f} tokens/s, first token {ttft * 1e3:.1f} ms", flush=True)
        for r in rows:  # the last column holds the exact tokens/s until now
            if r[0] == B:
                r[5] = f"{r[5] / baseline:.1f}x" if baseline else None
    print_table(
        f"generation, preset {args.preset} ({model.num_params() / 1e6:.0f}M), {args.prompt_tokens}-token prompt, "
        f"{args.new_tokens} new tokens, {args.dtype}",
        ["batch", "implementation", "tokens/s", "first token ms", "weight GB/s", "vs no cache"],
        rows,
    )
    if cuda:
        print(f"peak memory {torch.cuda.max_memory_allocated() / 1e9:.2f} GB")


if __name__ == "__main__":
    main()

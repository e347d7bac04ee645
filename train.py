"""Train a GPT on a text corpus (a file, a folder, or the embedded default), on CPU or GPU.

    python train.py                                   # tiny model on the stdlib's source
    python train.py --data input.txt --preset shakespeare-char
    python train.py --out-dir out --resume            # continue from out/ckpt.pt
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import math
import os
import platform
import sys
import time
from dataclasses import dataclass

import torch

from gpt import GPT, GPTConfig, preset
from gpt import checkpoint
from gpt.config import PRESETS
from gpt.data import DEFAULT_CACHE, CorpusError, Dataset, load_dataset
from gpt.tokenizer import TOKENIZERS

# Dense peak throughput (FLOP/s) for MFU, by device-name fragment and dtype.
PEAK_FLOPS = {
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 495e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 495e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 156e12},
    "4090": {"bf16": 165e12, "fp16": 165e12, "fp32": 82e12},
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data and output")
    g.add_argument("--data", default=None, help="text file or folder of text files (default: the Python stdlib's source)")
    g.add_argument("--tokenizer", default="char", choices=TOKENIZERS, help="char: vocabulary from the corpus; byte: 256 bytes; gpt2: GPT-2 BPE")
    g.add_argument("--out-dir", default="out", help="where ckpt.pt, metrics.csv and loss.png go")
    g.add_argument("--cache-dir", default=DEFAULT_CACHE, help="where tokenized corpora are cached")
    g.add_argument("--resume", action="store_true", help="continue from <out-dir>/ckpt.pt")
    g = p.add_argument_group("model (a preset, optionally overridden)")
    g.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="architecture preset (default: tiny)")
    for flag in ("n-layer", "n-head", "n-embd", "block-size"):
        g.add_argument(f"--{flag}", type=int, default=None)
    g.add_argument("--dropout", type=float, default=None)
    g.add_argument("--pos-embedding", choices=("learned", "sinusoidal"), default=None)
    g.add_argument("--no-bias", action="store_true", help="no biases in Linear and LayerNorm layers")
    g.add_argument("--kernels", choices=("auto", "triton", "torch"), default="auto", help="auto: Triton on CUDA, torch elsewhere")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=32, help="sequences per micro-batch")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    g.add_argument("--min-lr", type=float, default=None, help="final learning rate (default: lr / 10)")
    g.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    g.add_argument("--max-steps", type=int, default=5000, help="optimizer steps; the cosine schedule ends here")
    g.add_argument("--max-time", type=float, default=0, help="stop after this many seconds (0: no limit); the schedule then also decays by time")
    g.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (matrices only)")
    g.add_argument("--beta2", type=float, default=0.99)
    g.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm (0: off)")
    g = p.add_argument_group("evaluation and logging")
    g.add_argument("--eval-interval", type=int, default=250, help="steps between validation runs and checkpoints")
    g.add_argument("--eval-iters", type=int, default=20, help="batches per loss estimate")
    g.add_argument("--log-interval", type=int, default=10, help="steps between progress lines")
    g = p.add_argument_group("system")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    g.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bf16 on CUDA that supports it, else fp32")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--seed", type=int, default=1337)
    return p.parse_args(argv)


class UsageError(ValueError):
    """A bad flag or flag combination; reported as one line before any work starts."""


def pick_device(name: str) -> str:
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    return name


def check_args(args: argparse.Namespace) -> None:
    for name in ("batch_size", "grad_accum", "max_steps", "eval_interval", "eval_iters", "log_interval"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.lr <= 0 or args.warmup < 0 or args.max_time < 0 or args.grad_clip < 0 or args.weight_decay < 0:
        raise UsageError("--lr must be positive and --warmup, --max-time, --grad-clip, --weight-decay non-negative")


def model_config(args: argparse.Namespace, vocab_size: int) -> GPTConfig:
    try:
        return preset(args.preset).updated(
            vocab_size=vocab_size,
            n_layer=args.n_layer,
            n_head=args.n_head,
            n_embd=args.n_embd,
            block_size=args.block_size,
            dropout=args.dropout,
            pos_embedding=args.pos_embedding,
            bias=False if args.no_bias else None,
            kernels=args.kernels,
        )
    except ValueError as e:
        raise UsageError(str(e)) from None


def make_optimizer(model: GPT, args: argparse.Namespace, device: str) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (Linear and embedding weights) only."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, args.beta2), fused=device == "cuda")


def learning_rate(step: int, elapsed: float, args: argparse.Namespace) -> float:
    """Linear warm-up, then cosine decay to min_lr by max_steps (or max_time, whichever comes first)."""
    min_lr = args.lr / 10 if args.min_lr is None else args.min_lr
    if step < args.warmup:
        return args.lr * (step + 1) / (args.warmup + 1)
    progress = (step - args.warmup) / max(1, args.max_steps - args.warmup)
    if args.max_time:
        progress = max(progress, elapsed / args.max_time)
    progress = min(1.0, progress)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (args.lr - min_lr)


@torch.no_grad()
def estimate_loss(model: GPT, data: Dataset, args: argparse.Namespace, device: str, autocast) -> dict[str, float]:
    """Mean loss over eval_iters batches per split, drawn from a fixed seed so evals compare."""
    model.eval()
    gen = torch.Generator().manual_seed(args.seed + 1)
    out = {}
    for split in ("train", "val"):
        losses = []
        for _ in range(args.eval_iters):
            x, y = data.batch(split, args.batch_size, model.config.block_size, gen)
            with autocast:
                losses.append(model(x.to(device), y.to(device))[1].item())
        out[split] = sum(losses) / len(losses)
    model.train()
    return out


def peak_flops(device: str, dtype: str) -> float | None:
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((v[dtype] for k, v in PEAK_FLOPS.items() if k in name), None)


def fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


@dataclass
class Metrics:
    """metrics.csv rows and the loss-curve PNG beside it."""

    out_dir: str
    fields = ("step", "train_loss", "val_loss", "lr", "tokens_per_s", "elapsed_s")

    def append(self, **row) -> None:
        path = os.path.join(self.out_dir, "metrics.csv")
        new = not os.path.exists(path)
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.fields)
            if new:
                w.writeheader()
            w.writerow({k: row.get(k, "") for k in self.fields})

    def plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        with open(os.path.join(self.out_dir, "metrics.csv")) as f:
            rows = list(csv.DictReader(f))
        fig, ax = plt.subplots(figsize=(7, 4))
        for key, style in (("train_loss", "-"), ("val_loss", "o-")):
            pts = [(int(r["step"]), float(r[key])) for r in rows if r[key]]
            if pts:
                ax.plot(*zip(*pts), style, label=key.replace("_", " "), markersize=3)
        ax.set(xlabel="step", ylabel="loss", title="training loss")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(self.out_dir, "loss.png"), dpi=100)
        plt.close(fig)


def train(args: argparse.Namespace) -> dict:
    """Runs training; returns the final state (step, losses) for callers and tests."""
    check_args(args)
    device = pick_device(args.device)
    dtype = args.dtype or ("bf16" if device == "cuda" and torch.cuda.is_bf16_supported() else "fp32")
    torch.manual_seed(args.seed)
    ckpt_path = os.path.join(args.out_dir, checkpoint.CKPT_NAME)
    resumed = checkpoint.load(ckpt_path) if args.resume else None

    data = load_dataset(args.data, resumed["tokenizer"]["name"] if resumed else args.tokenizer, args.cache_dir)
    if resumed:
        config = GPTConfig.from_dict(resumed["config"])
        if data.tokenizer.state_dict() != resumed["tokenizer"]:
            raise UsageError(f"the corpus gives a different vocabulary than {ckpt_path} was trained on; resume with the same --data")
    else:
        config = model_config(args, data.tokenizer.vocab_size)
    data.check_block_size(config.block_size)

    model = GPT(config).to(device)
    optimizer = make_optimizer(model, args, device)
    step, best_val, elapsed = 0, float("inf"), 0.0
    data_gen = torch.Generator().manual_seed(args.seed)
    if resumed:
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        step, best_val, elapsed = resumed["step"], resumed["best_val_loss"], resumed["elapsed"]
        checkpoint.set_rng_state(resumed["rng"], data_gen)
    scaler = torch.amp.GradScaler(device, enabled=dtype == "fp16")
    autocast = (
        torch.autocast(device, dtype=DTYPES[dtype]) if dtype != "fp32" else contextlib.nullcontext()
    )
    fwd = torch.compile(model) if args.compile else model

    os.makedirs(args.out_dir, exist_ok=True)
    metrics = Metrics(args.out_dir)
    tokens_per_step = args.batch_size * args.grad_accum * config.block_size
    peak = peak_flops(device, dtype)
    print(f"python {platform.python_version()} | torch {torch.__version__} | device {device}"
          + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else "") + f" | dtype {dtype}")
    print(f"data: {data.description}: {len(data.train):,} train / {len(data.val):,} val tokens, "
          f"{data.tokenizer.name} tokenizer, vocab {config.vocab_size}")
    print(f"model: {model.num_params() / 1e6:.2f}M parameters, {config}")
    print(f"training: {vars(args)}")
    if resumed:
        print(f"resuming from {ckpt_path} at step {step}")

    def save() -> None:
        checkpoint.save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "config": config.to_dict(),
                "tokenizer": data.tokenizer.state_dict(),
                "step": step,
                "best_val_loss": best_val,
                "elapsed": elapsed,
                "rng": checkpoint.rng_state(data_gen),
                "args": {k: v for k, v in vars(args).items()},
            },
            ckpt_path,
        )

    model.train()
    losses = {}
    t_start, t_log, loss_sum, loss_count = time.time() - elapsed, time.time(), 0.0, 0
    while step < args.max_steps and not (args.max_time and elapsed >= args.max_time):
        lr = learning_rate(step, elapsed, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for _ in range(args.grad_accum):
            x, y = data.batch("train", args.batch_size, config.block_size, data_gen)
            with autocast:
                _, loss = fwd(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
            scaler.scale(loss / args.grad_accum).backward()
            loss_sum += loss.item()
            loss_count += 1
        if args.grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        elapsed = time.time() - t_start

        if step % args.log_interval == 0 or step == 1:
            dt = time.time() - t_log
            n_steps = args.log_interval if step > 1 else 1
            tok_s = n_steps * tokens_per_step / dt
            left = (args.max_steps - step) * dt / n_steps
            if args.max_time:
                left = min(left, args.max_time - elapsed)
            mfu = f" | mfu {model.flops_per_token() * tok_s / peak:.1%}" if peak else ""
            train_loss = loss_sum / loss_count
            print(f"step {step}/{args.max_steps} | loss {train_loss:.4f} | lr {lr:.2e} | "
                  f"{tok_s:,.0f} tok/s{mfu} | eta {fmt_time(max(0.0, left))}", flush=True)
            metrics.append(step=step, train_loss=f"{train_loss:.4f}", lr=f"{lr:.3e}", tokens_per_s=f"{tok_s:.0f}", elapsed_s=f"{elapsed:.1f}")
            t_log, loss_sum, loss_count = time.time(), 0.0, 0

        done = step >= args.max_steps or (args.max_time and elapsed >= args.max_time)
        if step % args.eval_interval == 0 or done:
            losses = estimate_loss(fwd, data, args, device, autocast)
            print(f"eval step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}", flush=True)
            metrics.append(step=step, train_loss=f"{losses['train']:.4f}", val_loss=f"{losses['val']:.4f}", elapsed_s=f"{elapsed:.1f}")
            metrics.plot()
            # Keep the best model; the last one is saved too so a finished run can be resumed.
            if losses["val"] < best_val or done:
                best_val = min(best_val, losses["val"])
                save()
                print(f"saved {ckpt_path}")
            t_log = time.time()
    return {"step": step, "best_val_loss": best_val, **losses}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        train(args)
    except (UsageError, CorpusError, checkpoint.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

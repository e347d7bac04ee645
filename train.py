"""Train a GPT on a text corpus (a file, a folder, or by default the Python stdlib's source), on CPU or GPU.

    python train.py                                   # tiny model on the stdlib's source
    python train.py --data input.txt --preset shakespeare-char
    python train.py --out-dir out --resume            # continue from out/ckpt.pt
    torchrun --nproc_per_node 8 train.py --preset gpt2 --tokenizer gpt2 --data corpus/

Ctrl-C (or SIGTERM, or the reader of stdout going away) finishes the current step, saves
<out-dir>/ckpt.pt and exits; a second signal quits at once. Checkpoints are written
atomically. --resume goes on with the run's own settings unless given others.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import math
import os
import platform
import shlex
import signal
import sys
import time

import torch

from gpt import GPT, GPTConfig, checkpoint, distributed, ops
from gpt.cli import ArgumentParser, Console, out_of_memory
from gpt.config import PRESETS, preset
from gpt.data import DEFAULT_CACHE, CorpusError, Dataset, load_dataset
from gpt.hf import HFError, load_any
from gpt.metrics import Metrics
from gpt.tokenizer import TOKENIZERS, TokenizerError
from kernels._utils import TRITON_MISSING, interpreting

# Dense peak throughput (FLOP/s) per GPU for MFU, by device-name fragment and dtype; the first
# fragment found in the name wins, so the NVL H200 and the PCIe and NVL H100s precede the SXM
# parts (the H200 NVL has the H100 NVL's tensor cores and clocks). fp32 is the CUDA cores'
# rate, not TF32's: training leaves TF32 off (torch's default) and the kernels ask for IEEE fp32.
PEAK_FLOPS = {
    "H200 NVL": {"bf16": 835e12, "fp16": 835e12, "fp32": 60e12},
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "H100 PCIe": {"bf16": 756e12, "fp16": 756e12, "fp32": 51e12},
    "H100 NVL": {"bf16": 835e12, "fp16": 835e12, "fp32": 60e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12},
    "4090": {"bf16": 165e12, "fp16": 165e12, "fp32": 82e12},
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ARCH_FLAGS = ("n_layer", "n_head", "n_embd", "block_size", "pos_embedding")
# What --resume takes from the checkpoint unless given: the schedule, batches and numerics
# of the run, so that it goes on as it started (the architecture comes with the weights).
RUN_FLAGS = ("batch_size", "grad_accum", "lr", "min_lr", "warmup", "max_steps", "decay_steps", "max_time",
             "weight_decay", "beta2", "grad_clip", "max_skips", "eval_interval", "eval_iters", "save_interval",
             "log_interval", "dtype", "seed")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data and output")
    g.add_argument("--data", default=None, help="text file or folder of text files (default: the Python stdlib's source)")
    g.add_argument("--tokenizer", default=None, choices=TOKENIZERS, help="char (the default): vocabulary from the corpus; byte: 256 bytes; gpt2: GPT-2 BPE. "
                   "With --resume or --init-from the weights' own")
    g.add_argument("--out-dir", default="out", help="where ckpt.pt, best.pt, metrics.csv and loss.png go")
    g.add_argument("--cache-dir", default=DEFAULT_CACHE, help="where tokenized corpora are cached")
    g.add_argument("--resume", action="store_true", help="continue from <out-dir>/ckpt.pt with the run's own --data, schedule, batch size, dtype and seed, unless given")
    g.add_argument("--overwrite", action="store_true", help="start afresh in an --out-dir that holds a checkpoint, replacing it")
    g.add_argument("--init-from", default=None, metavar="PATH",
                   help="fine-tune from a Hugging Face GPT-2 directory, a safetensors export, or a checkpoint of ours or nanoGPT's")
    g = p.add_argument_group("model (a preset, optionally overridden)")
    g.add_argument("--preset", default=None, choices=sorted(PRESETS), help="architecture preset (default: tiny)")
    for flag in ("n-layer", "n-head", "n-embd", "block-size"):
        g.add_argument(f"--{flag}", type=int, default=None)
    g.add_argument("--dropout", type=float, default=None)
    g.add_argument("--pos-embedding", choices=("learned", "sinusoidal"), default=None)
    g.add_argument("--no-bias", action="store_true", help="no biases in Linear and LayerNorm layers")
    g.add_argument("--kernels", choices=("auto", "triton", "torch"), default="auto", help="auto: on CUDA the faster of Triton and torch per op, torch for models narrower than 768 (gpt/ops.py), torch elsewhere; triton: Triton everywhere")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=32, help="sequences per micro-batch (per process)")
    g.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches per optimizer step, per process (unlike nanoGPT's, not divided by the world size)")
    g.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    g.add_argument("--min-lr", type=float, default=None, help="final learning rate (default: lr / 10)")
    g.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    g.add_argument("--max-steps", type=int, default=5000, help="optimizer steps to run")
    g.add_argument("--decay-steps", type=int, default=None, help="where the cosine schedule reaches --min-lr (default: --max-steps)")
    g.add_argument("--max-time", type=float, default=0, help="stop after this many seconds (0: no limit); the schedule then also decays by time")
    g.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (matrices only)")
    g.add_argument("--beta2", type=float, default=0.99)
    g.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm (0: off)")
    g.add_argument("--max-skips", type=int, default=10, help="stop after this many non-finite steps in a row")
    g = p.add_argument_group("evaluation, checkpoints and logging")
    g.add_argument("--eval-interval", type=int, default=250, help="steps between validation runs (each saves ckpt.pt, and best.pt when val improves)")
    g.add_argument("--eval-iters", type=int, default=20, help="batches per loss estimate")
    g.add_argument("--save-interval", type=int, default=0, help="also save ckpt.pt every this many steps (0: at evals only)")
    g.add_argument("--log-interval", type=int, default=10, help="steps between progress lines")
    g = p.add_argument_group("system")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    g.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bf16 on CUDA that supports it, else fp32")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--fsdp", action="store_true", help="shard parameters, gradients and optimizer state with FSDP2 (under torchrun)")
    g.add_argument("--seed", type=int, default=1337)
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    # The flags given, as --resume takes the others from the run's checkpoint.
    for action in p._actions:
        action.default = argparse.SUPPRESS
    args.given = set(vars(p.parse_args(argv)))
    return args


class UsageError(ValueError):
    """A bad flag or flag combination; reported as one line before any work starts."""


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss keeps diverging); the message says what to change."""


def pick_device(name: str) -> str:
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps was asked for but this torch build has no usable MPS device; use --device cpu")
    return name


def check_args(args: argparse.Namespace) -> None:
    positive = ("batch_size", "grad_accum", "max_steps", "eval_interval", "eval_iters", "log_interval", "max_skips",
                "n_layer", "n_head", "n_embd", "block_size", "decay_steps")
    for name in positive:
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {value}")
    for name in ("warmup", "max_time", "grad_clip", "weight_decay", "save_interval"):
        if not 0 <= getattr(args, name) < math.inf:
            raise UsageError(f"--{name.replace('_', '-')} must be a non-negative number, got {getattr(args, name)}")
    if not 0 <= args.seed < 2**63:
        raise UsageError(f"--seed must be in [0, 2^63), got {args.seed}")
    if not 0 < args.lr < math.inf or (args.min_lr is not None and not 0 <= args.min_lr <= args.lr):
        raise UsageError("--lr must be positive and --min-lr between 0 and --lr")
    if args.dropout is not None and not 0 <= args.dropout < 1:
        raise UsageError(f"--dropout must be in [0, 1), got {args.dropout}")
    if not 0 <= args.beta2 < 1:
        raise UsageError(f"--beta2 must be in [0, 1), got {args.beta2}")
    if args.data is not None and not args.data.strip():
        raise UsageError("--data is empty; pass a text file or a folder, or leave it out for the default corpus")
    for flag, path in (("--out-dir", args.out_dir), ("--cache-dir", args.cache_dir)):
        if os.path.exists(path) and not os.path.isdir(path):
            raise UsageError(f"{flag} {path} is a file, not a folder; pass a folder path")
    if args.fsdp and not distributed.has_fsdp2():
        raise UsageError(f"--fsdp needs FSDP2 (torch.distributed.fsdp.fully_shard, torch 2.6 or newer) and this is "
                         f"torch {torch.__version__}; upgrade torch, or drop --fsdp for DDP")
    if args.fsdp and "RANK" not in os.environ:
        raise UsageError("--fsdp shards the model across torchrun's processes; launch with "
                         "torchrun --nproc-per-node N train.py ... or drop --fsdp")
    if args.decay_steps is not None and args.decay_steps <= args.warmup:
        raise UsageError(f"--decay-steps {args.decay_steps} must be past --warmup {args.warmup:g}: the cosine "
                         f"decays from the end of warm-up to step --decay-steps")
    if args.resume and args.init_from:
        raise UsageError("--resume continues a run and --init-from starts one from other weights; pass one of them")
    if args.resume and args.overwrite:
        raise UsageError("--resume continues the checkpoint in --out-dir and --overwrite replaces it; pass one of them")


def model_config(args: argparse.Namespace, vocab_size: int) -> GPTConfig:
    try:
        return preset(args.preset or "tiny").updated(
            vocab_size=vocab_size,
            **{k: getattr(args, k) for k in ARCH_FLAGS},
            dropout=args.dropout,
            bias=False if args.no_bias else None,
            kernels=args.kernels,
        )
    except ValueError as e:
        raise UsageError(str(e)) from None


def resumed_config(args: argparse.Namespace, saved: dict, path: str) -> GPTConfig:
    """The checkpoint's architecture; flags asking for a different one are refused."""
    config = GPTConfig.from_dict(saved)
    asked = {k: getattr(args, k) for k in ARCH_FLAGS if getattr(args, k) is not None}
    if args.preset:
        p = preset(args.preset)
        asked = {**{k: getattr(p, k) for k in ARCH_FLAGS}, **asked}
    if args.no_bias:
        asked["bias"] = False
    for key, value in asked.items():
        if getattr(config, key) != value:
            hint = " (the position table has no rows past it)" if key == "block_size" else ""
            raise UsageError(
                f"--resume: {path} was trained with {key}={getattr(config, key)}, not {value}{hint}; "
                f"drop the flag or start a new --out-dir"
            )
    return config.updated(kernels=args.kernels, dropout=args.dropout)


def pretrained(args: argparse.Namespace) -> tuple[GPT, dict]:
    """The --init-from model (block_size cropped if asked) and its tokenizer state."""
    if args.preset:
        raise UsageError(f"--init-from {args.init_from} fixes the architecture; drop --preset {args.preset}")
    model, tokenizer = load_any(args.init_from, kernels=args.kernels)
    config = model.config
    for key in ("n_layer", "n_head", "n_embd", "pos_embedding"):
        if getattr(args, key) is not None and getattr(args, key) != getattr(config, key):
            raise UsageError(f"--init-from: {args.init_from} has {key}={getattr(config, key)}, not {getattr(args, key)}")
    if args.no_bias and config.bias:
        raise UsageError(f"--init-from: {args.init_from} has biases; drop --no-bias")
    if args.block_size and args.block_size > config.block_size:
        raise UsageError(f"--init-from: {args.init_from} has block_size={config.block_size}; --block-size cannot exceed it")
    new = config.updated(block_size=args.block_size, dropout=args.dropout)
    if new != config:
        state = model.state_dict()
        model = GPT(new)
        if config.pos_embedding == "learned":
            state["transformer.wpe.weight"] = state["transformer.wpe.weight"][: new.block_size]
        model.load_state_dict(state)
    return model, tokenizer.state_dict()


def make_optimizer(model: torch.nn.Module, args: argparse.Namespace, fused: bool) -> tuple[torch.optim.AdamW, list[list[str]]]:
    """AdamW with weight decay on matrices only; also returns each group's parameter names."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [(n, p) for n, p in named if p.dim() >= 2]
    no_decay = [(n, p) for n, p in named if p.dim() < 2]
    groups = [
        {"params": [p for _, p in decay], "weight_decay": args.weight_decay},
        {"params": [p for _, p in no_decay], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, args.beta2), fused=fused)
    return opt, [[n for n, _ in decay], [n for n, _ in no_decay]]


def learning_rate(step: int, elapsed: float, args: argparse.Namespace) -> float:
    """Linear warm-up, then cosine decay to min_lr by max_steps (or max_time, whichever comes first)."""
    min_lr = args.lr / 10 if args.min_lr is None else args.min_lr
    if step < args.warmup:
        return args.lr * (step + 1) / (args.warmup + 1)
    decay_steps = args.decay_steps or args.max_steps
    progress = (step - args.warmup) / max(1, decay_steps - args.warmup)
    if args.max_time:
        progress = max(progress, elapsed / args.max_time)
    progress = min(1.0, progress)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (args.lr - min_lr)


def train_batches(data: Dataset, step: int, args: argparse.Namespace, world: distributed.World, block_size: int,
                  retry: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's micro-batches for one step.

    The global batch is drawn from a generator seeded by (seed, step), so the data
    depends only on the step: resume is exact at any world size, and N processes
    see the same global batch as one process with N times the batch. A step retried
    after a non-finite one draws a fresh batch (retry > 0): the same batch would most
    likely fail the same way.
    """
    seed = (args.seed * 1_000_003 + step) % 2**64  # manual_seed takes 64 bits
    if retry:
        seed = hash((seed, retry)) & (1 << 63) - 1  # ints hash the same in every process
    gen = torch.Generator().manual_seed(seed)
    per_rank = args.batch_size * args.grad_accum
    x, y = data.batch("train", per_rank * world.size, block_size, gen)
    mine = slice(world.rank * per_rank, (world.rank + 1) * per_rank)
    return list(zip(x[mine].split(args.batch_size), y[mine].split(args.batch_size)))


@torch.no_grad()
def estimate_loss(
    model: GPT, data: Dataset, args: argparse.Namespace, device: str, autocast: contextlib.AbstractContextManager
) -> dict[str, float]:
    """Mean loss over eval_iters batches per split, drawn from a fixed seed so evals compare."""
    model.eval()
    gen = torch.Generator().manual_seed(args.seed + 1)
    out = {}
    for split in ("train", "val"):
        losses = []
        for _ in range(args.eval_iters):
            x, y = data.batch(split, args.batch_size, model.config.block_size, gen)
            with autocast:
                losses.append(model(x.to(device), y.to(device), return_logits=False)[1].item())
        out[split] = sum(losses) / len(losses)
    model.train()
    return out


def peak_flops(device: str, dtype: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    return next((v[dtype] for k, v in PEAK_FLOPS.items() if k in name), None)


def fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class StopSignal:
    """First SIGINT/SIGTERM asks for a clean stop after the current step; the second quits at once."""

    def __init__(self, log):
        self.requested: str | None = None
        self.log = log
        self.previous = {}

    def __enter__(self) -> "StopSignal":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt  # checkpoint writes are atomic: quitting mid-write is safe
        self.requested = signal.Signals(signum).name
        self.log(f"\n{self.requested} received: finishing this step and saving a checkpoint (send it again to quit at once)")


def train(args: argparse.Namespace) -> dict:
    """Runs training; returns the final state (step, losses, skipped steps) for callers and tests."""
    check_args(args)
    device = pick_device(args.device)
    if args.kernels == "triton" and TRITON_MISSING:
        raise UsageError(f"--kernels triton: {TRITON_MISSING}; or use --kernels torch")
    if args.kernels == "triton" and not device.startswith("cuda") and not interpreting():
        raise UsageError(f"--kernels triton needs a CUDA GPU, and the device is {device}; use --kernels torch "
                         f"(or set TRITON_INTERPRET=1 to run the kernels in Triton's slow interpreter)")
    world, device = distributed.init(device)
    log = Console() if world.main else (lambda *a, **k: None)
    lock = checkpoint.OutDirLock(args.out_dir)
    finished = False
    try:
        if world.main:
            note = lock.acquire()
            if note:
                log(note)
            for name in (checkpoint.CKPT_NAME, "best.pt"):
                if checkpoint.remove_partial_saves(os.path.join(args.out_dir, name)):
                    log(f"removed the partial file(s) of a {name} save that was killed mid-write")
        result = _train(args, world, device, log)
        finished = True
        return result
    finally:
        lock.release()
        # After a failure, no goodbye barrier: the other ranks may be in another collective,
        # which tearing down the group ends (they then exit with one line, see main).
        distributed.shutdown(world, clean=finished)


def _train(args: argparse.Namespace, world: distributed.World, device: str, log) -> dict:
    device_type = device.split(":")[0]
    ckpt_path = os.path.join(args.out_dir, checkpoint.CKPT_NAME)
    best_path = os.path.join(args.out_dir, "best.pt")
    held = [p for p in (ckpt_path, best_path) if os.path.exists(p)]
    if not args.resume and not args.overwrite and held:
        raise UsageError(f"{args.out_dir} already holds a checkpoint ({held[0]}); pass --resume to continue its run, "
                         f"--overwrite to start afresh and replace it, or another --out-dir")
    resumed = checkpoint.load(ckpt_path) if args.resume else None
    if resumed and not {"optimizer", "rng"} <= resumed.keys():
        raise UsageError(f"{ckpt_path} holds weights only (no optimizer state), as best.pt does; start from it "
                         f"with --init-from {ckpt_path} and a new --out-dir, or --resume a ckpt.pt")
    if resumed:
        _run_settings(args, resumed.get("args", {}), log)
        _keep_global_batch(args, resumed.get("args", {}), resumed.get("world_size", world.size), world.size, log)
        saved = resumed.get("args", {}).get("data")
        # A pipe (--data /dev/stdin, a FIFO) may still be there, but it gives other text now, or
        # waits for some: a terminal's stdin. Only a file or a folder is the same corpus again.
        if args.data is None and saved not in (None, "default") and not (os.path.isfile(saved) or os.path.isdir(saved)):
            raise UsageError(f"{ckpt_path} was trained on --data {saved}, which is gone or not a file or folder "
                             f"(a pipe, or moved); pass --data again")
        if args.data is None and saved is not None:
            args.data = saved  # the corpus the run was on, not the default one
            log(f"resuming on --data {saved}, the corpus {ckpt_path} was trained on")
        elif _data_path(args.data) != _data_path(saved):
            log(f"note: resuming on --data {args.data or 'default'}; {ckpt_path} was trained on {saved or 'the default corpus'}")
    config = resumed_config(args, resumed["config"], ckpt_path) if resumed else None
    if resumed and config.dropout != resumed["config"]["dropout"]:
        log(f"note: --dropout {config.dropout} in place of the run's {resumed['config']['dropout']}")
    dtype = args.dtype or ("bf16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "fp32")
    if dtype != "fp32" and device_type == "cpu":
        log(f"note: {dtype} on CPU is slow; fp32 is the CPU default")
    init_model, init_tokenizer = pretrained(args) if args.init_from else (None, None)
    source = resumed["tokenizer"] if resumed else init_tokenizer

    # Rank 0 tokenizes (and caches) first so ranks never race on the cache.
    if source and args.tokenizer and args.tokenizer != source["name"]:
        raise UsageError(f"{ckpt_path if resumed else args.init_from} uses the {source['name']} tokenizer; "
                         f"drop --tokenizer {args.tokenizer} (it is fixed by the weights)")
    tokenizer_name = source["name"] if source else (args.tokenizer or "char")
    if not world.main:
        distributed.barrier(world, patient=True)
    chars = source.get("chars") if source else None  # a char model reads any corpus within its vocabulary
    data = load_dataset(args.data, tokenizer_name, args.cache_dir, log=log, exclude=(args.out_dir, args.cache_dir),
                        chars=chars)
    if world.main:
        distributed.barrier(world, patient=True)
    if init_model is not None:
        config = init_model.config
    config = config or model_config(args, data.tokenizer.vocab_size)
    data.check_block_size(config.block_size, fixed=bool(resumed))
    if config.kernels == "triton" and (why := ops.triton_unsupported(config, torch.device(device), DTYPES[dtype])):
        raise UsageError(f"--kernels triton: {why}; use --kernels auto, which runs what they cannot on torch")
    if config.kernels == "auto" and device_type == "cuda" and TRITON_MISSING:
        log(f"note: every op runs on torch: {TRITON_MISSING}")

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = (init_model or GPT(config)).to(device)
    step, best_val, elapsed, skipped_total = 0, float("inf"), 0.0, 0
    if resumed:
        checkpoint.load_weights(model, resumed["model"], ckpt_path)
        step, best_val, elapsed = resumed["step"], resumed["best_val_loss"], resumed["elapsed"]
        skipped_total = resumed.get("skipped", 0)
    wrapped = distributed.wrap(model, world, device, args.fsdp)
    # Fused AdamW (one kernel for all parameters) on CPU too: 3% off a tiny-preset step on 2
    # cores, the same losses (bench/RESULTS.md, CPU). FSDP's sharded parameters take foreach.
    optimizer, param_names = make_optimizer(model, args, fused=device_type in ("cuda", "cpu") and not args.fsdp)
    if resumed:
        _load_optimizer(optimizer, model, resumed["optimizer"], param_names, args.fsdp, ckpt_path)
        if world.main:
            checkpoint.set_rng_state(resumed["rng"])
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == "fp16")
    if resumed and resumed.get("scaler") and dtype == "fp16":
        scaler.load_state_dict(resumed["scaler"])  # the loss scale it had found, not 65536 again
    autocast = torch.autocast(device_type, dtype=DTYPES[dtype]) if dtype != "fp32" else contextlib.nullcontext()
    # Compiled, a run is not bit-exact run to run (nor is --resume): Inductor sums the embedding's
    # gradient with atomic adds, whose order varies; eager's kernel sums in a fixed one.
    fwd = torch.compile(wrapped) if args.compile else wrapped

    metrics = Metrics(args.out_dir, warn=log)
    if world.main:
        os.makedirs(args.out_dir, exist_ok=True)
        metrics.truncate_after(step)
        if args.overwrite:  # nothing of the old run may pass for this one's (sample.py reads best.pt)
            for name in ("best.pt", "loss.png"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(args.out_dir, name))
    tokens_per_step = args.batch_size * args.grad_accum * world.size * config.block_size
    peak = peak_flops(device, dtype)
    log(f"python {platform.python_version()} | torch {torch.__version__} | device {device}"
        + (f" ({torch.cuda.get_device_name()})" if device_type == "cuda" else "")
        + f" | dtype {dtype} | world size {world.size}" + (" (FSDP2)" if args.fsdp else ""))
    log(f"data: {data.description}: {len(data.train):,} train / {len(data.val):,} val tokens, "
        f"{data.tokenizer.name} tokenizer, vocab {config.vocab_size}")
    log(f"model: {model.num_params() / 1e6:.2f}M parameters, {config}")
    log("training: " + " ".join(f"{k}={v}" for k, v in vars(args).items() if k not in ("argv", "given")))
    if args.max_steps <= args.warmup:  # as nanoGPT's schedule: not refused, but said (--decay-steps is)
        log(f"note: --max-steps {args.max_steps} ends within --warmup {args.warmup:g}: the lr rises to "
            f"{learning_rate(args.max_steps - 1, 0.0, args):.1e} (--lr is {args.lr:g}) and never decays; lower --warmup")
    if resumed:
        log(f"resuming from {ckpt_path} at step {step}")
        if step >= args.max_steps:
            log(f"note: step {step} already reaches --max-steps {args.max_steps}; nothing to train (raise --max-steps)")
        elif args.max_time and elapsed >= args.max_time:
            log(f"note: the run has trained {fmt_time(elapsed)}, its --max-time {args.max_time:g} s; nothing to "
                f"train (raise --max-time, or pass 0 for no limit)")

    saved = False  # a checkpoint of this run's: after --overwrite, out-dir holds the old run's until then

    def save(path: str, with_optimizer: bool = True) -> None:
        nonlocal saved
        saved = True
        model_state = _full_state(model, args.fsdp)
        opt_state = _optimizer_state(optimizer, model, param_names, args.fsdp) if with_optimizer else None
        if not world.main:
            return
        state = {
            "model": model_state,
            "config": config.to_dict(),
            "tokenizer": data.tokenizer.state_dict(),
            "step": step,
            "best_val_loss": best_val,
            "elapsed": elapsed,
            "skipped": skipped_total,
            "world_size": world.size,
            # Stopped right after a skipped (non-finite) step, the resumed run retries it with
            # the batch the uninterrupted one would, not the failing one again.
            "retry": in_a_row,
            # The training loss summed since the last log line, which a resumed run's first line averages in.
            "log_loss": [float(loss_sum), loss_count],
            # --data absolute, so that --resume from another folder finds the same corpus.
            "args": {k: v for k, v in vars(args).items() if k not in ("argv", "given")} | {"data": _data_path(args.data)},
        }
        if with_optimizer:
            state |= {"optimizer": opt_state, "rng": checkpoint.rng_state(), "scaler": scaler.state_dict()}
        checkpoint.save(state, path)

    model.train()
    losses: dict[str, float] = {}
    in_a_row = resumed.get("retry", 0) if resumed else 0
    logged = resumed.get("log_loss", [0.0, 0]) if resumed else [0.0, 0]
    loss_sum, loss_count = torch.tensor(float(logged[0]), device=device), int(logged[1])
    t_start, t_log, log_steps = time.time() - elapsed, time.time(), 0
    with StopSignal(log) as stop:
        while True:
            if getattr(log, "closed", False) and not stop.requested:
                stop.requested = "SIGPIPE"  # stdout's reader has gone (| head): save and stop, as on Ctrl-C
            done = step >= args.max_steps or bool(args.max_time and elapsed >= args.max_time)
            # A signal may reach some ranks only (kill PID, the torchrun of one node of several):
            # every rank learns it (1 + its number outranks done's 1), so that all save and exit alike.
            asked = distributed.max_over_ranks(1 + signal.Signals[stop.requested] if stop.requested else int(done),
                                               world, device)
            if asked > 1 and not stop.requested:
                stop.requested = signal.Signals(asked - 1).name
                log(f"\n{stop.requested} received by another rank: saving a checkpoint")
            if asked:
                break
            lr = learning_rate(step, elapsed, args)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batches = train_batches(data, step, args, world, config.block_size, retry=in_a_row)
            if world.distributed:
                # Each rank's dropout masks from (seed, rank, step): different per rank, and the
                # same after a resume, which restores rank 0's random state only.
                torch.manual_seed(_rank_seed(args.seed, world.rank, step, in_a_row))
            step_loss = torch.zeros((), device=device)
            for i, (x, y) in enumerate(batches):
                last = i == len(batches) - 1
                sync = contextlib.nullcontext() if last or not world.distributed or args.fsdp else wrapped.no_sync()
                with sync:
                    with autocast:
                        _, loss = fwd(x.to(device, non_blocking=True), y.to(device, non_blocking=True),
                                      return_logits=False)
                    scaler.scale(loss / len(batches)).backward()
                step_loss += loss.detach() / len(batches)
            step_loss = distributed.mean(step_loss, world)  # the global batch's loss, as one process logs it
            scaler.unscale_(optimizer)
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float("inf"))
            # fp16 overflow is the GradScaler's business; anything else non-finite is a fault.
            bad = not torch.isfinite(step_loss) or (dtype != "fp16" and not torch.isfinite(norm))
            if distributed.any_rank(bad, world, device):
                optimizer.zero_grad(set_to_none=True)
                scaler.update()
                skipped_total += 1
                in_a_row += 1
                log(f"step {step + 1}: non-finite loss or gradient, update skipped ({in_a_row} in a row, {skipped_total} in all)")
                if in_a_row >= args.max_skips:
                    # Not saved now: the weights that keep giving non-finite losses are not a good state.
                    fix = "lower --lr or raise --warmup" + ("" if dtype == "fp32" else ", or use --dtype fp32")
                    then = (f"then --resume from the last checkpoint, {ckpt_path}" if resumed or saved
                            else "then start again (no checkpoint was written yet)")
                    raise TrainingError(f"{in_a_row} non-finite steps in a row at step {step + 1}; {fix}, {then}")
                continue
            in_a_row = 0
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            elapsed = time.time() - t_start
            if args.max_time:  # it decides the lr and when to stop: rank 0's clock for every rank
                elapsed = distributed.from_main(elapsed, world, device)
            loss_sum += step_loss
            loss_count += 1
            log_steps += 1

            if step % args.log_interval == 0 or step == 1:
                dt = time.time() - t_log
                tok_s = log_steps * tokens_per_step / dt
                left = (args.max_steps - step) * dt / log_steps
                if args.max_time:
                    left = min(left, args.max_time - elapsed)
                mfu = f" | mfu {model.flops_per_token(config.block_size) * tok_s / world.size / peak:.1%}" if peak else ""
                # The most this process's tensors have taken on its GPU so far, as modded-nanogpt logs it.
                mem = f" | mem {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if device_type == "cuda" else ""
                train_loss = (loss_sum / loss_count).item()
                log(f"step {step}/{args.max_steps} | loss {train_loss:.4f} | lr {lr:.2e} | "
                    f"{tok_s:,.0f} tok/s{mfu}{mem} | eta {fmt_time(max(0.0, left))}", flush=True)
                if world.main:
                    metrics.append(step=step, train_loss=f"{train_loss:.4f}", lr=f"{lr:.3e}", tokens_per_s=f"{tok_s:.0f}",
                                   elapsed_s=f"{elapsed:.1f}", skipped=skipped_total)
                t_log, loss_sum, loss_count, log_steps = time.time(), torch.zeros((), device=device), 0, 0

            finished = step >= args.max_steps or bool(args.max_time and elapsed >= args.max_time)
            if step % args.eval_interval == 0 or finished:
                t_eval = time.time()
                if world.main or args.fsdp:  # an FSDP forward needs every rank
                    losses = estimate_loss(model, data, args, device, autocast)
                if world.main:
                    log(f"eval step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}", flush=True)
                    metrics.append(step=step, train_loss=f"{losses['train']:.4f}", val_loss=f"{losses['val']:.4f}", elapsed_s=f"{elapsed:.1f}")
                    metrics.plot()
                improved = world.main and losses["val"] < best_val
                best_val = min(best_val, losses["val"]) if world.main else best_val
                # best.pt first: killed between the two, ckpt.pt still holds the old best val loss,
                # so the resumed run redoes this eval and writes best.pt again.
                if distributed.any_rank(improved, world, device):
                    save(best_path, with_optimizer=False)
                save(ckpt_path)
                log(f"saved {ckpt_path}" + (f" and {best_path} (best val so far)" if improved else ""))
                distributed.barrier(world)
                t_log += time.time() - t_eval  # tokens/s counts training time only
            elif args.save_interval and step % args.save_interval == 0:
                save(ckpt_path)
        if stop.requested:
            save(ckpt_path)
            log(f"stopped at step {step} ({stop.requested}); checkpoint saved to {ckpt_path}. "
                f"Resume with: {_resume_command(args.argv, world.size)}")
        elif os.path.exists(ckpt_path):
            best = f", best val loss {best_val:.4f}" if best_val < math.inf else ""
            log(f"done: step {step} in {fmt_time(elapsed)}{best}. Sample with: "
                f"{shlex.join([_python(), _script('sample.py'), '--checkpoint', args.out_dir])}")
    return {"step": step, "best_val_loss": best_val, "skipped": skipped_total, "stopped": stop.requested, "model": model, **losses}


def _run_settings(args: argparse.Namespace, saved: dict, log) -> None:
    """--resume: the RUN_FLAGS not given take the run's values; given ones that differ are noted."""
    given = getattr(args, "given", set(vars(args)))
    for name in RUN_FLAGS:
        if name not in saved:
            continue
        if name not in given:
            setattr(args, name, saved[name])
        elif getattr(args, name) != saved[name]:
            log(f"note: --{name.replace('_', '-')} {getattr(args, name)} in place of the run's {saved[name]}")
    check_args(args)


def _keep_global_batch(args: argparse.Namespace, run: dict, saved: int, size: int, log) -> None:
    """--resume at another world size: --grad-accum, unless given, scaled so that each step
    takes the run's global batch (the same sequences: train_batches draws it whole)."""
    if saved == size or not {"batch_size", "grad_accum"} <= run.keys():
        return
    if "grad_accum" not in getattr(args, "given", set()) and args.grad_accum * saved % size == 0:
        args.grad_accum = args.grad_accum * saved // size
        log(f"note: world size {size} in place of the run's {saved}: --grad-accum {args.grad_accum} keeps its batch")
    before, now = run["batch_size"] * run["grad_accum"] * saved, args.batch_size * args.grad_accum * size
    if now != before:
        log(f"note: world size {size} in place of the run's {saved}: {now} sequences per step, not {before} "
            f"(to keep them: --batch-size B --grad-accum A with B x A x {size} = {before})")


def _rank_seed(seed: int, rank: int, step: int, retry: int) -> int:
    digest = hashlib.blake2b(f"{seed} {rank} {step} {retry}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # torch.manual_seed takes [0, 2^63)


def _resume_command(argv: list[str], world_size: int) -> str:
    """This run's command line, continuing from its checkpoint: --resume in place of the
    flags that start a run (--overwrite, --init-from), under torchrun if it ran there."""
    kept, skip = [], False
    for arg in argv:
        if skip or arg in ("--resume", "--overwrite") or arg.startswith("--init-from="):
            skip = False
            continue
        if arg == "--init-from":
            skip = True  # and its value
            continue
        kept.append(arg)
    launcher = ["torchrun", "--standalone", f"--nproc-per-node={world_size}"] if world_size > 1 else [_python()]
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if world_size > per_node:  # several nodes: each node's torchrun, with its own --node-rank
        launcher = ["torchrun", f"--nnodes={world_size // per_node}", "--node-rank=N",
                    f"--master-addr={os.environ.get('MASTER_ADDR', 'HOST')}",
                    f"--master-port={os.environ.get('MASTER_PORT', '29500')}", f"--nproc-per-node={per_node}"]
        return shlex.join([*launcher, _script("train.py"), *kept, "--resume"]) + " (on each node, N its rank)"
    return shlex.join([*launcher, _script("train.py"), *kept, "--resume"])


def _script(name: str) -> str:
    """A script beside this one, as a path from the current folder."""
    return os.path.relpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), name))


def _data_path(data: str | None) -> str | None:
    return data if data in (None, "default") else os.path.abspath(os.path.expanduser(data))


def _python() -> str:
    """The interpreter running this, as the user would type it (.venv/bin/python, not python)."""
    relative = os.path.relpath(sys.executable)
    return sys.executable if relative.startswith("..") else relative


def _full_state(model: GPT, fsdp: bool) -> dict:
    if not fsdp:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _optimizer_state(optimizer, model: GPT, names: list[list[str]], fsdp: bool) -> dict:
    """The optimizer state keyed by parameter name, the same whatever the wrapping."""
    if not fsdp:
        return checkpoint.optimizer_state_by_name(optimizer.state_dict(), names)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _load_optimizer(optimizer, model: GPT, state: dict, names: list[list[str]], fsdp: bool, path: str) -> None:
    if [g["params"] for g in state["param_groups"]] != names:
        raise UsageError(f"--resume: the optimizer state in {path} does not match this model's parameters")
    # Loading brings back the saved groups' settings too; the flags' (--weight-decay, --beta2,
    # noted where they differ) must win, as they do for the lr, set every step.
    settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    # Before the load too: the groups' fused flag decides where it puts each `step` count (on the
    # parameter's device for fused AdamW, on the CPU for FSDP's foreach one). Another kind of
    # run's checkpoint would leave a fused optimizer's counts on the CPU, which CUDA refuses.
    state = {**state, "param_groups": [{**saved, **now} for saved, now in zip(state["param_groups"], settings)]}
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        # It first makes the state with a step at lr 0, which an empty one (saved before any
        # update) would leave in place: AdamW would count an update too many. Fresh is right.
        if state["state"]:
            set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(checkpoint.optimizer_state_by_id(state))
    for group, saved in zip(optimizer.param_groups, settings, strict=True):
        group.update(saved)


class Terminated(KeyboardInterrupt):
    """SIGTERM before training's own handler (StopSignal) is in place, e.g. while tokenizing:
    raised like Ctrl-C, so that cleanups run (the out-dir lock, a partial cache file)."""


def _terminate(signum, frame) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.time()
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return _main(args, started)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(args: argparse.Namespace, started: float) -> int:
    try:
        result = train(args)
    except (UsageError, CorpusError, TokenizerError, checkpoint.CheckpointError, HFError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if not isinstance(e, TrainingError) else 1
    except KeyboardInterrupt as e:
        print("\ninterrupted; any checkpoint already written is intact", file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT)
    except (RuntimeError, MemoryError) as e:
        where = out_of_memory(e)
        rank = os.environ.get("RANK", "0")
        # Most often a collective cut short because another rank failed and left the group
        # (on rank 0 too: a peer killed by the OOM killer resets its connection).
        if where is None and (rank != "0" or isinstance(e, torch.distributed.DistError)):
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            cause = "if rank 0 failed first, its message names the cause" if rank != "0" else \
                "another rank stopped first (its message, or the OOM killer, names the cause)"
            print(f"error on rank {rank}: {first[:300]}; {cause}", file=sys.stderr)
            return 1
        if where is None:
            raise
        print(f"error: out of {where} memory at --batch-size {args.batch_size}; lower --batch-size (raise --grad-accum "
              f"to keep the tokens per step) or --block-size, {_then(args, started)}", file=sys.stderr)
        return 1
    except OSError as e:
        # The progress lines on a full disk (train.py > log), and the like: errno, text and path
        # name the problem. Files the run reads or writes fail with their own errors above.
        print(f"error: {e}; free the space or fix the path, {_then(args, started)}", file=sys.stderr)
        return 1
    # Stopped by a signal (checkpoint saved): 128 + its number, as the shell reports a killed
    # job, so that `train.py && sample.py` or a scheduler does not take it for a finished run.
    return 128 + signal.Signals[result["stopped"]] if result["stopped"] else 0


def _then(args: argparse.Namespace, started: float) -> str:
    """How to go on after a failure: from this run's checkpoint or the one it resumed, not the
    run an --overwrite replaces."""
    ckpt = os.path.join(args.out_dir, checkpoint.CKPT_NAME)
    ours = os.path.exists(ckpt) and (args.resume or os.path.getmtime(ckpt) >= started)
    return f"then --resume from {ckpt}" if ours else "then start again (no checkpoint was written yet)"


if __name__ == "__main__":
    sys.exit(main())

"""Generate text from a trained checkpoint, streaming it to stdout.

    python sample.py --checkpoint out --prompt "def main():" --num-samples 3
    echo "ROMEO:" | python sample.py --checkpoint out --prompt-file -
"""
from __future__ import annotations

import argparse
import sys

import torch

from gpt import checkpoint
from gpt.generate import generate
from train import pick_device, UsageError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="out", help="checkpoint file, or an out dir holding ckpt.pt")
    p.add_argument("--prompt", default="", help="text to continue (default: start of text)")
    p.add_argument("--prompt-file", default=None, help="read the prompt from a file, or - for stdin")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.8, help="0 picks the most likely token (greedy)")
    p.add_argument("--top-k", type=int, default=200, help="keep the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="keep the smallest set of tokens with this much probability")
    p.add_argument("--seed", type=int, default=None, help="make the samples reproducible")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    return p.parse_args(argv)


def read_prompt(args: argparse.Namespace) -> str:
    if args.prompt_file is None:
        return args.prompt
    if args.prompt_file == "-":
        return sys.stdin.read()
    try:
        with open(args.prompt_file, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read prompt file {args.prompt_file}: {e}") from None


def encode_prompt(text: str, tokenizer, block_size: int) -> list[int]:
    if not text:
        # Start of text: GPT-2's end-of-text token, else a newline.
        if tokenizer.eot_token is not None:
            return [tokenizer.eot_token]
        text = "\n"
    try:
        ids = tokenizer.encode(text)
    except ValueError as e:
        raise UsageError(f"prompt cannot be encoded: {e}") from None
    if len(ids) > block_size:
        print(f"note: prompt has {len(ids)} tokens; keeping the last {block_size} (the context length)", file=sys.stderr)
        ids = ids[-block_size:]
    return ids


class Streamer:
    """Prints text as tokens arrive, holding back bytes that do not yet form a whole character."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.printed = tokenizer, [], 0

    def __call__(self, token: torch.Tensor) -> None:
        self.ids.append(int(token[0, 0]))
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[self.printed:])
            sys.stdout.flush()
            self.printed = len(text)

    def finish(self) -> None:
        sys.stdout.write(self.tokenizer.decode(self.ids)[self.printed:] + "\n")
        sys.stdout.flush()


def sample(args: argparse.Namespace) -> None:
    for name in ("num_samples", "max_new_tokens"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive")
    if not 0.0 < args.top_p <= 1.0 or args.temperature < 0:
        raise UsageError("--top-p must be in (0, 1] and --temperature non-negative")
    device = pick_device(args.device)
    model, tokenizer, _ = checkpoint.load_model(args.checkpoint, device)
    prompt = read_prompt(args)
    ids = encode_prompt(prompt, tokenizer, model.config.block_size)
    gen = torch.Generator(device=device)
    gen.manual_seed(args.seed if args.seed is not None else torch.seed())
    for i in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        sys.stdout.write(prompt)
        stream = Streamer(tokenizer)
        generate(
            model,
            torch.tensor([ids], device=device),
            args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k or None,
            top_p=args.top_p,
            generator=gen,
            on_token=stream,
        )
        stream.finish()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        sample(args)
    except (UsageError, checkpoint.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Generate text from a trained checkpoint (or a Hugging Face GPT-2 directory).

    python sample.py --checkpoint out --prompt "def main():" --num-samples 3
    python sample.py --checkpoint out --prompt "import os" --prompt "class A:"   # one batch
    echo "ROMEO:" | python sample.py --checkpoint out --prompt-file -

One sample streams to stdout as it is generated; several are generated in
parallel in one batch and printed when done. A KV cache is used throughout;
on CUDA the decode step is also captured in a CUDA graph.
"""
from __future__ import annotations

import argparse
import codecs
import contextlib
import math
import sys
import time
from pathlib import Path

import torch

from gpt import checkpoint
from gpt.cli import ArgumentParser, drop_stdout, out_of_memory
from gpt.generate import Decoder, GenerationError, generate
from gpt.hf import HFError, is_model_dir, load_any
from gpt.tokenizer import Tokenizer, TokenizerError
from train import DTYPES, UsageError, pick_device


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="out", help="checkpoint file, an out dir holding ckpt.pt (ours or nanoGPT's), a Hugging Face GPT-2 directory or a safetensors export")
    p.add_argument("--prompt", action="append", default=None, help="text to continue; repeat for several prompts in one batch (default: start of text)")
    p.add_argument("--prompt-file", default=None, help="read one prompt from a file, or - for stdin")
    p.add_argument("--num-samples", type=int, default=1, help="samples per prompt, generated in parallel")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.8, help="0 (or below 1e-5) picks the most likely token (greedy)")
    p.add_argument("--top-k", type=int, default=200, help="keep the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="keep the smallest set of tokens with this much probability")
    p.add_argument("--stop", action="append", default=[], help="end a sample at this string (repeatable; escapes such as \\n are read); <|endoftext|> always ends it")
    p.add_argument("--seed", type=int, default=None, help="make the samples reproducible")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bf16 on CUDA that supports it, else fp32")
    p.add_argument("--no-cuda-graph", action="store_true", help="on CUDA, launch every kernel of every step instead of replaying a graph")
    p.add_argument("--compile", action="store_true", help="decode step via torch.compile(mode='reduce-overhead') on the torch reference ops, instead of our kernels in a CUDA graph")
    args = p.parse_args(argv)
    # "\n\n" from a shell arrives as backslash-n text: read the escapes, as a user means them.
    stops = []
    for text in args.stop:
        try:
            stops.append(codecs.decode(text.encode("latin-1", "backslashreplace"), "unicode_escape"))
        except UnicodeDecodeError as e:
            p.error(f"--stop {text}: {e.reason}; write a literal backslash as \\\\")
    args.stop = stops
    return args


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompt_file is not None:
        # Bytes as they are, as the corpus was read: text mode would turn \r\n into \n; a
        # byte-order mark (Windows editors write one) goes, as it does from the corpus.
        if args.prompt_file == "-" and sys.stdin is None:  # started with stdin closed (<&-)
            raise UsageError("--prompt-file -: stdin is closed; pipe the prompt in, or pass --prompt")
        try:
            raw = sys.stdin.buffer.read() if args.prompt_file == "-" else Path(args.prompt_file).read_bytes()
            prompts.append(raw.decode("utf-8-sig"))
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read prompt file {args.prompt_file}: {e}") from None
    return prompts or [""]


def encode_prompt(text: str, tokenizer: Tokenizer, block_size: int) -> list[int]:
    if not text:
        # Start of text: GPT-2's end-of-text token, else a newline, else (a char vocabulary
        # without one) its first character.
        if tokenizer.eot_token is not None:
            return [tokenizer.eot_token]
        try:
            return tokenizer.encode("\n")
        except ValueError:
            return [0]
    try:
        ids = tokenizer.encode(text)
    except ValueError as e:
        raise UsageError(f"prompt cannot be encoded: {e}") from None
    if len(ids) > block_size:
        print(f"note: prompt has {len(ids)} tokens; keeping the last {block_size} (the context length)", file=sys.stderr)
        ids = ids[-block_size:]
    return ids


class StdoutError(Exception):
    """Writing the samples to stdout failed (a full disk under `sample.py > file`)."""


def write_out(text: str) -> None:
    """Writes text to stdout now; a failure other than a closed pipe is a StdoutError, so
    that it is not taken for any other OSError (a cache folder that cannot be written)."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as e:
        raise StdoutError(e.strerror or str(e)) from e


class Streamer:
    """Prints text as tokens arrive, holding back bytes that do not yet form a whole character.

    Only what is not printed yet is decoded and searched for a stop string, so each token
    costs the same however long the sample grows (a stop string cannot start in printed text:
    it would have been whole, and found, before that text was printed)."""

    def __init__(self, tokenizer, stops: list[str], eot: int | None):
        self.tokenizer, self.stops, self.eot = tokenizer, stops, eot
        self.pending = ""  # decoded, not printed: what may start a stop string
        self.ids: list[int] = []  # not decoded into pending yet: they may end in part of a character
        self.hold = max((len(s) - 1 for s in stops), default=0)
        self.ended = False
        self.generated = 0  # tokens of the sample, as generate() counts them: the end of text is not one

    def __call__(self, token: torch.Tensor) -> None:
        t = int(token[0, 0])
        self.ended = self.ended or t == self.eot
        if self.ended:
            return
        self.generated += 1
        self.ids.append(t)
        tail = self.tokenizer.decode(self.ids)
        text = self.pending + tail
        cut = min((text.find(s) for s in self.stops if s in text), default=-1)
        if cut >= 0:
            self.pending, self.ids, self.ended = "", [], True
            self._write(text[:cut])
            return
        if tail.endswith("\ufffd"):
            return
        safe = max(0, len(text) - self.hold)  # hold back what might be the start of a stop string
        self.pending, self.ids = text[safe:], []
        if safe:
            self._write(text[:safe])

    def _write(self, text: str) -> None:
        if text:
            write_out(text)

    def finish(self) -> None:
        text = self.pending + self.tokenizer.decode(self.ids)
        write_out(cut_at_stop(text, self.stops) + "\n")


def cut_at_stop(text: str, stops: list[str]) -> str:
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    return text if cut < 0 else text[:cut]


def sample(args: argparse.Namespace) -> None:
    for name in ("num_samples", "max_new_tokens"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive")
    if not 0.0 < args.top_p <= 1.0 or not 0 <= args.temperature < math.inf:
        raise UsageError("--top-p must be in (0, 1] and --temperature non-negative and finite")
    if args.top_k < 0:
        raise UsageError(f"--top-k must be 0 (all tokens) or positive, got {args.top_k}")
    if "" in args.stop:
        raise UsageError("--stop \"\" would end every sample before its first token; pass the text to stop at")
    if args.seed is not None and not 0 <= args.seed < 2**63:
        raise UsageError(f"--seed must be in [0, 2^63), got {args.seed}")
    device = pick_device(args.device)
    path = args.checkpoint if is_model_dir(args.checkpoint) else checkpoint.resolve(args.checkpoint)
    model, tokenizer = load_any(path)
    model = model.to(device).eval()
    dtype = args.dtype or ("bf16" if device == "cuda" and torch.cuda.is_bf16_supported() else "fp32")
    model = model.to(DTYPES[dtype])
    if args.compile:  # Inductor writes its own kernels for the reference path
        model.set_kernels("torch")
    prompts = read_prompts(args)
    ids = [encode_prompt(p, tokenizer, model.config.block_size) for p in prompts]
    rows = len(prompts) * args.num_samples
    if rows * model.config.vocab_size >= 2**32:  # the sampling kernel's per-row noise counters
        raise UsageError(f"{rows} samples at once (prompts x --num-samples) over a vocabulary of "
                         f"{model.config.vocab_size} tokens is more than the sampler draws apart; "
                         f"generate fewer than {-(-2**32 // model.config.vocab_size)} at a time")
    batch = [(p, i) for p, i in zip(prompts, ids) for _ in range(args.num_samples)]
    gen = torch.Generator(device=device)
    gen.manual_seed(args.seed if args.seed is not None else torch.seed())
    cuda_graph = device == "cuda" and not args.no_cuda_graph and not args.compile
    built = time.perf_counter()
    decoder = Decoder(model, len(batch), cuda_graph=cuda_graph, compile=args.compile)
    if args.compile:  # apart, as gpt-fast's generate.py reports it: the speed line leaves it out
        print(f"compiled the decode step in {time.perf_counter() - built:.1f} s", file=sys.stderr)
    stops = args.stop
    # A stop string found at a check ends in the tokens new since the last one (else the last
    # would have found it), and starts at most its length in bytes before them: every token
    # is a byte or more. So each check decodes that window, not the whole sample.
    back = max((len(s.encode()) for s in stops), default=0)
    checked = [0] * (len(prompts) * args.num_samples)

    def stop(b: int, new: list[int]) -> bool:
        text = tokenizer.decode(new[max(0, checked[b] - back):])
        checked[b] = len(new)
        return cut_at_stop(text, stops) != text

    common = dict(temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p, generator=gen,
                  eot_token=tokenizer.eot_token, decoder=decoder)
    started = time.perf_counter()
    if len(batch) == 1:
        write_out(prompts[0])
        stream = Streamer(tokenizer, stops, tokenizer.eot_token)
        # The streamer has found the stop string already, in the text it has not printed.
        generate(model, [ids[0]], args.max_new_tokens, on_token=stream,
                 stop=(lambda b, new: stream.ended) if stops else None, **common)
        stream.finish()
        report_speed(stream.generated, 1, time.perf_counter() - started, device)
        return
    outputs = generate(model, [i for _, i in batch], args.max_new_tokens, stop=stop if stops else None, **common)
    seconds = time.perf_counter() - started
    for n, ((prompt, _), new) in enumerate(zip(batch, outputs)):
        write_out(f"--- sample {n + 1} ---\n{prompt}{cut_at_stop(tokenizer.decode(new), stops)}\n")
    report_speed(sum(map(len, outputs)), len(batch), seconds, device)


def report_speed(tokens: int, samples: int, seconds: float, device: str) -> None:
    """One line on stderr, as gpt-fast's generate.py reports: the samples on stdout stay clean
    for a pipe. The time runs from the prompts' prefill to the last token: the decode step's
    CUDA graph or compilation is made before (Decoder), the draw's CUDA graph in the first step."""
    memory = (f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
              if device == "cuda" else "")
    print(f"{tokens} tokens in {seconds:.2f} s, {tokens / max(seconds, 1e-9):,.1f} tokens/s "
          f"({samples} sample{'s' if samples > 1 else ''} at once{memory})", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # A stdout in a legacy encoding (Windows' cp1252 when redirected to a file, or a latin-1
    # locale) cannot hold every character a model writes: those show as '?', not a traceback.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="replace")
    try:
        sample(args)
    except (UsageError, checkpoint.CheckpointError, HFError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except GenerationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        with contextlib.suppress(OSError):
            sys.stdout.write("\n")  # end the partial sample's line: the shell prompt starts its own
            sys.stdout.flush()
        return 130
    except BrokenPipeError:  # stdout's reader has gone (sample.py | head): what it read is all it wanted
        drop_stdout()
        return 141  # 128 + SIGPIPE, as a shell reports a writer its reader left
    except StdoutError as e:  # writing to a full disk (sample.py > out.txt)
        drop_stdout()
        print(f"error: cannot write the samples to stdout ({e}); free some space or write them elsewhere",
              file=sys.stderr)
        return 1
    except OSError as e:  # e.g. a cache folder Triton cannot write: the errno, its text and the path say it all
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (RuntimeError, MemoryError) as e:
        where = out_of_memory(e)
        if where is None:
            raise
        print(f"error: out of {where} memory generating (the KV cache holds every sample of every prompt at "
              f"once, and the output each one's tokens); lower --num-samples, pass fewer prompts or lower "
              f"--max-new-tokens", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

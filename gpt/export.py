"""Export a checkpoint's weights without pickle.

    python -m gpt.export out/ckpt.pt gpt2-hf/                       # Hugging Face GPT-2 directory (gpt2 tokenizer)
    python -m gpt.export out/ckpt.pt weights/ --format safetensors  # our config + model.safetensors

Both load with sample.py --checkpoint DIR and train.py --init-from DIR.
"""
from __future__ import annotations

import argparse
import sys

from pathlib import Path

from gpt import checkpoint
from gpt.cli import ArgumentParser
from gpt.hf import HFError, load_any, save_hf, save_safetensors


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m gpt.export", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="checkpoint file or out dir (or an exported folder, to convert it)")
    p.add_argument("out_dir", help="directory to write, not a training run's out dir")
    p.add_argument("--format", choices=("hf", "safetensors"), default="hf",
                   help="hf (default): a GPT-2 directory transformers loads, for gpt2-tokenizer models; "
                        "safetensors: any model, with its own config and tokenizer")
    args = p.parse_args(argv)
    try:
        held = [n for n in (checkpoint.CKPT_NAME, "best.pt") if (Path(args.out_dir) / n).is_file()]
        if held:
            raise HFError(f"{args.out_dir} holds a training run ({held[0]}); export into a folder of its own, as "
                          f"sample.py and --init-from would not know which model of the folder to read")
        model, tokenizer = load_any(args.checkpoint)
        if args.format == "hf":
            if tokenizer.name != "gpt2":
                raise HFError(f"{args.checkpoint} uses the {tokenizer.name} tokenizer, which a Hugging Face GPT-2 "
                              f"directory cannot hold; use --format safetensors")
            save_hf(model, args.out_dir)
        else:
            save_safetensors(model, tokenizer, args.out_dir)
    except (checkpoint.CheckpointError, HFError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot write {args.out_dir}: {e.strerror or e}; pass a folder path that is not a file", file=sys.stderr)
        return 2
    print(f"wrote {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What the command-line tools (train.py, sample.py, gpt.export) share."""
from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

import torch


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser with its errors on one line: the usage block is what --help is for."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def out_of_memory(error: BaseException) -> str | None:
    """'GPU' or 'host' when `error` is an allocation failure, else None.

    CUDA raises OutOfMemoryError; the CPU allocator raises a RuntimeError, or Python a
    MemoryError. (When Linux's OOM killer ends the process instead, nothing can report it.)
    """
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return "GPU"
    if isinstance(error, MemoryError) or isinstance(error, RuntimeError) and "can't allocate memory" in str(error):
        return "host"
    return None


class Console:
    """print for a tool's progress lines. Once the reader of stdout has gone (train.py | head,
    or quitting less), later lines are dropped instead of ending the process with a
    BrokenPipeError, and `closed` tells the tool, which can then stop cleanly."""

    def __init__(self) -> None:
        self.closed = False

    def __call__(self, *args, **kwargs) -> None:
        if self.closed:
            return
        try:
            print(*args, **kwargs)
        except BrokenPipeError:
            self.closed = True
            drop_stdout()


def drop_stdout() -> None:
    """Points stdout at /dev/null, so that Python's flush at exit finds no broken pipe."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())

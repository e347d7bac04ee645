"""Small helpers shared by the kernel launchers: input checks and launch settings."""
from __future__ import annotations

import contextvars
import functools
import os
import re
from collections.abc import Callable

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Head dims the attention kernels (training and decode) take.
HEAD_DIMS = (16, 32, 64, 128)
# A LayerNorm row lives in registers: at most 64 KiB of it (16384 fp32 or 32768 fp16/bf16
# elements).
LAYER_NORM_MAX_ROW_BYTES = 65536


def _triton_missing() -> str | None:
    """Why the Triton kernels cannot run in this install, or None. Triton has no macOS or
    Windows build, and torch's CPU wheels go without it: there the model runs its torch ops
    (kernels.reference), and nothing that path imports may need Triton."""
    try:
        import triton
    except ImportError:
        return "Triton is not installed (pip install 'triton>=3.6'; it is built for Linux only)"
    version = tuple(int(part) for part in re.findall(r"\d+", triton.__version__)[:2])
    if version < (3, 6):
        return f"Triton {triton.__version__} is installed and the kernels need 3.6 or newer (pip install 'triton>=3.6')"
    return None


# None where the Triton kernels can run; else the reason, for the errors that refuse them.
TRITON_MISSING = _triton_missing()


def _interpret_env() -> bool:
    # TRITON_INTERPRET read as Triton reads it for @triton.jit (its C++ getenv_bool, 3.6-3.9:
    # "1", "true", "on", "yes", "y" in any case are on, anything else off): "false" read as on
    # let CPU tensors reach compiled kernels. In Python, as torch.compile traces this (through
    # the launchers' input checks) and cannot trace Triton's C helper.
    return os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "yes", "y")


# @triton.jit reads the variable when the kernels are decorated (at import): set later,
# the kernels stay compiled ones, which cannot take CPU tensors.
_INTERPRET_AT_IMPORT = _interpret_env()


def interpreting() -> bool:
    """True when Triton runs kernels on CPU tensors (TRITON_INTERPRET=1, set before import)."""
    return _INTERPRET_AT_IMPORT and _interpret_env()


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for launch grids: plain Python, as triton.cdiv costs microseconds per host call."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 1 else 1


def check_inputs(op: str, reference: str, **tensors: Tensor | None) -> None:
    """Raises ValueError unless all tensors are floating point, of one dtype, on one usable device.

    `reference` names the pure-torch fallback the message points to. Runs on every kernel
    call, so the common case is one cheap pass; the messages are built only on failure.
    """
    dtype = device = None
    for name, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{op}: {name} has dtype {t.dtype}; use float16, bfloat16 or float32")
        if dtype is None:
            dtype, device = t.dtype, t.device
        elif t.dtype != dtype or t.device != device:
            _raise_mismatch(op, {k: v for k, v in tensors.items() if v is not None})
    if device is not None and device.type != "cuda" and not interpreting():
        raise ValueError(
            f"{op}: the Triton kernel needs CUDA tensors, got {device}; on CPU use "
            f"{reference} (or set TRITON_INTERPRET=1 before importing triton)"
        )
    if dtype == torch.bfloat16 and device.type != "cuda":
        # The interpreter multiplies bf16 bit patterns in tl.dot (triton-lang/triton#11584)
        # and truncates fp32 -> bf16 casts: wrong numbers, no error.
        raise ValueError(
            f"{op}: bfloat16 is not supported under the Triton interpreter (its results are wrong); "
            f"use float16 or float32 on CPU, or {reference}"
        )


def refuse_double_backward(op: str) -> None:
    """Called first in each backward: under create_graph=True autograd would differentiate
    the kernels' gradients, which carry no graph, and silently drop the second-order terms."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"{op}: double backward (create_graph=True) is not supported; use kernels.reference.{op}")


def _raise_mismatch(op: str, given: dict[str, Tensor]) -> None:
    if len({t.dtype for t in given.values()}) > 1:
        desc = ", ".join(f"{k}={t.dtype}" for k, t in given.items())
        raise ValueError(f"{op}: inputs must share one dtype, got {desc}")
    desc = ", ".join(f"{k} on {t.device}" for k, t in given.items())
    raise ValueError(f"{op}: inputs must be on one device, got {desc}")


@functools.lru_cache(maxsize=None)
def device_capability(index: int = 0) -> tuple[int, int]:
    """(major, minor) of a CUDA device, read lazily and cached; (0, 0) when interpreting."""
    if interpreting() or not torch.cuda.is_available():
        return (0, 0)
    return torch.cuda.get_device_capability(index)


@functools.lru_cache(maxsize=None)
def sm_count(index: int) -> int:
    """Streaming multiprocessors of CUDA device `index` (the launchers size persistent and
    split grids by it)."""
    return torch.cuda.get_device_properties(index).multi_processor_count


def is_hopper(t: Tensor) -> bool:
    return t.is_cuda and device_capability(t.device.index or 0)[0] == 9


def on_input_device(launcher: Callable) -> Callable:
    """Decorates a launcher: its kernels run on the GPU of its first tensor argument.

    Triton launches on the current CUDA device, not on the tensors' (triton-lang/triton#2441):
    tensors on cuda:1 while cuda:0 is current -- a model spread over GPUs, as Hugging Face's
    device_map places it -- would be read at their addresses by a kernel running on cuda:0,
    an error at best (Liger-Kernel#1303, unsloth#6912)."""
    @functools.wraps(launcher)
    def launch(*args, **kwargs):
        first = next(a for a in args if isinstance(a, Tensor))
        if not first.is_cuda:
            return launcher(*args, **kwargs)
        with torch.cuda.device(first.device):
            return launcher(*args, **kwargs)
    return launch


def with_device_scratch(device: torch.device, launch: Callable[[], object]) -> None:
    """Runs `launch` with Triton's global scratch memory (which kernels that build tensor
    descriptors on the device need) taken from torch's caching allocator.
    triton.set_allocator sets a context variable, so setting it in a copy of the context
    leaves any allocator the caller set untouched."""
    import triton

    def run() -> None:
        triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device=device))
        launch()
    contextvars.copy_context().run(run)

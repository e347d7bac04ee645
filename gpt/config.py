"""Model configuration: one dataclass and a table of named presets."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace


@dataclass
class GPTConfig:
    vocab_size: int = 50257
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    pos_embedding: str = "learned"  # "learned" | "sinusoidal"
    kernels: str = "auto"  # "auto" (on CUDA, the faster per op; torch below 768 wide: gpt/ops.py) | "triton" | "torch"
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.pos_embedding not in ("learned", "sinusoidal"):
            raise ValueError(
                f"pos_embedding must be 'learned' or 'sinusoidal', got {self.pos_embedding!r}"
            )
        if self.kernels not in ("auto", "triton", "torch"):
            raise ValueError(
                f"kernels must be 'auto', 'triton' or 'torch', got {self.kernels!r}"
            )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def updated(self, **changes) -> "GPTConfig":
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


# Presets fix the architecture; vocab_size is set from the tokenizer at train time.
PRESETS: dict[str, GPTConfig] = {
    "gpt2": GPTConfig(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": GPTConfig(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": GPTConfig(n_layer=48, n_head=25, n_embd=1600),
    "shakespeare-char": GPTConfig(
        block_size=256, n_layer=6, n_head=6, n_embd=384, dropout=0.2
    ),
    # Sized so `make demo` learns recognisable Python in ~2 minutes on 2 CPU cores.
    "tiny": GPTConfig(block_size=128, n_layer=4, n_head=4, n_embd=128),
}


def preset(name: str) -> GPTConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[name])

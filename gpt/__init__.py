"""tritongpt: a compact, fast, readable GPT."""
from gpt.config import PRESETS, GPTConfig, preset
from gpt.model import GPT

__all__ = ["GPT", "GPTConfig", "PRESETS", "preset"]

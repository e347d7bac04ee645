"""The kernel launchers' Hopper variants forced on everywhere, for `pytest --candidates`
(the tables use each only where it measured faster, and some not yet at all):
every kernel test then runs them (in the interpreter, or on a Hopper GPU) over all its
shapes and edge cases, not only the few the candidates' own tests pick.

- FFN: TMA and split K, the last round's tiles alone cut, the GELU on the approximate tanh
  (in the interpreter each eligible product's second half of tiles cut in two, and that
  tanh computed exactly; on Hopper the _TMA_TILES table for 16-bit inputs with tail_split
  and approx_gelu);
- attention: TMA in the forward and both backward kernels;
- LayerNorm: the persistent, pipelined forward.
"""
import importlib

import pytest
import torch


def force(monkeypatch: pytest.MonkeyPatch) -> None:
    """Monkeypatches the settings functions; tests that set their own still win."""
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the TMA candidates need Hopper (or the interpreter)")
    ffn = importlib.import_module("kernels.ffn")
    tiles = ffn._tiles
    if torch.cuda.is_available():  # fp32 keeps its own small tiles, as the launcher's table does
        tma = {kind: t._replace(tail_split=True, approx_gelu=True) for kind, t in ffn._TMA_TILES.items()}
        monkeypatch.setattr(ffn, "_tiles", lambda t, kind: (
            tma.get(kind) if t.dtype != torch.float32 else None) or tiles(t, kind))
    else:
        monkeypatch.setattr(ffn, "_tiles", lambda t, kind: tiles(t, kind)._replace(
            tma=True, split_k=True, tail_split=True, approx_gelu=True))
        # The interpreter's two stand-in SMs rarely call for a split: force one wherever K
        # allows, the tail split's (half the tiles whole, half cut) where TMA runs the product.
        monkeypatch.setattr(ffn, "_split_plan", lambda tiles, k_steps, slots, tail_only: (
            (tiles, 1) if k_steps < 2 else (tiles // 2, 2) if tail_only else (0, 2)))
    attention = importlib.import_module("kernels.attention")
    settings = attention._settings

    def with_tma(*args):
        s = settings(*args)
        return s._replace(**{k: getattr(s, k)._replace(tma=True) for k in ("fwd", "dkdv", "dq")})

    monkeypatch.setattr(attention, "_settings", with_tma)
    layer_norm = importlib.import_module("kernels.layer_norm")
    ln_settings = layer_norm._settings
    monkeypatch.setattr(layer_norm, "_settings", lambda n, e: ln_settings(n, e)._replace(fwd_stages=2, fwd_programs_per_sm=2))

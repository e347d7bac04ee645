"""What the GPU would run, checked on any machine: every kernel configuration the tables
launch on Hopper and Ampere is compiled for sm90 and sm80 (tests/codegen.py, with Triton's
own ptxas) and must not spill, must keep its loops pipelined, must fit the device's shared
memory and the occupancy the launchers assume. These catch, without a GPU, the
regressions that the interpreter cannot see."""
import importlib
import json
import os
import subprocess
import sys

import pytest
import triton

attention = importlib.import_module("kernels.attention")  # the module, not kernels.attention the function

HERE = os.path.dirname(os.path.abspath(__file__))
REGISTERS_PER_SM = 65536
SHARED_PER_SM = {90: 228 * 1024, 80: 164 * 1024}
# The per-block opt-in maxima. The sm8x tables also run on sm86/sm89/sm120 (RTX 30/40/50,
# A10, L4, L40), which allow 99 KiB a block, not the A100's 163: a bigger program fails to
# launch there (Triton's OutOfResources).
SHARED_PER_PROGRAM = {90: 227 * 1024, 80: 99 * 1024}
# One pytest-xdist worker takes the whole module, so the builds (half a minute) run once.
pytestmark = pytest.mark.xdist_group("codegen")


@pytest.fixture(scope="module")
def cases() -> dict[str, dict]:
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    if not os.path.exists(os.path.join(bin_dir, "ptxas")):
        pytest.skip(f"Triton's ptxas is not installed in {bin_dir}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, os.path.join(HERE, "codegen.py")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def _programs_per_sm(case: dict) -> int:
    return REGISTERS_PER_SM // (case["registers"] * 32 * case["num_warps"])


def test_every_configuration_fits_shared_memory(cases):
    too_big = {name: c["shared"] for name, c in cases.items() if c["shared"] > SHARED_PER_PROGRAM[c["arch"]]}
    assert not too_big, f"more shared memory than a program may have (bytes): {too_big}"


def test_no_configuration_spills(cases):
    """Decode attention over a cache strided along D (a layout the model never makes: that
    case is there for its index arithmetic) spills under Triton 3.6, which the GPU machines
    run: 276 bytes on sm90 with int32 head-dim offsets, 812 with the int64 ones that keep
    strides past 2^31 / D right. Triton 3.7 and later hold it in registers."""
    old_triton = tuple(map(int, triton.__version__.split(".")[:2])) < (3, 7)
    spilling = {name: c["spill_bytes"] for name, c in cases.items()
                if c["spill_bytes"] and not (old_triton and "decode_attention D=64 strided" in name)}
    assert not spilling, f"register spills (bytes): {spilling}"


def test_loops_are_pipelined(cases):
    """Every kernel that walks a loop of tiles has its loads in flight ahead of use; the
    LayerNorm forward and the sampling kernels (one tile a program) have no loop but for
    sampling's rare path over scratch, when the candidates overflow the registers. Decode
    attention over a bf16 cache strided along D loads 2-byte elements one by one, which
    cp.async (4 bytes at least) cannot copy: that case is there for its index arithmetic.
    The loss's row kernel streams its row through registers, feeding no tl.dot, which
    Triton builds without cp.async; four 16-warp programs an SM keep loads in flight."""
    flat = {name: c for name, c in cases.items() if c["cp_async"] == 0 and c["tma_loads"] == 0 and not any(
        k in name for k in ("layer_norm fwd", "sample", "decode_attention D=64 strided", "cross_entropy"))}
    assert not flat, f"no cp.async or TMA copies (loads not pipelined): {sorted(flat)}"


def test_ffn_tma_kernels_load_through_tma(cases):
    """The TMA kernels' products (six, the weight gradients also with fp32 K slices, the
    GELU epilogues also on the approximate tanh, and the warp-specialised six) issue TMA
    copies (operand tiles, and the stored pre-activation for the GELU gradient), never
    per-thread cp.async."""
    tma = {name: c for name, c in cases.items() if "ffn tma" in name or "ffn ws" in name}
    assert len(tma) == 16
    for name, c in tma.items():
        assert c["tma_loads"] >= 2 and c["cp_async"] == 0, (name, c)


def test_approx_gelu_runs_the_hardware_tanh(cases):
    """The approximate-GELU candidate's epilogues (forward GELU, backward GELU gradient) run
    tanh.approx, which the interpreter cannot (it computes that tanh exactly there), and no
    other FFN kernel does."""
    ffn = {name: c for name, c in cases.items() if " ffn " in name}
    approx = {name for name, c in ffn.items() if c["tanh_approx"]}
    assert approx == {name for name in ffn if name.endswith("approx GELU")} and len(approx) == 2


def test_ws_kernels_are_warp_specialized(cases):
    """The warp-specialised candidate's six FFN products come out specialised (a producer
    and two consumer warp groups trading registers), not silently as a plain 4-warp
    kernel: Triton drops the specialisation, without a word, for loops it cannot split."""
    ws = {name: c for name, c in cases.items() if " ws " in name}
    assert len(ws) == 6
    for name, c in ws.items():
        assert c["threads"] == 384 and c["setmaxnreg"] > 0 and c["tma_loads"] >= 2, (name, c)


def test_layer_norm_backward_occupancy(cases):
    """The backward launches two 8-warp programs per SM (kernels/layer_norm.py,
    _programs_per_sm); registers must leave room for both."""
    import importlib

    layer_norm = importlib.import_module("kernels.layer_norm")
    for name, c in cases.items():
        if "layer_norm bwd" in name:
            wanted = layer_norm._programs_per_sm(c["num_warps"])
            assert _programs_per_sm(c) >= wanted, (name, c)
            assert c["shared"] * wanted <= SHARED_PER_SM[c["arch"]], (name, c)


def test_layer_norm_persistent_forward_occupancy(cases):
    """The persistent forward, a sweep candidate (bench_layer_norm --sweep, two stages and
    two programs an SM at least), fits two programs an SM at every width, registers and
    shared memory, with the residual's stages too."""
    checked = 0
    for name, c in cases.items():
        if "layer_norm persistent fwd" in name:
            assert _programs_per_sm(c) >= 2 and c["shared"] * 2 <= SHARED_PER_SM[90], (name, c)
            checked += 1
    assert checked >= 4


def test_cross_entropy_fills_the_sms_warps(cases):
    """Four 16-warp programs, all 64 of an SM's warps: what the row kernel, unpipelined,
    hides its loads' latency with (8 values a thread left Triton 3.9's sm90 build two)."""
    low = {name: _programs_per_sm(c) for name, c in cases.items() if "cross_entropy" in name and _programs_per_sm(c) < 4}
    assert not low, f"fewer than four programs an SM: {low}"


def test_ffn_weight_gradients_fit_two_programs_per_sm(cases):
    """Without bias sums in their main loop Hopper's weight-gradient kernels fit two programs
    per SM, one's epilogue overlapping the other's main loop (kernels/ffn.py)."""
    for name in ("sm90 ffn bwd dWproj", "sm90 ffn bwd dWfc"):
        c = cases[name]
        assert _programs_per_sm(c) >= 2 and 2 * c["shared"] <= SHARED_PER_SM[90], (name, c)


def test_attention_dropout_shares_each_philox_call(cases):
    """A Philox call (ten rounds, 20 mul.hi in the PTX) serves 8 of the scores a thread
    holds in the forward and dQ; dK/dV, on the transposed tile, recomputes each call in at
    most 2 threads (_dropout_keep; 4 with the previous layout, 8 with a call per score,
    the first version). Each kernel has two loops (masked, unmasked)."""
    for arch in (90, 80):
        for D in (16, 32, 64, 128):
            tiles = attention._dropout_settings(attention._CONFIGS[(arch // 10, D)], D, arch == 90)
            for name, shared_by in (("fwd", 1), ("bwd dq", 1), ("bwd dkdv", 2)):
                t = getattr(tiles, name.split()[-1])
                extra = cases[f"sm{arch} attention {name} D={D} dropout"]["mul_hi"] - cases[
                    f"sm{arch} attention {name} D={D}"]["mul_hi"]
                calls = extra / 2 / 20  # per thread and loop iteration
                scores = t.BLOCK_M * t.BLOCK_N / (t.num_warps * 32)
                assert calls <= shared_by * scores / 8, (arch, D, name, calls, scores)


def test_index_arithmetic_is_int64(cases):
    """No kernel multiplies an int32 index tensor (a stride times an index passes 2^31 in big
    products: the FFN weight gradients' token index times a 4C row stride did past ~700k
    tokens at C = 768; a head-dim or vocabulary stride times d or the token index did in
    decode attention and sampling, which only the strided cases show: a stride of 1 is
    compiled as a constant). Sampling's and attention dropout's multiplies are Philox's
    32-bit rounds (and dropout's call index, a key tile's number), by design; the same
    attention kernels without dropout are checked."""
    narrow = {name: c["i32_index_muls"] for name, c in cases.items()
              if c["i32_index_muls"] and not any(k in name for k in ("sample draw", "sample gumbel", "dropout"))}
    assert not narrow, f"int32 index multiplies: {narrow}"

"""Triton decode attention (kernels/decode_attention.py) against kernels/reference.py in float64.

Tolerance, FlashAttention's rule: the kernel's error against float64 is at most twice
torch's own error in the same dtype, plus atol + rtol * max|reference|.

On CPU the kernels run in the Triton interpreter (two splits of 16-key tiles), so the
shapes are tiny but put lengths on every edge: 1, the full cache, just past a tile, on a
split boundary, and several different lengths in one batch.
"""
import importlib

import pytest
import torch

from compare import far_apart
from kernels import reference
from kernels.decode_attention import decode_attention

TOLERANCES = [  # dtype, atol, rtol
    pytest.param(torch.float32, 1e-5, 1e-5, id="fp32"),
    pytest.param(torch.float16, 1e-3, 1e-3, id="fp16"),
]
GPU_TOLERANCES = TOLERANCES[1:] + [pytest.param(torch.bfloat16, 5e-3, 5e-3, id="bf16")]

# B, H, S, D, seq_lens
SHAPES = [
    pytest.param(1, 1, 1, 16, [1], id="S1"),
    pytest.param(1, 2, 37, 32, [37], id="B1-full-S37"),
    pytest.param(3, 2, 70, 64, [1, 70, 37], id="B3-ragged"),
    pytest.param(4, 1, 64, 16, [16, 17, 32, 33], id="B4-tile-and-split-edges"),
    pytest.param(2, 3, 50, 32, [49, 2], id="B2-H3"),
]


def _inputs(B, H, S, D, lens, dtype, device):
    q = torch.randn(B, H, D, device=device).to(dtype)
    k = torch.randn(B, H, S, D, device=device).to(dtype)
    v = torch.randn(B, H, S, D, device=device).to(dtype)
    return q, k, v, torch.tensor(lens, device=device)


def _compare(q, k, v, seq_lens, atol, rtol, scale=None, **options):
    """decode_attention within the FlashAttention bound of the float64 reference."""
    ours = decode_attention(q, k, v, seq_lens, scale=scale, **options)
    torch_ = reference.decode_attention(q, k, v, seq_lens, scale=scale, **options)
    f64 = reference.decode_attention(q.double(), k.double(), v.double(), seq_lens, scale=scale, **options)
    assert ours.shape == q.shape and ours.dtype == q.dtype, f"{ours.shape} {ours.dtype}"
    assert torch.isfinite(ours).all(), "not finite"
    err = (ours.double() - f64).abs().max().item()
    torch_err = (torch_.double() - f64).abs().max().item()
    bound = 2 * torch_err + atol + rtol * f64.abs().max().item()
    assert err <= bound, f"error {err:.3g} > {bound:.3g} (torch's error {torch_err:.3g})"


@pytest.mark.parametrize("dtype, atol, rtol", TOLERANCES)
@pytest.mark.parametrize("B, H, S, D, lens", SHAPES)
def test_matches_reference(B, H, S, D, lens, dtype, atol, rtol, device):
    torch.manual_seed(0)
    _compare(*_inputs(B, H, S, D, lens, dtype, device), atol, rtol)


def test_custom_scale_and_int32_lengths(device):
    torch.manual_seed(1)
    q, k, v, lens = _inputs(2, 2, 40, 32, [40, 19], torch.float32, device)
    _compare(q, k, v, lens.to(torch.int32), 1e-5, 1e-5, scale=0.3)


def test_strided_inputs(device):
    """q as a view of a fused projection (as the model hands it over), the caches as a
    window of a longer one: neither is contiguous."""
    torch.manual_seed(2)
    B, H, S, D = 2, 3, 45, 32
    qkv = torch.randn(B, 1, 3, H, D, device=device)
    q = qkv.permute(2, 0, 3, 1, 4)[0, :, :, 0]  # (B, H, D), strides of the fused layout
    k = torch.randn(B, H, S + 20, D, device=device)[:, :, 5 : 5 + S]
    v = torch.randn(B, H, D, S + 20, device=device).transpose(2, 3)[:, :, 7 : 7 + S]
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    _compare(q, k, v, torch.tensor([45, 30], device=device), 1e-5, 1e-5)


@pytest.mark.parametrize("far", ["q", "k_cache", "v_cache", "k_new", "v_new"])
def test_head_dim_offsets_past_2_31(far, device):
    """One tensor laid out with its head dim outermost, a stride over 2^31 / D (any strides
    are taken): d times that stride passes 2^31, and an int32 product read another element
    (50.0 here) in its place, or wrote the new key or value there."""
    torch.manual_seed(8)
    B, H, S, D = 1, 1, 3, 16
    q, k, v, lens = _inputs(B, H, S, D, [S], torch.float16, device)
    k_new, v_new = (torch.randn(B, H, D, device=device).half() for _ in range(2))
    f64 = [t.double() for t in (q, k, v, k_new, v_new)]
    want = reference.decode_attention(f64[0], f64[1], f64[2], lens, k_new=f64[3], v_new=f64[4])
    tensors = dict(q=q, k_cache=k, v_cache=v, k_new=k_new, v_new=v_new)
    stride = -(-2**31 // (D - 1))
    tensors[far] = far_apart(tensors[far], (1,) * (tensors[far].dim() - 1) + (stride,), sentinel=50.0)
    with torch.no_grad():
        ours = decode_attention(*(tensors[n] for n in ("q", "k_cache", "v_cache")), lens,
                                k_new=tensors["k_new"], v_new=tensors["v_new"])
    torch.testing.assert_close(ours.double(), want, atol=1e-2, rtol=1e-2)
    assert torch.equal(tensors["k_cache"][:, :, S - 1], k_new) and torch.equal(tensors["v_cache"][:, :, S - 1], v_new)


def test_matches_causal_attention(device):
    """The training-time path agrees: the last query of a causal attention over a
    sequence's first L tokens sees exactly the L keys decoding attends to."""
    torch.manual_seed(3)
    lens = [7, 33, 1]
    q, k, v, seq_lens = _inputs(3, 2, 33, 16, lens, torch.float32, device)
    ours = decode_attention(q, k, v, seq_lens)
    for b, L in enumerate(lens):
        kb, vb = k[b : b + 1, :, :L].double(), v[b : b + 1, :, :L].double()
        want = reference.attention(q[b : b + 1, :, None].double(), kb, vb, causal=True)[:, :, 0]
        torch.testing.assert_close(ours[b : b + 1].double(), want, atol=1e-5, rtol=1e-5)


def _check_new_kv(B, H, S, D, lens, dtype, device, atol, rtol):
    """With k_new/v_new the kernel writes them at lens - 1 and attends over them: output
    and both caches equal the reference's scatter-then-attend."""
    q, k, v, seq_lens = _inputs(B, H, S, D, lens, dtype, device)
    k_new, v_new = (torch.randn(B, H, D, device=device).to(dtype) for _ in range(2))
    k_ref, v_ref = k.clone(), v.clone()
    ours = decode_attention(q, k, v, seq_lens, k_new=k_new, v_new=v_new)
    want = reference.decode_attention(q, k_ref, v_ref, seq_lens, k_new=k_new, v_new=v_new)
    assert torch.equal(k, k_ref) and torch.equal(v, v_ref), "caches differ"
    for b, L in enumerate(lens):
        assert torch.equal(k[b, :, L - 1], k_new[b]) and torch.equal(v[b, :, L - 1], v_new[b])
    torch.testing.assert_close(ours, want, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype, atol, rtol", TOLERANCES)
@pytest.mark.parametrize("B, H, S, D, lens", SHAPES)
def test_new_key_and_value_written_and_attended(B, H, S, D, lens, dtype, atol, rtol, device):
    torch.manual_seed(7)
    _check_new_kv(B, H, S, D, lens, dtype, device, 10 * atol, 10 * rtol)


def test_new_key_and_value_need_each_other(device):
    q, k, v, lens = _valid(device)
    with pytest.raises(ValueError, match="both k_new and v_new"):
        decode_attention(q, k, v, lens, k_new=q)
    with pytest.raises(ValueError, match="k_new must have"):
        decode_attention(q, k, v, lens, k_new=q[:, :1], v_new=q)
    with pytest.raises(ValueError, match="v_new must have"):
        decode_attention(q, k, v, lens, k_new=q, v_new=q[:, :1])


@pytest.mark.parametrize("grad", ["k_new", "v_new"])
def test_new_key_or_value_under_autograd_is_refused(grad, device):
    """The kernel is forward-only: a new key or value that requires grad (a projection's
    output outside no_grad) is refused as q is, not attended to with its gradient lost."""
    q, k, v, lens = _valid(device)
    new = {"k_new": q.clone(), "v_new": q.clone()}
    new[grad].requires_grad_()
    with pytest.raises(ValueError, match="forward-only"):
        decode_attention(q, k, v, lens, **new)


def test_lengths_outside_cache_are_clamped(device):
    """Lengths cannot be checked without a host sync, so the kernel clamps them: beyond S
    reads the whole cache (never past it), 0 or below gives zeros rather than NaN (or the
    output left unwritten), with several splits or one (S = 8: one tile, so one split,
    which must write those zeros itself)."""
    torch.manual_seed(4)
    for S in (20, 8):
        q, k, v, _ = _inputs(4, 2, S, 16, [1, 1, 1, 1], torch.float32, device)
        out = decode_attention(q, k, v, torch.tensor([S + 5, 0, S, -3], device=device))
        full = decode_attention(q, k, v, torch.tensor([S, S, S, S], device=device))
        assert torch.equal(out[0], full[0]) and torch.equal(out[2], full[2])
        assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.equal(out[3], torch.zeros_like(out[3]))


def test_scores_far_below_zero_with_idle_splits(device):
    """Every score far below zero (q against k, times 3: near -200 in log2 units) and lengths
    that leave splits idle: the combine's row of partials is padded to a power of two of
    splits, and a padded or idle split's maximum must count as -inf, else it sets the
    common maximum at 0, every real split's weight underflows to 0 and the output is 0/0."""
    torch.manual_seed(8)
    B, H, S, D = 3, 2, 40, 16
    q = -3 * (torch.randn(B, H, D, device=device).abs() + 1)
    k = torch.randn(B, H, S, D, device=device).abs() + 1
    v = torch.randn(B, H, S, D, device=device)
    _compare(q, k, v, torch.tensor([10, 40, 17], device=device), 1e-5, 1e-5, scale=1.0)


def test_strided_lengths(device):
    """seq_lens as a strided view (every other entry of a longer tensor): each sequence
    attends over its own length, not over the storage's next entry."""
    torch.manual_seed(9)
    q, k, v, _ = _inputs(3, 2, 40, 16, [1, 1, 1], torch.float32, device)
    _compare(q, k, v, torch.tensor([40, 0, 7, 0, 23, 0], device=device)[::2], 1e-5, 1e-5)


def test_a_length_of_0_writes_no_new_key(device):
    """There is no position for it: the kernel and the reference leave the cache as it was."""
    torch.manual_seed(5)
    q, k, v, _ = _inputs(2, 2, 8, 16, [1, 1], torch.float32, device)
    k_new, v_new = torch.randn_like(q), torch.randn_like(q)
    lens = torch.tensor([0, 3], device=device)
    caches = [(k.clone(), v.clone()) for _ in range(2)]
    with torch.no_grad():
        decode_attention(q, *caches[0], lens, k_new=k_new, v_new=v_new)
        reference.decode_attention(q, *caches[1], lens, k_new=k_new, v_new=v_new)
    for kc, vc in caches:
        assert torch.equal(kc[0], k[0]) and torch.equal(vc[0], v[0])
        assert torch.equal(kc[1, :, 2], k_new[1]) and torch.equal(vc[1, :, 2], v_new[1])


def test_positions_past_int32_are_refused(monkeypatch, device):
    """A cache of 2^30 positions (views: no memory) is refused before anything is launched;
    from 2^31 the kernel's int32 lengths wrapped (and its splits' ends a few tiles short)."""
    monkeypatch.setattr(importlib.import_module("kernels.decode_attention"), "_decode_attention_kernel", None)
    q, k, v, lens = _valid(device, B=1, H=1, S=1)
    with pytest.raises(ValueError, match=r"1073741824 positions must be fewer than 2\^30"):
        decode_attention(q, k.expand(1, 1, 2**30, 16), v.expand(1, 1, 2**30, 16), lens)


def test_positions_just_below_2_30_are_taken(monkeypatch, device):
    """A cache of 2^30 - 1 positions (views: no memory) passes every check and reaches the
    launch: the limit refuses only the sizes whose int32 positions could wrap."""
    class Reached(Exception):
        pass

    class Launch:  # a kernel that stops the call where it would run
        def __getitem__(self, grid):
            raise Reached

    monkeypatch.setattr(importlib.import_module("kernels.decode_attention"), "_decode_attention_kernel", Launch())
    q, k, v, lens = _valid(device, B=1, H=1, S=1)
    with pytest.raises(Reached), torch.no_grad():
        decode_attention(q, k.expand(1, 1, 2**30 - 1, 16), v.expand(1, 1, 2**30 - 1, 16), lens)


def test_empty_batch(device, monkeypatch):
    q, k, v, lens = _inputs(0, 2, 8, 16, [], torch.float32, device)
    assert decode_attention(q, k, v, lens.long()).shape == (0, 2, 16)
    # The GPU's settings share the programs among the B * H pairs: with none, nothing is sized.
    module = importlib.import_module("kernels.decode_attention")
    monkeypatch.setattr(module, "interpreting", lambda: False)
    monkeypatch.setattr(module, "sm_count", lambda index: 132)
    assert decode_attention(q, k, v, lens.long()).shape == (0, 2, 16)



def test_gpu_split_counts_in_interpreter(monkeypatch, device):
    """The GPU's settings (sized by the SM count) give 3 splits here, which the interpreter's
    own (at most 2, always a power of 2) never do: the combine's tile is padded to
    SPLITS_P2 = 4, and each (batch, head) must find its partials at bh * NUM_SPLITS, not at
    the padded count, and mask the padding and the splits a short sequence leaves idle."""
    if device == "cuda":
        pytest.skip("the GPU runs its own settings in the other tests")
    module = importlib.import_module("kernels.decode_attention")
    monkeypatch.setattr(module, "interpreting", lambda: False)
    monkeypatch.setattr(module, "sm_count", lambda index: 4)  # 16 programs over B * H = 6: 3 splits
    B, H, S, D = 2, 3, 90, 128  # 32-key tiles at D = 128: a tile a split
    assert module._settings(B, H, S, D, torch.device(device))[1:3] == (32, 3)
    torch.manual_seed(10)
    _compare(*_inputs(B, H, S, D, [90, 40], torch.float32, device), 1e-5, 1e-5)


def _valid(device="cpu", B=2, H=2, S=8, D=16):
    return (torch.zeros(B, H, D, device=device), torch.zeros(B, H, S, D, device=device),
            torch.zeros(B, H, S, D, device=device), torch.ones(B, dtype=torch.long, device=device))


@pytest.mark.parametrize(
    "change, message",
    [
        pytest.param(lambda q, k, v, l: (q[..., :8], k[..., :8], v[..., :8], l), "head dim 8", id="D8"),
        pytest.param(lambda q, k, v, l: (q.new_zeros(2, 2, 48), k.new_zeros(2, 2, 8, 48), v.new_zeros(2, 2, 8, 48), l),
                     "head dim 48", id="D48"),
        pytest.param(lambda q, k, v, l: (q[:, :1], k, v, l), "k_cache must be", id="H-mismatch"),
        pytest.param(lambda q, k, v, l: (q, k[:1], v[:1], l), r"k_cache must be \(B, H, S, D\) = \(2,", id="B-mismatch"),
        pytest.param(lambda q, k, v, l: (q, k[:, :, :0], v[:, :, :0], l), r"no positions \(S = 0\)", id="S0"),
        pytest.param(lambda q, k, v, l: (q, k, v[:, :, :5], l), "differ", id="S-mismatch"),
        pytest.param(lambda q, k, v, l: (q[:, :, None], k, v, l), "q must be", id="q-4d"),
        pytest.param(lambda q, k, v, l: (q, k, v, l.float()), "seq_lens has dtype", id="float-lens"),
        pytest.param(lambda q, k, v, l: (q, k, v, l[:1]), r"seq_lens must be \(2,\)", id="lens-shape"),
        pytest.param(lambda q, k, v, l: (q, k, v, [1, 1]), "must be a torch.Tensor", id="lens-list"),
        pytest.param(lambda q, k, v, l: (q, k, v.half(), l), "one dtype", id="dtype-mismatch"),
        pytest.param(lambda q, k, v, l: (q, k.to("meta"), v, l), "one device", id="cache-device"),
        pytest.param(lambda q, k, v, l: (q, k, v, l.to("meta")), "seq_lens is on meta", id="lens-device"),
    ],
)
def test_invalid_input(change, message, device):
    with pytest.raises(ValueError, match=message):
        decode_attention(*change(*_valid(device)))


def test_cpu_without_interpreter_points_to_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="kernels.reference.decode_attention"):
        decode_attention(*_valid())


def _random_lengths(B, S, generator):
    """Lengths for B sequences that always include 1 and S (when B allows)."""
    lens = torch.randint(1, S + 1, (B,), generator=generator)
    lens[0] = S
    if B > 1:
        lens[1] = 1
    return lens


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, atol, rtol", GPU_TOLERANCES)
@pytest.mark.parametrize(
    "B, H, S, D",
    [(1, 12, 1024, 64), (32, 12, 2048, 64), (4, 16, 8192, 128), (8, 4, 8192, 32), (3, 1, 4097, 16)],
)
def test_gpu_large(B, H, S, D, dtype, atol, rtol):
    torch.manual_seed(5)
    gen = torch.Generator().manual_seed(5)
    q, k, v, _ = _inputs(B, H, S, D, [1] * B, dtype, "cuda")
    _compare(q, k, v, _random_lengths(B, S, gen).cuda(), atol, rtol)


@pytest.mark.gpu
@pytest.mark.parametrize("B, H, S, D", [(1, 12, 1024, 64), (32, 12, 2048, 64), (3, 2, 4097, 128)])
def test_gpu_new_key_and_value(B, H, S, D):
    torch.manual_seed(8)
    gen = torch.Generator().manual_seed(8)
    _check_new_kv(B, H, S, D, _random_lengths(B, S, gen).tolist(), torch.bfloat16, "cuda", 2e-2, 2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_cuda_graph_replay(dtype):
    """Captured once, replayed as the lengths (and the query) change in place: the call
    must read seq_lens on the device and size nothing by it."""
    torch.manual_seed(6)
    B, H, S, D = 4, 12, 2048, 64
    q, k, v, seq_lens = _inputs(B, H, S, D, [5, 1, 300, 2048], dtype, "cuda")
    decode_attention(q, k, v, seq_lens)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(q, k, v, seq_lens)
    gen = torch.Generator().manual_seed(6)
    for lens in ([6, 2, 301, 2048], [2048, 1, 1, 1], [64, 65, 1023, 1500], _random_lengths(B, S, gen).tolist()):
        seq_lens.copy_(torch.tensor(lens))
        q.copy_(torch.randn_like(q))
        graph.replay()
        want = reference.decode_attention(q.double(), k.double(), v.double(), seq_lens)
        torch_err = (reference.decode_attention(q, k, v, seq_lens).double() - want).abs().max().item()
        err = (out.double() - want).abs().max().item()
        assert err <= 2 * torch_err + 5e-3 + 5e-3 * want.abs().max().item(), f"lengths {lens}: error {err:.3g}"


def test_split_counters_are_left_at_zero(device):
    """The last split of each (batch, head) combines and re-zeroes its counter, so calls in
    a row (graph replays) stay right as the lengths change in place."""
    from kernels.decode_attention import _COUNTERS

    torch.manual_seed(3)
    q, k, v, lens = _inputs(2, 2, 64, 16, [5, 64], torch.float32, device)
    for step in range(3):
        _compare(q, k, v, lens, 1e-5, 1e-5)
        lens += 7 * step
        lens.clamp_(max=64)
    assert not any(c.any() for c in _COUNTERS[q.device])


def test_outgrown_split_counters_are_kept_for_graphs_that_hold_them():
    from kernels.decode_attention import _COUNTERS, _counters

    device = torch.device("cpu")
    small = _counters(device, 1)
    address = small.data_ptr()
    del small
    bigger = _counters(device, _COUNTERS[device][-1].numel() + 1)
    assert bigger.data_ptr() != address
    assert any(c.data_ptr() == address for c in _COUNTERS[device])


# Grouped-query attention (enable_gqa): caches with H // G heads, each read by G query heads.

@pytest.mark.parametrize("dtype, atol, rtol", TOLERANCES)
@pytest.mark.parametrize("B, H, Hk, S, D, lens", [
    pytest.param(3, 4, 2, 70, 64, [1, 70, 37], id="H4-Hk2-ragged"),
    pytest.param(2, 3, 1, 50, 32, [49, 2], id="MQA"),
])
def test_grouped_query_attention(B, H, Hk, S, D, lens, dtype, atol, rtol, device):
    torch.manual_seed(5)
    q = torch.randn(B, H, D, device=device).to(dtype)
    k, v = (torch.randn(B, Hk, S, D, device=device).to(dtype) for _ in range(2))
    _compare(q, k, v, torch.tensor(lens, device=device), atol, rtol, enable_gqa=True)


def test_grouped_query_attention_writes_each_new_key_once(device):
    """k_new and v_new (B, H // G, D) go into the shared caches at lens - 1, and every
    query head of the group attends to them: output and caches as the reference's."""
    torch.manual_seed(6)
    B, H, Hk, S, D, lens = 3, 6, 2, 40, 16, [1, 40, 17]
    q = torch.randn(B, H, D, device=device)
    k, v = (torch.randn(B, Hk, S, D, device=device) for _ in range(2))
    k_new, v_new = (torch.randn(B, Hk, D, device=device) for _ in range(2))
    seq_lens = torch.tensor(lens, device=device)
    k_ref, v_ref = k.clone(), v.clone()
    ours = decode_attention(q, k, v, seq_lens, k_new=k_new, v_new=v_new, enable_gqa=True)
    want = reference.decode_attention(q, k_ref, v_ref, seq_lens, k_new=k_new, v_new=v_new, enable_gqa=True)
    assert torch.equal(k, k_ref) and torch.equal(v, v_ref), "caches differ"
    torch.testing.assert_close(ours, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("change, message", [
    pytest.param(lambda q, k, v: (q, k, v, {}), r"to match q, got \(2, 2, 8, 16\); or pass enable_gqa=True",
                 id="no-flag"),
    pytest.param(lambda q, k, v: (q[:, :3], k, v, {"enable_gqa": True}), r"q's heads \(3\) to be a multiple of the caches' \(2\)",
                 id="not-a-multiple"),
    pytest.param(lambda q, k, v: (q, k, v, {"enable_gqa": True, "k_new": q, "v_new": q}),
                 r"k_new must have shape \(2, 2, 16\)", id="new-key-with-q-heads"),
])
def test_grouped_query_attention_invalid(change, message, device):
    q = torch.zeros(2, 4, 16, device=device)
    k = v = torch.zeros(2, 2, 8, 16, device=device)
    q, k, v, options = change(q, k, v)
    with pytest.raises(ValueError, match=message):
        decode_attention(q, k, v, torch.ones(2, dtype=torch.long, device=device), **options)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, atol, rtol", GPU_TOLERANCES)
@pytest.mark.parametrize("B, H, Hk, S, D", [(1, 32, 8, 4096, 128), (16, 12, 4, 1024, 64), (4, 8, 1, 2049, 64)])
def test_grouped_query_attention_gpu(B, H, Hk, S, D, dtype, atol, rtol):
    gen = torch.Generator().manual_seed(9)
    q = torch.randn(B, H, D, device="cuda").to(dtype)
    k, v = (torch.randn(B, Hk, S, D, device="cuda").to(dtype) for _ in range(2))
    _compare(q, k, v, _random_lengths(B, S, gen).cuda(), atol, rtol, enable_gqa=True)

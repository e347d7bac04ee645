"""kernels.sample against exact top-k sets (torch.topk) and float64 softmax probabilities.

A sampler has no output to compare element by element, so the oracle is what a draw must
satisfy: top_k=1 is the argmax; every draw lies in the kept set and, at a high temperature,
every member of it gets drawn; draw frequencies match softmax(logits / T) over the kept set
within a few standard errors. In the interpreter each program costs milliseconds, so the
shapes stay small; the vocabulary-sized cases run on the GPU.
"""
import pytest
import torch

from compare import far_apart
from kernels import sample

DTYPES = [torch.float32, torch.float16]


def state(B: int, device: str, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor([seed], device=device), torch.zeros(B, dtype=torch.long, device=device)


def kept_probs(row: torch.Tensor, temperature: float, top_k: int | None) -> torch.Tensor:
    """float64 probabilities of sampling each token: softmax over the logits >= the k-th largest."""
    x = row.double() / temperature
    if top_k is not None:
        x = x.masked_fill(x < torch.topk(x, top_k).values[-1], float("-inf"))
    return torch.softmax(x, dim=0)


def assert_frequencies(tokens: torch.Tensor, probs: torch.Tensor, sigmas: float = 4.5, min_expected: float = 0) -> None:
    """No draw outside the kept set; each token expected at least min_expected times is drawn
    at its probability within `sigmas` standard errors, and so are the others together."""
    n = tokens.numel()
    freq = torch.bincount(tokens.flatten().cpu(), minlength=probs.numel()).double() / n
    probs = probs.cpu()
    assert (freq[probs == 0] == 0).all(), "drew a token outside the kept set"
    rare = (probs * n < min_expected) & (probs > 0)
    freq = torch.cat([freq[~rare], freq[rare].sum().view(1)])
    probs = torch.cat([probs[~rare], probs[rare].sum().view(1)])
    se = (probs * (1 - probs) / n).sqrt().clamp(min=1e-12)
    z = ((freq - probs).abs() / se)[probs > 0]
    assert z.max() < sigmas, f"frequencies {freq.tolist()[:20]} vs probabilities {probs.tolist()[:20]}"


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
def test_top_1_is_the_argmax(device, dtype):
    torch.manual_seed(0)
    logits = torch.randn(6, 37, device=device).to(dtype)
    seed, offsets = state(6, device)
    tokens = sample(logits, seed, offsets, temperature=3.0, top_k=1)
    assert tokens.shape == (6, 1) and tokens.dtype == torch.int64
    assert tokens[:, 0].tolist() == logits.float().argmax(dim=1).tolist()


@pytest.mark.parametrize("V, k", [(37, 5), (200, 7)], ids=["one-chunk", "four-chunks"])
def test_draws_cover_exactly_the_top_k(device, V, k):
    """At a high temperature the kept tokens are near-uniform, so 40 draws reach all k."""
    torch.manual_seed(1)
    row = torch.randn(V, device=device)
    seed, offsets = state(40, device)
    tokens = sample(row.expand(40, V), seed, offsets, temperature=1e4, top_k=k)
    assert set(tokens[:, 0].tolist()) == set(torch.topk(row, k).indices.tolist())


def test_ties_at_the_kth_logit_are_all_kept(device):
    # The 2nd largest value (2.0) is shared by three tokens: all of them stay, as in
    # gpt.generate.filter_logits. Negative, -inf and huge negative logits sort correctly.
    row = torch.tensor([-1e9, 2.0, -3.0, 3.0, 2.0, float("-inf"), 2.0, 1.9, -0.0], device=device)
    seed, offsets = state(64, device)
    tokens = sample(row.expand(64, -1), seed, offsets, temperature=1e4, top_k=2)
    assert set(tokens[:, 0].tolist()) == {1, 3, 4, 6}


def test_top_1_among_many_close_candidates_is_the_argmax(device):
    """40 logits within 0.04 of the max, 60 far below: the narrowest window holds the 40,
    more candidates than the interpreter's draw keeps in registers (32), so the k-th largest
    is found through scratch; top-1 must still be the argmax."""
    row = torch.cat([torch.arange(40, device=device) * 1e-3 + 10.0, torch.zeros(60, device=device)])
    seed, offsets = state(16, device)
    tokens = sample(row.expand(16, -1), seed, offsets, temperature=1e4, top_k=1)
    assert tokens[:, 0].tolist() == [39] * 16


def test_top_k_reaching_far_below_the_max(device):
    """The windows narrow from the row's max by multiples of (max - mean); the last holds
    every logit. Here the top 33 reach 5 logits far below that spread (30 at 0, 5 at -100,
    mean -14): all 5 stay (ties at the 33rd), so the kept set is the whole row."""
    row = torch.tensor([0.0] * 30 + [-100.0] * 5, device=device)
    seed, offsets = state(60, device)
    tokens = sample(row.expand(60, -1), seed, offsets, temperature=1e4, top_k=33)
    assert set(tokens[:, 0].tolist()) & set(range(30, 35))


def test_flat_rows_go_through_scratch(device):
    """A row of equal logits keeps every token (ties), more candidates than the registers
    hold (32 in the interpreter, 2048 on a GPU): the scratch path must still draw across all."""
    V = 100 if device == "cpu" else 5000
    seed, offsets = state(24, device)
    tokens = sample(torch.zeros(24, V, device=device), seed, offsets, temperature=1.0, top_k=3)
    drawn = set(tokens[:, 0].tolist())
    assert len(drawn) >= 18 and max(drawn) >= V // 2  # 24 uniform draws: ~21 distinct


def test_large_negative_logits(device):
    """GPT-2's logits sit around -100: the windows are in logit units, not relative."""
    torch.manual_seed(5)
    row = torch.randn(300, device=device) * 3 - 100
    seed, offsets = state(40, device)
    tokens = sample(row.expand(40, -1), seed, offsets, temperature=1e4, top_k=6)
    assert set(tokens[:, 0].tolist()) == set(torch.topk(row, 6).indices.tolist())


@pytest.mark.parametrize("top_k", [None, 4], ids=["all", "top-4"])
def test_frequencies_match_the_softmax(device, top_k):
    row = torch.tensor([-3.0, 0.5, -0.25, 2.0, 1.0, -1e9, float("-inf"), 1.5, 0.1, -2.0], device=device)
    B, temperature = 250, 0.5
    seed, offsets = state(B, device, seed=3)
    tokens = sample(row.expand(B, -1), seed, offsets, temperature=temperature, top_k=top_k)
    assert_frequencies(tokens, kept_probs(row, temperature, top_k))


@pytest.mark.parametrize("top_k", [None, 8], ids=["all", "top-8-tied"])
def test_frequencies_with_a_long_tail(device, top_k):
    """One likely token and a tail of 30 equal ones (an LM's usual row): the tail's mass is
    drawn at the softmax's 0.6. Frequencies of a few tokens of distinct logits cannot tell
    the Gumbel noise from its negation, which keeps every two tokens' odds (the difference
    of two Gumbels is logistic either way) yet draws the top token here twice as often.
    With top-8 the tail's ties at the 8th logit all stay."""
    row = torch.tensor([3.0] + [0.0] * 30, device=device)
    B = 120
    seed, offsets = state(B, device, seed=4)
    tokens = sample(row.expand(B, -1), seed, offsets, temperature=1.0, top_k=top_k)
    assert_frequencies(tokens, kept_probs(row, 1.0, None), min_expected=10)


def test_strided_logits_and_out_buffer(device):
    torch.manual_seed(2)
    wide = torch.randn(3, 2 * 37, device=device)
    logits = wide[:, ::2]  # a strided view along the vocabulary
    columns = torch.full((3, 2), -1, dtype=torch.long, device=device)
    out = columns[:, :1]  # a column of a wider tensor: row stride 2
    seed, offsets = state(3, device)
    assert sample(logits, seed, offsets, 1.0, top_k=1, out=out) is out
    assert out[:, 0].tolist() == logits.argmax(dim=1).tolist()
    assert columns[:, 1].tolist() == [-1] * 3


@pytest.mark.parametrize("top_k", [None, 1], ids=["all", "top-1"])
def test_vocabulary_offsets_past_2_31(device, top_k):
    """Logits laid out as a transposed (V, B) tensor (vocabulary stride B): token index
    times that stride passes 2^31 (V = 50257 and B = 42732 would), and an int32 product
    read another token's logit (-inf here) in its place."""
    values = torch.tensor([[-100.0, -100.0, 0.0], [0.0, -100.0, -100.0]], device=device)
    logits = far_apart(values.half(), (1, 3 * 2**29), sentinel=float("-inf"))
    seed, offsets = state(2, device)
    assert sample(logits, seed, offsets, 1.0, top_k=top_k)[:, 0].tolist() == [2, 0]


@pytest.mark.parametrize("top_k", [None, 20], ids=["all", "top-20"])
def test_same_state_same_tokens_and_offsets_advance(device, top_k):
    """Each path (top-k or not) advances the counters itself: a second call draws afresh."""
    torch.manual_seed(3)
    logits = torch.randn(4, 50, device=device) / 4
    seed, offsets = state(4, device, seed=11)
    first = sample(logits, seed, offsets, 1.0, top_k)
    assert offsets.tolist() == [1, 1, 1, 1]
    second = sample(logits, seed, offsets, 1.0, top_k)
    assert offsets.tolist() == [2, 2, 2, 2]
    offsets.zero_()
    assert torch.equal(sample(logits, seed, offsets, 1.0, top_k), first)
    assert not torch.equal(first, second)  # 4 draws from 20+ near-even tokens: equal with chance < 1e-5 (fixed seed)
    other = sample(logits, torch.tensor([12], device=device), torch.zeros_like(offsets), 1.0, top_k)
    assert not torch.equal(first, other)


def test_extreme_temperatures_and_other_scalar_types(device):
    """A tiny temperature gives the argmax (x / T overflowed to +inf for every large logit,
    and the first such token won); a huge one never draws a -inf (banned) logit (-inf * 0
    was NaN, which won); numpy and 0-d tensor scalars are taken as the numbers they are."""
    import numpy as np

    logits = torch.tensor([[1.0, 2.0, 3.0, 50.0, 4.0]], device=device)
    wide = torch.randn(1, 50, generator=torch.Generator().manual_seed(0)).to(device)
    for top_k in (None, 3):
        assert sample(logits, *state(1, device), temperature=1e-40, top_k=top_k).item() == 3
        assert sample(wide, *state(1, device), temperature=1e-40, top_k=top_k).item() == wide.argmax().item()
    banned = torch.full((1, 40), float("-inf"), device=device)
    banned[0, 30:33] = torch.tensor([1.0, 2.0, 3.0])
    for top_k in (None, 5):
        drawn = {sample(banned, *state(1, device, seed), temperature=1e300, top_k=top_k).item() for seed in range(8)}
        assert drawn <= {30, 31, 32}, drawn
    for scalars in (dict(temperature=np.float32(0.7), top_k=np.int64(2)), dict(temperature=torch.tensor(0.7))):
        assert sample(logits, *state(1, device), **scalars).item() in (3, 4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=0.0), "temperature must be a positive finite number"),
        (dict(temperature=float("inf")), "temperature must be a positive finite number"),
        (dict(temperature="hot"), "temperature must be a positive finite number"),
        (dict(temperature=float("nan")), "temperature must be a positive finite number"),
        (dict(top_k=0), "top_k must be an int >= 1"),
        (dict(top_k=2.5), "top_k must be an int >= 1"),
        (dict(top_k=True), "top_k must be an int >= 1"),
        (dict(logits=torch.zeros(2, 5, dtype=torch.long)), "dtype torch.int64"),
        (dict(logits=torch.zeros(2, 3, 5)), "logits must be (B, V)"),
        (dict(logits=torch.zeros(2, 0)), "logits must be (B, V) with V >= 1"),
        (dict(seed=torch.zeros(1, dtype=torch.int32)), "seed must be an int64 tensor"),
        (dict(offsets=torch.zeros(3, dtype=torch.long)), "offsets must be an int64 tensor of shape (2,)"),
        (dict(offsets=lambda d: torch.zeros(2, 2, dtype=torch.long, device=d)[:, 0]), "offsets must be contiguous"),
        (dict(seed=lambda d: torch.zeros(1, dtype=torch.long, device="meta")), "seed is on meta but logits on"),
        # The kernels store int64 tokens, one a row: another dtype or shape would be overrun.
        (dict(out=torch.zeros(2, 1, dtype=torch.int32)), "out must be an int64 tensor of shape (2, 1)"),
        (dict(out=torch.zeros(2, dtype=torch.long)), "out must be an int64 tensor of shape (2, 1)"),
        # Rows past 2^32 counters would share noise (as views: no memory needed).
        (dict(logits=lambda d: torch.zeros(1, 1, device=d).expand(65536, 65536),
              offsets=lambda d: torch.zeros(65536, dtype=torch.long, device=d)),
         "batch x vocabulary (65536 x 65536) must be below 2^32"),
    ],
)
def test_bad_input_is_a_value_error(device, kwargs, message):
    args = dict(logits=torch.zeros(2, 5), seed=torch.zeros(1, dtype=torch.long), offsets=torch.zeros(2, dtype=torch.long))
    args = {k: v.to(device) if isinstance(v, torch.Tensor) else v(device) if callable(v) else v
            for k, v in (args | kwargs).items()}
    with pytest.raises(ValueError) as e:
        sample(args.pop("logits"), args.pop("seed"), args.pop("offsets"), **args)
    assert message in str(e.value)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("top_k", [1, 50, 200, None])
def test_gpt2_vocabulary_gpu(dtype, top_k):
    """50257 logits of GPT-2's scale (bf16 rounding makes ties at the k-th value common):
    100k draws (25 calls of 4000 rows) match the float64 softmax over the kept set."""
    torch.manual_seed(4)
    row = (torch.randn(50257, device="cuda") * 2).to(dtype)
    B = 4000
    seed, offsets = state(B, "cuda", seed=5)
    tokens = torch.cat([sample(row.expand(B, -1), seed, offsets, temperature=0.8, top_k=top_k) for _ in range(25)])
    # Tokens expected fewer than 20 times are pooled: the normal approximation needs counts.
    assert_frequencies(tokens, kept_probs(row, 0.8, top_k), sigmas=5.5, min_expected=20)


@pytest.mark.parametrize("top_k", [None, 8], ids=["all", "top-8"])
def test_the_noise_is_finite_at_the_largest_draw(device, top_k):
    """Philox gives token 30 of row 0 the bits 0xFFFFFFxx at seed 123, offset 151690: the
    largest uniform the noise is made from. A uniform that rounds to 1.0 (24 bits plus a
    half do, in fp32) made that token's noise +inf, so it was drawn whatever its logit
    (a banned -inf one too): once in ~330 draws over GPT-2's vocabulary. Here its chance
    is ~1e-14, and it is among the top 8."""
    logits = torch.full((1, 64), float("-inf"), device=device)
    logits[0, :7] = 0.0
    logits[0, 30] = -30.0
    seed, offsets = torch.tensor([123], device=device), torch.tensor([151690], device=device)
    assert sample(logits, seed, offsets, temperature=1.0, top_k=top_k).item() != 30


@pytest.mark.parametrize("top_k", [None, 8], ids=["all", "top-8"])
def test_the_noise_is_finite_at_the_smallest_draw(device, top_k):
    """The other end: Philox gives token 24 of row 0 the bits 0x1b2 (below 2^9) at seed 123,
    offset 35947, so its 23 bits are 0. Without the half step the uniform was 0 and the noise
    -inf: the only finite logit lost to the banned (-inf) ones, the first of which was drawn."""
    logits = torch.full((1, 64), float("-inf"), device=device)
    logits[0, 24] = 0.0
    seed, offsets = torch.tensor([123], device=device), torch.tensor([35947], device=device)
    assert sample(logits, seed, offsets, temperature=1.0, top_k=top_k).item() == 24


@pytest.mark.parametrize("top_k", [None, 5], ids=["all", "top-5"])
def test_ties_at_the_max_are_drawn_evenly_at_low_temperature(device, top_k):
    """Three logits tied at the max (two in one chunk, one in another: chunks are 64 wide in
    the interpreter) must each be drawn a third of the time however low the temperature.
    As logits / T + noise, 30 / 1e-6 rounded to a multiple of 2, and the tied noises so
    often compared equal that the lowest index won most draws."""
    row = torch.linspace(-5.0, 20.0, 100, device=device)
    row[[3, 40, 70]] = 30.0
    B = 300
    seed, offsets = state(B, device, seed=5)
    tokens = sample(row.expand(B, -1), seed, offsets, temperature=1e-6, top_k=top_k)
    probs = torch.zeros(100, dtype=torch.float64)
    probs[[3, 40, 70]] = 1 / 3
    assert_frequencies(tokens, probs)


def test_negative_zero_ties_with_zero_at_the_kth_logit(device):
    """-0.0 == 0.0: at the k-th place both stay, as in gpt.generate.filter_logits (their
    bit patterns differ, and -0.0's once sorted below)."""
    row = torch.tensor([1.0, -0.0, -1.0, 0.0, -2.0], device=device)
    seed, offsets = state(64, device)
    tokens = sample(row.expand(64, -1), seed, offsets, temperature=1e4, top_k=2)
    assert set(tokens[:, 0].tolist()) == {0, 1, 3}


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # -inf - -inf in the interpreter
def test_chunks_without_top_k_are_put_on_the_rows_max(device):
    """Without top-k each chunk scores its logits against its own max and _pick_best_kernel
    puts the chunks back on the row's, so tokens in different chunks (64 logits each in the
    interpreter) are drawn at the row's softmax; a chunk of banned (-inf) logits only, its max
    -inf, is never drawn. The logits sit near GPT-2's -100, the last chunk partial. The other
    tests draw among one chunk, or chunks sharing one max, where the shift cancels."""
    chunk = 64 if device == "cpu" else 2048
    V = 2 * chunk + 62
    row = torch.full((V,), float("-inf"), device=device)
    row[5], row[2 * chunk + 3], row[V - 1] = -100.0, -101.5, -100.5  # chunk 1 holds only -inf
    B = 64
    seed, offsets = state(B, device, seed=9)
    tokens = sample(row.expand(B, -1), seed, offsets, temperature=1.0)
    assert_frequencies(tokens, kept_probs(row, 1.0, None))

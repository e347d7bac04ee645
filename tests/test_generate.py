import math
import re

import pytest
import torch

from gpt import GPT, GPTConfig, ops
from gpt.generate import DRAW_GRAPHS, Decoder, GenerationError, filter_logits, generate, generate_uncached, sample_next
from gpt.model import KVCache
from kernels import reference


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.tensor([[1.0, 4.0, 3.0, 0.0, 2.0]])
    kept = torch.isfinite(filter_logits(logits, top_k=2))
    assert kept.tolist() == [[False, True, True, False, False]]


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])  # sorted: 0.5, 0.3, 0.15, 0.05
    logits = probs.log()
    assert torch.isfinite(filter_logits(logits, top_p=0.75)).tolist() == [[False, True, False, True]]
    assert torch.isfinite(filter_logits(logits, top_p=0.85)).tolist() == [[True, True, False, True]]
    assert torch.isfinite(filter_logits(logits, top_p=0.1)).tolist() == [[False, True, False, False]]
    # Filtered sampling only ever returns kept tokens.
    gen = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, 1.0, top_p=0.75, generator=gen).item() for _ in range(200)}
    assert draws == {1, 3}


def test_top_p_stops_at_the_token_whose_mass_reaches_it_exactly():
    """The smallest set with mass >= top_p: a set whose mass equals top_p is the nucleus (the
    token after it is dropped). Powers of two, so that fp32 sums them exactly."""
    logits = torch.tensor([[0.125, 0.5, 0.125, 0.25]]).log()
    assert torch.isfinite(filter_logits(logits, top_p=0.5)).tolist() == [[False, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.75)).tolist() == [[False, True, False, True]]


def test_a_top_p_of_one_keeps_every_token():
    """sample.py's default --top-p 1.0 filters nothing: here the fp32 mass before the last
    token rounds to 1.0, which would drop it (probability 4e-8) as past the nucleus."""
    logits = torch.tensor([[5.0, 0.0, -12.0]])
    assert torch.equal(filter_logits(logits, top_p=1.0), logits)


def test_top_p_keeps_every_logit_tied_with_the_last_one_kept():
    """As top_k keeps every logit tied with the k-th: which of equal logits (bf16 logits tie
    often) torch.sort put first decided which stayed, so one of two equally likely tokens
    was never drawn."""
    logits = torch.tensor([[2.0, 1.0, 2.0, 0.5, 2.0, -1.0]])
    assert torch.isfinite(filter_logits(logits, top_p=0.1)).tolist() == [[True, False, True, False, True, False]]
    probs = torch.tensor([[0.1, 0.4, 0.1, 0.3, 0.1]])  # sorted: 0.4, 0.3, then three tied at 0.1
    assert torch.isfinite(filter_logits(probs.log(), top_p=0.75)).tolist() == [[True, True, True, True, True]]
    assert torch.isfinite(filter_logits(probs.log(), top_p=0.65)).tolist() == [[False, True, False, True, False]]


def test_a_top_p_below_fp32_range_keeps_the_top_token():
    """sample.py takes any --top-p above 0: one that rounds to 0 in the logits' fp32 (1e-50)
    dropped every token, and the sample ended in the error for diverged weights."""
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    assert torch.isfinite(filter_logits(logits, top_p=1e-50)).tolist() == [[False, True, False]]
    assert sample_next(logits, 1.0, top_p=1e-50).item() == 1


def test_top_p_applies_on_top_of_top_k():
    """sample.py's defaults filter by both (top-k 200): neither may be dropped."""
    logits = torch.tensor([[0.6, 0.3, 0.05, 0.05]]).log()
    gen = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, 1.0, top_k=3, top_p=0.5, generator=gen).item() for _ in range(200)}
    assert draws == {0}
    assert {sample_next(logits, 1.0, top_k=1, top_p=1.0, generator=gen).item() for _ in range(50)} == {0}


def test_greedy_is_argmax():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 0.0]])
    assert sample_next(logits, temperature=0).flatten().tolist() == [1, 0]


def test_a_temperature_below_greedy_below_is_the_argmax():
    """1e-39 is above 0, but dividing the logits by it overflows fp32 (inf, then NaN in the
    softmax): every temperature below GREEDY_BELOW takes the argmax."""
    logits = torch.tensor([[1.0, 10.0, 5.0], [3.0, 0.0, -1.0]])
    assert sample_next(logits, temperature=1e-39).flatten().tolist() == [1, 0]


@pytest.fixture(params=["learned", "sinusoidal"])
def model(request):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=30, block_size=24, n_layer=2, n_head=2, n_embd=32, kernels="torch", pos_embedding=request.param)
    return GPT(cfg).eval()


def test_cached_logits_equal_recomputing_the_sequence(model):
    torch.manual_seed(1)
    seq = torch.randint(0, 30, (2, 20))
    full = model(seq)
    cache = KVCache(model.config, 2, "cpu", torch.float32)
    prefill = model(seq[:, :8], cache=cache)
    cache.lengths.fill_(8)
    torch.testing.assert_close(prefill, full[:, :8], rtol=1e-5, atol=1e-5)
    for t in range(8, 20):
        step = model(seq[:, t : t + 1], cache=cache)
        cache.lengths += 1
        torch.testing.assert_close(step[:, 0], full[:, t], rtol=1e-5, atol=1e-5)


def test_greedy_cached_equals_uncached(model):
    prompt = torch.randint(0, 30, (1, 5), generator=torch.Generator().manual_seed(2))
    slow = generate_uncached(model, prompt, 15, temperature=0)[0, 5:].tolist()
    fast = generate(model, [prompt[0].tolist()], 15, temperature=0)[0]
    assert fast == slow


def test_the_uncached_loop_crops_filters_and_seeds_as_generate(model):
    """generate_uncached, the oracle and benchmark baseline: a prompt longer than the context
    reads its last block_size tokens, top_k and top_p filter its draws (top_k=1 and a top_p
    that keeps only the top token are greedy) and its generator seeds them."""
    S = model.config.block_size
    prompt = torch.arange(40).remainder(30)[None]
    greedy = generate_uncached(model, prompt[:, -S:], 6, temperature=0)[0, S:].tolist()
    assert generate_uncached(model, prompt, 6, temperature=0)[0, 40:].tolist() == greedy
    short = prompt[:, -5:]
    greedy = generate_uncached(model, short, 12, temperature=0)[0, 5:].tolist()

    def run(seed, **kw):
        return generate_uncached(model, short, 12, generator=torch.Generator().manual_seed(seed), **kw)[0, 5:].tolist()
    assert run(0, top_k=1) == greedy and run(0, top_p=1e-9) == greedy
    assert run(1) == run(1) and run(1) != run(2)


def test_a_batch_of_different_lengths_equals_one_at_a_time(model):
    prompts = [[1, 2, 3, 4, 5, 6, 7], [8], [9, 10, 11]]
    batched = generate(model, prompts, 10, temperature=0)
    for p, out in zip(prompts, batched):
        assert generate(model, [p], 10, temperature=0)[0] == out


def test_sliding_past_block_size(model):
    prompt = list(range(20))  # block_size is 24
    out = generate(model, [prompt, prompt[:3]], 40, temperature=0)
    assert [len(o) for o in out] == [40, 40]
    # Until the window first slides, the tokens equal the uncached loop's.
    slow = generate_uncached(model, torch.tensor([prompt]), 4, temperature=0)[0, 20:].tolist()
    assert out[0][:4] == slow


def test_seeded_sampling_is_reproducible(model):
    run = lambda seed: generate(model, [[1, 2, 3]] * 3, 12, top_k=10, generator=torch.Generator().manual_seed(seed))
    a, b, c = run(1), run(1), run(2)
    assert a == b and a != c
    assert a[0] != a[1] or a[1] != a[2]  # parallel samples differ from each other


@pytest.mark.parametrize("kernels, top_p",
                         [("torch", None), ("torch", 0.9), pytest.param("triton", 0.9, marks=pytest.mark.triton)],
                         ids=["torch", "torch-top-p", "top-p-on-triton"])
def test_a_sample_does_not_depend_on_its_batch(kernels, top_p, device):
    """Under one seed, the first sample is the same alone or among others (sample.py
    --num-samples 1 or 3), also where torch draws: each row has its own generator."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=30, block_size=24, n_layer=1, n_head=2, n_embd=32, kernels=kernels)
    model = GPT(cfg).to(device if kernels == "triton" else "cpu").eval()
    run = lambda batch: generate(model, [[1, 2, 3]] * batch, 12, top_p=top_p,
                                 generator=torch.Generator().manual_seed(7))
    alone, three = run(1), run(3)
    assert three[0] == alone[0]
    assert three[1] != three[0] or three[2] != three[0]  # still different samples


def test_end_of_text_and_stop_callback(model):
    prompt = [[1, 2, 3]]
    free = generate(model, prompt, 12, temperature=0)[0]
    eot = free[4]
    assert generate(model, prompt, 12, temperature=0, eot_token=eot)[0] == free[: free.index(eot)]
    stopped = generate(model, prompt, 12, temperature=0, stop=lambda b, new: len(new) >= 3, check_every=1)[0]
    assert stopped == free[:3]


def test_a_stopped_sequence_ends_there_whatever_its_batch(model):
    """A sequence that stop() ended kept every token drawn while the others went on: alone
    it ended at the check that found its stop, among longer ones at max_new_tokens."""
    first = lambda b, new: b == 0 and len(new) >= 3
    alone = generate(model, [[1, 2, 3]], 20, temperature=0, stop=first, check_every=4)
    together = generate(model, [[1, 2, 3], [4, 5]], 20, temperature=0, stop=first, check_every=4)
    assert len(alone[0]) == 4 and together[0] == alone[0]
    assert together[1] == generate(model, [[4, 5]], 20, temperature=0)[0]


def test_the_output_grows_as_tokens_come(model):
    """max_new_tokens is a bound, not a size to reserve: 10^12 (8 TB of token ids) with a
    stop string that ends the sample at once; and a sample past the first buffer."""
    out = generate(model, [[1, 2]], max_new_tokens=10**12, stop=lambda b, new: len(new) >= 3)
    assert 3 <= len(out[0]) <= 16
    long = generate(model, [[1, 2]], max_new_tokens=2500, temperature=0)
    assert len(long[0]) == 2500 and long[0][:100] == generate(model, [[1, 2]], max_new_tokens=100, temperature=0)[0]


def test_a_model_in_train_mode_samples_without_dropout():
    """GPT(config) starts in train mode, and so is a model mid-training: its dropout stayed on
    while sampling, so greedy decoding gave other tokens at each run. Both loops sample in
    eval mode and leave the model's modes as they found them."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=30, block_size=24, n_layer=2, n_head=2, n_embd=32, kernels="torch", dropout=0.5)
    model = GPT(cfg).eval()
    prompt = [[1, 2, 3]]
    want = generate(model, prompt, 10, temperature=0)
    model.train()
    model.transformer.h[0].mlp.eval()  # a mode set apart is kept too
    assert generate(model, prompt, 10, temperature=0) == want
    assert generate_uncached(model, torch.tensor(prompt), 10, temperature=0)[:, 3:].tolist() == want
    assert model.training and not model.transformer.h[0].mlp.training and model.transformer.h[1].mlp.training


def test_decoder_is_reusable(model):
    decoder = Decoder(model, 1)
    a = generate(model, [[4, 5]], 6, temperature=0, decoder=decoder)
    b = generate(model, [[4, 5]], 6, temperature=0, decoder=decoder)
    assert a == b


def test_a_full_sequence_slides_alone(model, monkeypatch):
    """When one sequence fills the context, the others keep theirs: no sample depends on its batch."""
    full, short = list(range(24)), [5, 7] * 10  # block_size 24; short has 20 tokens and room
    prefills = []
    prefill = Decoder.prefill
    monkeypatch.setattr(Decoder, "prefill", lambda self, seqs: prefills.append([len(s) for s in seqs]) or prefill(self, seqs))
    together = generate(model, [full, short], 10, temperature=0)
    assert prefills[:2] == [[24, 20], [12, 21]]  # the full one slides to half; the short one keeps all it had
    assert together[1] == generate(model, [short], 10, temperature=0)[0]
    assert together[0] == generate(model, [full], 10, temperature=0)[0]


def test_a_context_of_one_token_generates():
    m = GPT(GPTConfig(vocab_size=10, block_size=1, n_layer=1, n_head=1, n_embd=8, kernels="torch")).eval()
    assert len(generate(m, [[3]], 3, temperature=0)[0]) == 3


def test_decoder_refuses_to_write_past_its_cache(model):
    S = model.config.block_size
    decoder = Decoder(model, 2)
    with pytest.raises(GenerationError, match="1 to 24 tokens"):
        decoder.prefill([[1] * (S + 1), [2]])
    with pytest.raises(GenerationError, match="takes 2 sequences"):
        decoder.prefill([[1]])
    decoder.prefill([[1] * (S - 2), [2, 3]])
    decoder.step()
    decoder.step()  # the longest sequence now fills the cache
    with pytest.raises(GenerationError, match="the KV cache is full"):
        decoder.step()
    decoder.prefill([[5], [6]])  # a new prefill starts again
    decoder.step()


def test_decoder_refuses_an_empty_sequence(model):
    """An empty prompt in a batch with one-token ones took the one-token path (a decode step
    at position 0, token 0 fed for it) and gave logits as if it held a token."""
    with pytest.raises(GenerationError, match="1 to 24 tokens"):
        Decoder(model, 2).prefill([[1], []])


def test_non_finite_logits_are_an_error_not_a_token(model):
    with torch.no_grad():
        model.lm_head.weight[3, 0] = float("nan")
    for temperature in (0.0, 1.0):
        with pytest.raises(GenerationError, match="logits are not finite"):
            generate(model, [[1, 2]], 4, temperature=temperature)


def test_non_finite_prompt_logits_stream_no_token(model):
    """Prefill's logits are checked before the first draw: a streaming caller (sample.py prints
    each token as it comes) gets the error, not first a token drawn greedily from NaN logits
    (the check points alone would see them only after on_token had the token)."""
    with torch.no_grad():
        model.lm_head.weight[3, 0] = float("nan")
    streamed = []
    with pytest.raises(GenerationError, match="logits are not finite"):
        generate(model, [[1, 2]], 4, temperature=0.0, on_token=streamed.append)
    assert streamed == []


@pytest.mark.triton
def test_triton_kernels_generate_like_the_reference(device):
    """Prefill (flash attention) and decode steps (decode attention) on the Triton kernels,
    in the interpreter on CPU, give the reference path's greedy tokens and logits."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=30, block_size=24, n_layer=2, n_head=2, n_embd=32, kernels="torch")
    ref = GPT(cfg).to(device).eval()
    tri = GPT(cfg.updated(kernels="triton")).to(device).eval()
    tri.load_state_dict(ref.state_dict())
    prompts = [[1, 2, 3, 4, 5], [6, 7]]
    assert generate(tri, prompts, 8, temperature=0) == generate(ref, prompts, 8, temperature=0)
    seq = torch.randint(0, 30, (2, 12), device=device)
    cache = KVCache(tri.config, 2, device, torch.float32)
    with torch.no_grad():  # the decode kernel is forward-only: with autograd on it refuses
        tri(seq[:, :6], cache=cache)
        cache.lengths.fill_(6)
        step = tri(seq[:, 6:7], cache=cache)
    torch.testing.assert_close(step[:, 0], ref(seq[:, :7])[:, -1], rtol=1e-4, atol=1e-4)


@pytest.mark.triton
def test_a_decoder_runs_the_kernels_outside_no_grad(device, monkeypatch):
    """sample.py builds and steps its Decoder with autograd on, over parameters that require
    grad: the steps must still run on the decode kernel (under "auto" they fell back to
    torch's, and under "triton" the kernel refused them), in the graph a CUDA device captures."""
    import kernels

    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=30, block_size=24, n_layer=2, n_head=2, n_embd=32, kernels="torch")
    model = GPT(cfg).to(device).eval()
    want = generate(model, [[1, 2, 3]], 4, temperature=0)[0]
    calls = []
    decode = kernels.decode_attention
    monkeypatch.setattr(kernels, "decode_attention", lambda *a, **k: calls.append(1) or decode(*a, **k))
    if device == "cpu":  # "auto" picks the kernels on CUDA only
        monkeypatch.setattr(ops, "backend", lambda x, mode="auto": reference if mode == "torch" else kernels)
    for kernels_mode in ("auto", "triton"):
        model.set_kernels(kernels_mode)
        calls.clear()
        decoder = Decoder(model, 1, cuda_graph=device == "cuda")
        logits = decoder.prefill([[1, 2, 3]])
        got = []
        for _ in range(4):
            got.append(int(logits.argmax()))
            logits = decoder.step(torch.tensor([[got[-1]]], device=device))
        assert got == want
        assert len(calls) >= cfg.n_layer, kernels_mode


@pytest.mark.triton
def test_generate_under_autocast_on_the_triton_kernels(device):
    """nanoGPT's sample.py generates from an fp32 model under torch.autocast: the decode step's
    query, key and value then come in the autocast dtype and the cache stays fp32, which the
    decode kernel (one dtype) refused (karpathy/nanochat#795: a bf16 q against an fp32 cache)."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=30, block_size=24, n_layer=2, n_head=2, n_embd=32, kernels="torch")
    ref = GPT(cfg).to(device).eval()
    tri = GPT(cfg.updated(kernels="triton")).to(device).eval()
    tri.load_state_dict(ref.state_dict())
    # The interpreter computes bf16 wrongly: fp16 there (CPU autocast takes it too).
    dtype = torch.bfloat16 if device == "cuda" else torch.float16
    prompts = [[1, 2, 3, 4, 5], [6, 7]]
    with torch.autocast(device, dtype=dtype):
        assert generate(tri, prompts, 8, temperature=0) == generate(ref, prompts, 8, temperature=0)


@pytest.mark.triton
def test_sampling_on_the_triton_kernel_is_seeded(device):
    """On the Triton kernels, generate draws with kernels.sample, whose random state lives
    on the device and is seeded from the generator: the same seed gives the same tokens."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=30, block_size=24, n_layer=1, n_head=2, n_embd=32, kernels="triton")
    model = GPT(cfg).to(device).eval()
    decoder = Decoder(model, 2)
    run = lambda seed: generate(model, [[1, 2, 3], [4]], 6, top_k=5, decoder=decoder,
                                generator=torch.Generator(device).manual_seed(seed))
    a = run(1)
    assert decoder.offsets.tolist() == [6, 6]  # one kernel draw per token
    assert a == run(1) and a != run(2)
    assert len(generate(model, [[1]], 2, top_k=0)[0]) == 2  # 0: every token, as on the torch path


@pytest.mark.gpu
@pytest.mark.parametrize("top_k, top_p", [(20, None), (None, 0.9), (50, 0.9)], ids=["top-k", "top-p", "top-k-top-p"])
def test_cuda_graph_sampling_equals_eager_gpu(top_k, top_p):
    """Sampling replayed in a CUDA graph (kernels.sample, after torch's ops keep the
    nucleus for top_p) draws what the eager decoder draws from the same seed."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=512, block_size=64, n_layer=2, n_head=4, n_embd=128)).to("cuda").eval()
    prompts = [list(range(1, 30)), [7, 8, 9]]
    run = lambda decoder: generate(model, prompts, 60, top_k=top_k, top_p=top_p, decoder=decoder,
                                   generator=torch.Generator("cuda").manual_seed(7))
    graph = run(Decoder(model, 2, cuda_graph=True))
    assert graph == run(Decoder(model, 2)) and graph == run(None)
    assert len(set(map(tuple, graph))) == 2


@pytest.mark.gpu
def test_draw_graphs_are_bounded_and_share_one_pool_gpu():
    """A Decoder keeps DRAW_GRAPHS draw graphs at most, the least recently used dropped, in
    one memory pool: a caller that varies the temperature at every request kept a graph and
    a pool of its own for each value met. Replayed in any order, they draw what the eager
    decoder draws."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=512, block_size=64, n_layer=1, n_head=2, n_embd=64)).to("cuda").eval()
    graphed, eager = Decoder(model, 4, cuda_graph=True), Decoder(model, 4)
    run = lambda decoder, t: generate(model, [[1, 2, 3]] * 4, 3, temperature=t, top_p=0.9, decoder=decoder,
                                      generator=torch.Generator("cuda").manual_seed(5))
    temperatures = [0.5 + 0.1 * i for i in range(DRAW_GRAPHS + 4)]
    assert run(graphed, temperatures[0]) == run(eager, temperatures[0])
    torch.cuda.empty_cache()
    reserved = torch.cuda.memory_reserved()
    for t in temperatures[1:] + temperatures[-1:] + temperatures[3:4] + temperatures[:1]:
        assert run(graphed, t) == run(eager, t), t
    torch.cuda.empty_cache()
    # A pool a graph took at least one 2 MiB segment.
    assert torch.cuda.memory_reserved() - reserved < 4 * 2**20
    assert list(graphed.draw_graphs) == [(t, None, 0.9) for t in temperatures[6:] + temperatures[3:4] + temperatures[:1]]


def test_a_compiled_decoder_generates_as_eager():
    """Decoder(compile=True), sample.py --compile: the same tokens as the eager step, for prompts
    of different lengths and past a slide of the window (a prefill between compiled steps)."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=30, block_size=24, n_layer=2, n_head=2, n_embd=32, kernels="torch")
    model = GPT(cfg).eval()
    prompts = [list(range(20)), [5, 6, 7]]
    compiled = generate(model, prompts, 30, temperature=0, decoder=Decoder(model, 2, compile=True))
    assert compiled == generate(model, prompts, 30, temperature=0)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_a_compiled_decoder_compiles_when_built(training):
    """Decoder(compile=True) compiles its step when built, as cuda_graph=True captures its graph
    then, not in the first steps of a generation: sample.py times its tokens/s from the
    prefill on, and --compile's counted the compilation (15 tokens/s against eager's 2,300
    for 100 tokens of a tiny model on the CPU). A model built in train mode too: generate()
    steps in eval mode, so a step compiled in train mode (dropout on) was compiled again."""
    from torch._dynamo.utils import counters

    cfg = GPTConfig(vocab_size=30, block_size=24, n_layer=2, n_head=2, n_embd=32, kernels="torch")
    model = GPT(cfg).train(training)
    torch._dynamo.reset()  # a step another test compiled would pass for this one's
    counters.clear()
    decoder = Decoder(model, 2, compile=True)
    built = dict(counters["frames"])
    assert counters["stats"]["unique_graphs"] == 1
    generate(model, [list(range(20)), [5, 6, 7]], 10, temperature=0, decoder=decoder)  # a slide included
    assert dict(counters["frames"]) == built, "generate compiled the step again"


def test_a_compiled_step_updates_the_cache_in_place():
    """Inductor copied every layer's whole cache each step, to write one position, when the
    cache was slices of one tensor or written by scatter_ (6.1 ms a step against eager's 1.3
    at 4096 positions on the CPU): no buffer the step allocates may be that large."""
    from torch._inductor.utils import run_and_get_code

    cfg = GPTConfig(vocab_size=30, block_size=256, n_layer=2, n_head=2, n_embd=32, kernels="torch")
    model = GPT(cfg).eval()
    decoder, codes = run_and_get_code(lambda: Decoder(model, 3, compile=True))  # compiled when built
    assert codes, "the step was not compiled"
    shapes = [s for code in codes for s in re.findall(r"empty_strided_\w+\(\(([\d, ]*)\)", code)]
    largest = max(math.prod(int(n) for n in s.split(",") if n.strip()) for s in shapes)
    assert largest < decoder.cache.k[0].numel() // 4


@pytest.mark.gpu
def test_a_compiled_decoder_keeps_its_cuda_graphs_gpu():
    """mode="reduce-overhead" skips its CUDA graphs for a step that mutates a tensor it does
    not know to have a fixed address: the cache and lengths are marked as such."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=512, block_size=128, n_layer=2, n_head=4, n_embd=128, kernels="torch")
    model = GPT(cfg).to("cuda").eval()
    prompts = [list(range(1, 40)), [7, 8, 9]]
    counters.clear()
    compiled = generate(model, prompts, 20, temperature=0, decoder=Decoder(model, 2, compile=True))
    assert counters["inductor"]["cudagraph_skips"] == 0
    assert compiled == generate(model, prompts, 20, temperature=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_graph_decoding_gpu(dtype):
    """The CUDA-graph decoder replays the same steps as the eager cached path, for a batch of
    prompts of different lengths, and (fp32) matches the uncached loop token for token."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=512, block_size=128, n_layer=4, n_head=4, n_embd=256)
    model = GPT(cfg).to("cuda", dtype).eval()
    prompts = [list(range(1, 40)), [7, 8, 9], list(range(100, 117))]
    graph = generate(model, prompts, 40, temperature=0, decoder=Decoder(model, 3, cuda_graph=True))
    eager = generate(model, prompts, 40, temperature=0)
    assert graph == eager
    if dtype == torch.float32:
        for p, out in zip(prompts, graph):
            slow = generate_uncached(model, torch.tensor([p], device="cuda"), 20, temperature=0)[0, len(p):]
            assert out[:20] == slow.tolist()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_a_cuda_graph_captured_under_autocast_outlives_it_gpu(dtype):
    """A Decoder captured inside torch.autocast and stepped after the context exited: with
    autocast's cache on, the graph would read the cached bf16 casts of the weights, freed at
    the exit (and here overwritten); captured without it, it casts them itself."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=512, block_size=64, n_layer=2, n_head=4, n_embd=128)).to("cuda").eval()
    prompts = [list(range(1, 30)), [7, 8, 9]]
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
        graph, eager = Decoder(model, 2, cuda_graph=True), Decoder(model, 2)
        graph.prefill(prompts), eager.prefill(prompts)
    junk = [torch.full((n,), float("nan"), device="cuda") for n in (512 * 128, 128 * 128 * 3, 128 * 512, 512)]
    token = torch.tensor([[5], [6]], device="cuda")
    with torch.no_grad():
        got = graph.step(token).clone()
        with torch.autocast("cuda", dtype=dtype):
            expected = eager.step(token)
    assert torch.isfinite(got).all() and len(junk) == 4
    torch.testing.assert_close(got, expected)


def test_set_kernels_switches_every_op():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=30, block_size=24, n_layer=2, n_head=2, n_embd=32, kernels="triton"))
    assert model.set_kernels("torch") is model and model.config.kernels == "torch"
    assert {m.kernels for m in model.modules() if hasattr(m, "kernels")} == {"torch"}


def test_sample_next_top_k_draws_only_the_k_largest():
    logits = torch.tensor([[1.0, 4.0, 3.0, 0.0, 2.0]])
    gen = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, 1.0, top_k=2, generator=gen).item() for _ in range(300)}
    assert draws == {1, 2}


def test_sample_next_keeps_every_logit_tied_with_the_kth():
    """As kernels.sample does (and filter_logits): torch.topk alone kept one of the three."""
    logits = torch.tensor([[2.0, 1.0, 2.0, 0.5, 2.0, -1.0]])
    gen = torch.Generator().manual_seed(0)
    assert {sample_next(logits, 1.0, top_k=1, generator=gen).item() for _ in range(300)} == {0, 2, 4}


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_sample_next_draws_from_softmax_of_logits_over_temperature(temperature):
    logits = torch.randn(64, 11, generator=torch.Generator().manual_seed(0))
    ours = sample_next(logits, temperature, generator=torch.Generator().manual_seed(1))
    expected = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=torch.Generator().manual_seed(1))
    assert torch.equal(ours, expected)


def test_sample_next_draws_from_an_fp32_softmax_of_half_precision_logits(monkeypatch):
    """A bf16 model's logits are divided, filtered and normalised in fp32: bf16's 8-bit
    mantissa would move every probability by up to 0.4% and the nucleus's edge with them."""
    logits = (3 * torch.randn(4, 1000, generator=torch.Generator().manual_seed(0))).bfloat16()
    seen, multinomial = [], torch.multinomial
    monkeypatch.setattr(torch, "multinomial", lambda p, *a, **k: seen.append(p) or multinomial(p, *a, **k))
    sample_next(logits, 0.7, top_p=0.9, generator=torch.Generator().manual_seed(1))
    want = torch.softmax(filter_logits(logits.float() / 0.7, top_p=0.9).double(), dim=-1)
    torch.testing.assert_close(seen[0].double(), want, rtol=1e-5, atol=1e-7)


def test_sample_next_takes_one_generator_a_row():
    """A list of generators is one per row: a list one short is refused, not a row left out."""
    logits = torch.zeros(3, 5)
    gens = [torch.Generator().manual_seed(s) for s in range(3)]
    assert sample_next(logits, 1.0, generator=gens).shape == (3, 1)
    with pytest.raises(ValueError):
        sample_next(logits, 1.0, generator=gens[:2])


def test_window_slides_only_when_full_and_keeps_the_last_half(monkeypatch):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=30, block_size=24, n_layer=1, n_head=2, n_embd=32, kernels="torch")
    model = GPT(cfg).eval()
    seen = []
    real = Decoder.prefill
    monkeypatch.setattr(Decoder, "prefill", lambda self, seqs: seen.append([list(s) for s in seqs]) or real(self, seqs))
    prompt = list(range(20))
    out = generate(model, [prompt], 10, temperature=0)[0]
    # First prefill: the prompt. The slide comes when prompt + new tokens fill all 24 positions:
    # after 5 draws (20 prompt + 4 stepped = 24 in the cache), and keeps the last 12 tokens.
    assert len(seen) == 2 and seen[0] == [prompt]
    assert seen[1] == [(prompt + out[:5])[-12:]]


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # NaN logits in the interpreter
@pytest.mark.parametrize("kernels", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_logits_that_turn_non_finite_while_decoding_are_an_error(device, kernels):
    """Prefill is fine (positions 0-1), the decode step at position 5 is NaN: every sampling
    path -- greedy, torch's (top-p), and kernels.sample on the Triton kernels -- must stop
    with the one-line error, not go on drawing tokens from NaN."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=30, block_size=24, n_layer=1, n_head=2, n_embd=32, kernels=kernels)
    model = GPT(cfg).to(device).eval()
    with torch.no_grad():
        model.transformer.wpe.weight[5:] = float("nan")
    for settings in (dict(temperature=0.0), dict(top_k=5), dict(top_p=0.9)):
        with pytest.raises(GenerationError, match="logits are not finite"):
            generate(model, [[1, 2]], 12, **settings)
    assert len(generate(model, [[1, 2]], 3, temperature=0.0)[0]) == 3  # positions up to 4 stay finite


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # NaN logits in the interpreter
@pytest.mark.parametrize("settings", [dict(temperature=0.0), dict(top_k=5), dict(top_p=0.9)],
                         ids=["greedy", "top-k", "top-p"])
def test_a_stream_gets_no_token_drawn_from_non_finite_logits(settings):
    """sample.py prints each streamed token as it comes: the logits at position 5 are NaN, so
    the stream gets the four tokens drawn from positions 1-4 and then the error, never a fifth
    token drawn from NaN (greedy, the argmax of NaN, is some token)."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=30, block_size=24, n_layer=1, n_head=2, n_embd=32, kernels="torch")
    model = GPT(cfg).eval()
    with torch.no_grad():
        model.transformer.wpe.weight[5:] = float("nan")
    streamed = []
    with pytest.raises(GenerationError, match="logits are not finite"):
        generate(model, [[1, 2]], 12, on_token=lambda t: streamed.append(t.item()), **settings)
    assert len(streamed) == 4


def test_stop_sees_every_new_token_once_in_order_and_eot_past_the_first_check(model):
    """The checks read only the tokens since the last one (each costs the same however long the
    output): what stop is given is still all the new tokens, and an end-of-text is still seen."""
    run = lambda **kw: generate(model, [[1, 2, 3]], 40, generator=torch.Generator().manual_seed(5), check_every=7, **kw)[0]
    free = run()
    seen = []
    assert run(stop=lambda b, new: seen.append(list(new)) or False) == free
    assert seen == [free[:n] for n in (7, 14, 21, 28, 35, 40)]
    eot = next(t for t in free if free.index(t) >= 7)  # first drawn after the first check
    assert run(eot_token=eot) == free[: free.index(eot)]


@pytest.mark.parametrize("temperature, top_k", [(0.7, None), (1.3, 5)])
@pytest.mark.triton
def test_top_p_on_the_kernels_draws_from_the_nucleus(temperature, top_k, device, monkeypatch):
    """On the kernels' path top_p draws on kernels.sample (one draw counter a row, no
    multinomial: torch's per-row draws took 3.5x the time at batch 32, run 6), from the
    softmax of the logits over the temperature restricted to filter_logits' nucleus."""
    monkeypatch.setattr(torch, "multinomial", None)  # any torch draw fails
    torch.manual_seed(0)
    V, B, draws = 12, 256, 3
    model = GPT(GPTConfig(vocab_size=V, block_size=8, n_layer=1, n_head=2, n_embd=32, kernels="triton")).to(device)
    decoder = Decoder(model, B)
    decoder.reseed(torch.Generator().manual_seed(0))
    logits = torch.linspace(2.0, -2.0, V, device=device).roll(3).expand(B, V).contiguous()
    decoder.logits = logits
    tokens = torch.cat([decoder.draw(temperature, top_k, 0.8).clone() for _ in range(draws)])[:, 0].cpu()
    assert decoder.offsets.tolist() == [draws] * B
    kept = filter_logits(logits[:1].float().cpu() / temperature, top_k, 0.8)[0]
    probs = torch.softmax(kept.double(), dim=-1)
    assert 2 <= int(torch.isfinite(kept).sum()) < (top_k or V)  # the nucleus cuts
    counts = torch.bincount(tokens, minlength=V).double()
    assert counts[probs == 0].sum() == 0
    n = B * draws
    assert torch.all((counts / n - probs).abs() <= 4 * (probs * (1 - probs) / n).sqrt() + 1e-3), (counts / n, probs)


@pytest.mark.triton
def test_a_compiled_decoder_draws_on_the_kernels_where_auto_runs_them(monkeypatch):
    """Decoder(compile=True) (sample.py --compile) leaves the draw outside the compiled step:
    on kernels.sample wherever "auto" runs the kernels (here the interpreted module
    stands in for CUDA), not with torch's multinomial a row."""
    import kernels

    monkeypatch.setattr(ops, "backend", lambda x, mode="auto": kernels if mode != "torch" else ops.reference)
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)  # what is compiled is not the point here
    monkeypatch.setattr(torch, "multinomial", None)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=30, block_size=24, n_layer=1, n_head=2, n_embd=32, kernels="torch")).eval()
    decoder = Decoder(model, 2, compile=True)
    out = generate(model, [[1, 2, 3], [4]], 5, top_k=10, decoder=decoder, generator=torch.Generator().manual_seed(3))
    assert [len(o) for o in out] == [5, 5] and decoder.offsets.tolist() == [5, 5]


def test_a_negative_max_new_tokens_is_a_clear_error(model):
    """Not torch's "zeros: Dimension size must be non-negative" from inside generate."""
    with pytest.raises(ValueError, match="max_new_tokens must be 0 or more, got -1"):
        generate(model, [[1, 2]], -1)
    assert generate(model, [[1, 2]], 0) == [[]]


def test_no_prompt_or_an_empty_one_is_a_clear_error(model):
    for prompts in ([], [[1, 2], []]):
        with pytest.raises(ValueError, match="every prompt needs at least one token"):
            generate(model, prompts, 3)


def test_a_prompt_longer_than_the_context_keeps_its_last_tokens(model):
    """The prompt's last block_size tokens are its context (sample.py passes a long prompt whole)."""
    prompt = [t % 30 for t in range(40)]
    assert generate(model, [prompt, [1]], 5, temperature=0) == generate(model, [prompt[-24:], [1]], 5, temperature=0)


def test_a_long_prompt_slides_on_its_last_tokens(model, monkeypatch):
    """A prompt longer than the context fills it at once, so the first token drawn slides
    the window: the refill is the end of prompt + output, not of the prompt's first
    block_size tokens (a greedy continuation may not show the difference)."""
    prompt = [t % 30 for t in range(40)]
    seen, prefill = [], Decoder.prefill
    monkeypatch.setattr(Decoder, "prefill", lambda self, seqs: seen.append(list(map(list, seqs))) or prefill(self, seqs))
    out = generate(model, [prompt], 2, temperature=0)
    assert seen == [[prompt[-24:]], [(prompt + out[0][:1])[-12:]]]


def test_an_end_of_text_ends_the_generation_at_the_next_check(model, monkeypatch):
    """Each sequence ends at the check after its end of text (each check reads only the tokens
    since the last one), and generation stops when all have ended: not drawing on to
    max_new_tokens, which may be far more (sample.py's 256)."""
    run = lambda **kw: generate(model, [[1, 2, 3], [4, 5]], 40, generator=torch.Generator().manual_seed(5), **kw)
    free = run()
    # A token both draw, first in different windows of 4.
    eot = next(t for t in free[0] if t in free[1] and free[0].index(t) // 4 != free[1].index(t) // 4)
    draws, draw = [], Decoder.draw
    monkeypatch.setattr(Decoder, "draw", lambda self, *a, **k: draws.append(1) or draw(self, *a, **k))
    out = run(eot_token=eot, check_every=4)
    assert out == [f[: f.index(eot)] for f in free]
    assert len(draws) == 4 * math.ceil(max(f.index(eot) + 1 for f in free) / 4)


def test_a_stream_ends_at_its_end_of_text(model):
    """Streaming checks every token: the stream gets the end of text, and no token drawn after it."""
    run = lambda **kw: generate(model, [[1, 2, 3]], 40, generator=torch.Generator().manual_seed(5), **kw)[0]
    free = run()
    eot = free[5]
    streamed = []
    out = run(eot_token=eot, on_token=lambda t: streamed.append(t.item()))
    assert out == free[: free.index(eot)] and streamed == free[: free.index(eot) + 1]


def test_a_temperature_below_greedy_below_on_the_kernels_draws_the_argmax(device):
    """On the kernels' top_p path too: logits / 1e-39 overflow to +inf, of which kernels.sample
    takes the first, not the largest."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=12, block_size=8, n_layer=1, n_head=2, n_embd=32, kernels="triton")).to(device)
    decoder = Decoder(model, 2)
    decoder.logits = torch.tensor([[1.0, 3.0, 2.0] * 4, [0.5, -1.0, 2.5] * 4], device=device)
    assert decoder.draw(1e-39, None, 0.9)[:, 0].tolist() == [1, 2]


def test_top_k_and_top_p_reach_the_draws(model):
    """top_k=1, or a top_p that keeps only the top token, is greedy decoding."""
    greedy = generate(model, [[1, 2, 3]], 12, temperature=0)
    run = lambda **kw: generate(model, [[1, 2, 3]], 12, generator=torch.Generator().manual_seed(0), **kw)
    assert run(top_k=1) == greedy and run(top_p=1e-9) == greedy
    assert run() != greedy


def test_generate_runs_the_model_only_for_tokens_it_draws(model, monkeypatch):
    """One prefill, then one decode step a token but the last: no step (or slide) whose logits
    nothing draws from, after the last token."""
    calls = []
    for name in ("prefill", "step"):
        real = getattr(Decoder, name)
        monkeypatch.setattr(Decoder, name, lambda self, *a, real=real, name=name: calls.append(name) or real(self, *a))
    generate(model, [[1, 2, 3]], 5, temperature=0)
    assert calls == ["prefill"] + ["step"] * 4
    calls.clear()
    generate(model, [list(range(20))], 5, temperature=0)  # the fifth token fills the context
    assert calls == ["prefill"] + ["step"] * 4


def test_each_refill_is_the_end_of_its_sequence_so_far(model, monkeypatch):
    """A slide refills every sequence with the last tokens of its prompt and output, also past
    the first block_size tokens: at token 32 here the shorter sequence, one short of full,
    keeps 24 tokens, all of them output (a window one short took back a prompt token)."""
    prompts = [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]]
    events, prefill, draw = [], Decoder.prefill, Decoder.draw
    monkeypatch.setattr(Decoder, "draw", lambda self, *a, **k: events.append(None) or draw(self, *a, **k))
    monkeypatch.setattr(Decoder, "prefill", lambda self, seqs: events.append(list(map(list, seqs))) or prefill(self, seqs))
    out = generate(model, prompts, 40, generator=torch.Generator().manual_seed(3))
    n, refills = 0, []
    for seqs in events:
        if seqs is None:
            n += 1
            continue
        refills.append((n, [len(h) for h in seqs]))
        for p, o, h in zip(prompts, out, seqs):
            assert h == (p + o[:n])[-len(h):], n
    assert (32, [24, 12]) in refills

"""Autoregressive sampling with a KV cache: batched prompts, sliding window, CUDA graphs.

`generate` is the fast path (prefill once, then one cached decode step per
token); `generate_uncached` is the nanoGPT-style loop that re-reads the whole
context every token, kept as the oracle and the benchmark baseline.
"""
from __future__ import annotations

import contextlib
import functools
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

from gpt import ops
from gpt.model import GPT, KVCache
from kernels import reference


def filter_logits(logits: Tensor, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """Sets to -inf every logit outside the top-k and outside the smallest set with mass >= top_p
    (a logit tied with the last one either keeps stays).

    logits (B, V), already divided by the temperature.
    """
    if top_k is not None and 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits = torch.sort(logits, dim=-1, descending=True).values
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass before it already reaches top_p; the top token always
        # stays, also for a top_p that is 0 in fp32 (1e-50), where 0 >= top_p would drop it.
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop_sorted[..., 0] = False
        # And every logit tied with the last one kept, as with top_k: the sort's order among
        # equal logits is arbitrary, and would keep some of them and drop the others.
        last = sorted_logits.masked_fill(drop_sorted, float("inf")).amin(dim=-1, keepdim=True)
        logits = logits.masked_fill(logits < last, float("-inf"))
    return logits


class GenerationError(ValueError):
    """Generation that cannot go on; the message names the problem and the fix."""


_NOT_FINITE = ("the model's logits are not finite (NaN or inf): its weights have diverged, or overflow in this "
               "dtype; use an earlier checkpoint, or sample with --dtype fp32")

# Temperatures below this draw the argmax: logits / temperature would overflow fp32, and
# the softmax is one-hot to within rounding well before that.
GREEDY_BELOW = 1e-5
# CUDA graphs of the draw a Decoder keeps, one per sampling setting, the least recently
# used dropped beyond this: a caller that varies the temperature at every request (a
# server) would otherwise keep a graph for each value met.
DRAW_GRAPHS = 8


def sample_next(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> Tensor:
    """One token id per row of logits (B, V) as (B, 1), on the logits' device; temperature 0 is greedy.

    generator: one for all rows, or one per row (see row_generators)."""
    if temperature < GREEDY_BELOW:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    # Over the whole vocabulary, so that logits tied with the k-th largest all stay, as in
    # kernels.sample: torch.topk's k would keep an arbitrary few of them (bf16 logits tie often).
    probs = torch.softmax(filter_logits(logits, top_k, top_p), dim=-1)
    # NaN or +inf logits, or a row all -inf, give NaN here, on which multinomial raises (CPU)
    # or fails a device-side assert that ends the process (CUDA). On the CPU the check is free;
    # on a GPU it would wait for the device every token, so a NaN row draws uniformly instead
    # and generate() raises at its next check of the logits, before any of those tokens
    # reaches its caller.
    if not probs.is_cuda:
        if bool(probs.isnan().any()):
            raise GenerationError(_NOT_FINITE)
    else:
        probs = probs.nan_to_num(nan=1.0)
    if isinstance(generator, Sequence):
        return torch.stack([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generator, strict=True)])
    return torch.multinomial(probs, 1, generator=generator)


def row_generators(generator: torch.Generator | None, rows: int, device: torch.device) -> list[torch.Generator]:
    """One generator per row on device, seeded from one draw of `generator` (torch's default
    one when None): row b's draws are then the same whatever the batch around it, as
    kernels.sample's per-row counters make them on the kernels' path."""
    base = int(torch.randint(0, 2**62, (), generator=generator,
                             device=generator.device if generator is not None else "cpu"))
    return [torch.Generator(device=device).manual_seed(base + b) for b in range(rows)]


@contextlib.contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[None]:
    """The model in eval mode (no dropout) for the block, then each module's mode as it was:
    GPT(config) starts in train mode, and so is a model mid-training."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _in_eval_mode(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def run(model: GPT, *args, **kwargs):
        with evaluating(model):
            return fn(model, *args, **kwargs)
    return run


@_in_eval_mode
@torch.no_grad()
def generate_uncached(
    model: GPT,
    idx: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Extends idx (B, T) by max_new_tokens, re-running the model over the last block_size tokens each time."""
    block_size = model.config.block_size
    for _ in range(max_new_tokens):
        context = idx[:, -block_size:]
        # Logits of the last position only, as nanoGPT's model computes them at inference.
        last = torch.full((idx.size(0),), context.size(1) - 1, device=idx.device)
        logits = model(context, at=last)[:, -1, :]
        idx = torch.cat([idx, sample_next(logits, temperature, top_k, top_p, generator)], dim=1)
    return idx


class Decoder:
    """A KV cache and the decode step that reads it, built once per (batch size, dtype) and reused.

    With cuda_graph=True the decode step (all layers, and the advance of every
    sequence's length) is captured once and replayed: one launch per token, and so is
    the draw of the next token for each sampling setting met (temperature, top_k, top_p;
    the DRAW_GRAPHS most recently used are kept) when it runs on a kernel: the argmax for greedy decoding, and kernels.sample (top-k
    sampling in four Triton launches, two without top-k, its random state on the device) wherever the model
    runs on the Triton kernels; top_p < 1 keeps the nucleus with torch's ops first (no sync
    with the host, so they are captured too). The torch reference path draws with torch's
    ops and the caller's generator, outside any graph: one generator a row, so one
    multinomial a row each token.

    With compile=True the step goes through torch.compile(mode="reduce-overhead") instead,
    compiled when the Decoder is built, which writes its own kernels: on CUDA the model must
    run on kernels="torch" (model.set_kernels("torch") switches), since our decode attention
    is opaque to torch.compile and would break the step into pieces. Its draws run outside
    the compiled step, on kernels.sample wherever "auto" would run the kernels.
    """

    def __init__(self, model: GPT, batch_size: int, cuda_graph: bool = False, compile: bool = False):
        p = model.lm_head.weight
        if compile and p.is_cuda and model.config.kernels != "torch":
            raise ValueError("Decoder(compile=True) on CUDA needs a model on kernels='torch'; call model.set_kernels('torch')")
        self.model = model
        self.cache = KVCache(model.config, batch_size, p.device, p.dtype)
        self.token = torch.zeros(batch_size, 1, dtype=torch.long, device=p.device)
        self.logits: Tensor | None = None  # the latest logits (B, V), what draw() samples from
        # What draws (draw()): the model's kernels; under compile=True, which leaves the draw
        # outside the compiled step, the kernels wherever they would run. Torch's draw
        # takes a multinomial a row, each from the row's own generator: at batch 32 on an
        # H200, 9,350-10,589 tokens/s against 37,986 (run 6).
        kernels = ops.backend(p, model.config.kernels)
        self.sampler = ops.backend(p, "auto") if compile and kernels is reference else kernels
        # kernels.sample's Philox key and per-sequence draw counters (see reseed).
        self.seed = torch.zeros(1, dtype=torch.long, device=p.device)
        self.offsets = torch.zeros(batch_size, dtype=torch.long, device=p.device)
        self.filled = 0  # host mirror of max(cache.lengths): a full cache is refused without a sync
        self.graph = None
        # Most recently used last. The draw graphs share one memory pool: their temporaries live
        # within a replay and replays never overlap, so the pool holds one draw's worth, not
        # one per setting.
        self.draw_graphs: OrderedDict[tuple[float, int | None, float | None], torch.cuda.CUDAGraph] = OrderedDict()
        self.draw_pool = None
        self.step_fn = self._step
        if compile:
            # Inductor's CUDA graphs are skipped altogether for a step that updates a tensor
            # it was passed, unless that tensor's address is marked as fixed, as a module's
            # buffers are (gpt-fast keeps its cache in buffers).
            for t in (*self.cache.tensors(), self.token):
                torch._dynamo.mark_static_address(t, guard=False)
            self.step_fn = torch.compile(self._step, mode="reduce-overhead")
        # In eval mode, as generate() steps: a capture in train mode would replay dropout.
        with evaluating(model):
            if compile:
                self._compile()
            if cuda_graph:
                self._capture()

    def _step(self) -> Tensor:
        logits = self.model(self.token, cache=self.cache)[:, -1]
        self.cache.lengths += 1
        return logits

    @torch.no_grad()  # as generate() steps: grad mode is one of the compiled step's guards
    def _compile(self) -> None:
        # Now, as _capture captures its graph, not in the first steps of a generation that its
        # caller times (sample.py's tokens/s): the first call compiles, and on CUDA the second
        # records mode="reduce-overhead"'s CUDA graph. The steps write k/v one past each length,
        # which the real steps overwrite.
        saved = self.cache.lengths.clone()
        for _ in range(3):
            self.step_fn()
        self.cache.lengths.copy_(saved)

    # Inference only, whoever calls: with autograd on, a step over parameters that require
    # grad (sample.py's, bench_sample's) ran, and was captured, on torch's decode attention
    # and without the decode FFN's GELU epilogue (gpt/ops.py), and kernels="triton" refused it.
    @torch.no_grad()
    def _capture(self) -> None:
        # Warm-up and capture write k/v one past each length; the real steps overwrite them.
        saved = self.cache.lengths.clone()
        # Under autocast, a graph captured with its cache on would read the cached casts of
        # the weights, which are freed when the autocast context exits: replays after that
        # read freed memory (torch's make_graphed_callables refuses autocast's cache for this
        # reason). Without it the graph casts the weights itself at each replay; a model
        # cast to its dtype (model.to(torch.bfloat16), as sample.py does) needs no cast.
        autocast = torch.is_autocast_enabled("cuda")

        def uncached() -> contextlib.AbstractContextManager:
            return (torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)
                    if autocast else contextlib.nullcontext())
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with uncached(), torch.cuda.stream(stream):
            for _ in range(2):
                self._step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with uncached(), torch.cuda.graph(self.graph):
            self.graph_logits = self._step()
        self.cache.lengths.copy_(saved)

    def reseed(self, generator: torch.Generator | None = None) -> None:
        """Draws kernels.sample's key from generator (torch's default one when None) and
        restarts the counters: the same generator state gives the same tokens."""
        device = generator.device if generator is not None else torch.device("cpu")
        self.seed.copy_(torch.randint(0, 2**62, (1,), generator=generator, device=device))
        self.offsets.zero_()

    @torch.no_grad()
    def prefill(self, sequences: list[list[int]]) -> Tensor:
        """Runs right-padded prompts through the model; returns each one's last logits (B, V)."""
        S = self.model.config.block_size
        if len(sequences) != self.token.size(0) or not all(sequences) or max(map(len, sequences)) > S:
            raise GenerationError(f"prefill takes {self.token.size(0)} sequences of 1 to {S} tokens (the context length); "
                                  f"got lengths {[len(s) for s in sequences]}: keep the last {S} tokens of each")
        lengths = torch.tensor([len(s) for s in sequences], device=self.token.device)
        idx = torch.zeros(len(sequences), int(lengths.max()), dtype=torch.long, device=self.token.device)
        for b, s in enumerate(sequences):
            idx[b, : len(s)] = torch.tensor(s, dtype=torch.long)
        if idx.size(1) == 1:  # a one-token prompt is a decode step at position 0
            self.cache.lengths.zero_()
            self.filled = 0
            return self.step(idx)
        logits = self.model(idx, cache=self.cache, at=lengths - 1)[:, 0]
        self.cache.lengths.copy_(lengths)
        self.filled = idx.size(1)
        if self.graph is not None:  # where the captured draws read them
            self.logits = self.graph_logits.copy_(logits)
        else:
            self.logits = logits
        return self.logits

    @torch.no_grad()
    def step(self, token: Tensor | None = None) -> Tensor:
        """Feeds token (B, 1) -- by default the last draw() -- at each sequence's position;
        returns the next logits (B, V)."""
        S = self.model.config.block_size
        if self.filled >= S:  # the kernel would write past the cache
            raise GenerationError(f"the KV cache is full ({S} positions, the context length); prefill the last "
                                  f"tokens again to go on (generate slides the window this way)")
        self.filled += 1
        if token is not None:
            self.token.copy_(token)
        if self.graph is not None:
            self.graph.replay()
            self.logits = self.graph_logits
        else:
            self.logits = self.step_fn()
        return self.logits

    def draw(
        self,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
    ) -> Tensor:
        """Samples the next token (B, 1) from the latest logits (see sample_next) into self.token."""
        top_k = top_k or None  # 0 keeps every token, as in filter_logits (kernels.sample takes None)
        top_p = top_p if top_p is not None and 0.0 < top_p < 1.0 else None  # as filter_logits reads it
        if temperature < GREEDY_BELOW:
            draw = lambda: torch.argmax(self.logits, dim=-1, keepdim=True, out=self.token)
        elif self.sampler is reference:
            return self.token.copy_(sample_next(self.logits, temperature, top_k, top_p, generator))
        elif top_p is None:
            draw = lambda: self.sampler.sample(self.logits, self.seed, self.offsets, temperature, top_k, out=self.token)
        else:
            # The nucleus depends on the temperature, so the kernel gets the logits already
            # divided and filtered, and draws from their softmax.
            draw = lambda: self.sampler.sample(filter_logits(self.logits.float() / temperature, top_k, top_p),
                                               self.seed, self.offsets, 1.0, None, out=self.token)
        if self.graph is None:
            return draw()
        key = (max(temperature, 0.0), top_k, top_p)
        graph = self.draw_graphs.pop(key, None)
        if graph is None:
            if len(self.draw_graphs) >= DRAW_GRAPHS:
                self.draw_graphs.popitem(last=False)
            # Warm-up (Triton compiles outside the capture), then the state it advanced back.
            saved = self.offsets.clone()
            draw()
            self.offsets.copy_(saved)
            if self.draw_pool is None:
                self.draw_pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.draw_pool):
                draw()
        self.draw_graphs[key] = graph
        graph.replay()
        return self.token


@_in_eval_mode
@torch.no_grad()
def generate(
    model: GPT,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    eot_token: int | None = None,
    stop: Callable[[int, list[int]], bool] | None = None,
    on_token: Callable[[Tensor], None] | None = None,
    decoder: Decoder | None = None,
    check_every: int = 16,
) -> list[list[int]]:
    """Samples up to max_new_tokens after each prompt (prompts may differ in length).

    A sequence ends at eot_token (not included in its output) or when stop(b, new_tokens)
    says so (its output ends at that check); both are checked every `check_every` tokens so
    the GPU never waits on the host in between (every token when on_token streams). When a
    sequence fills the context, its window slides: the cache is refilled from the last half
    of its context (and the other sequences' from all of theirs, so no sample depends on its
    batch).
    Nor do its draws: generator seeds each row's own (row_generators on torch's path,
    kernels.sample's per-row counters on the kernels'). Returns the new tokens of each sequence.
    """
    B, S = len(prompts), model.config.block_size
    if not B or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be 0 or more, got {max_new_tokens}")
    decoder = decoder or Decoder(model, B)
    if decoder.sampler is not reference:
        decoder.reseed(generator)
    device = decoder.token.device
    generators = row_generators(generator, B, device)  # for torch's draws (the reference path)
    history = [list(p[-S:]) for p in prompts]
    lengths = [len(h) for h in history]  # host mirror of cache.lengths: no sync to know them
    _check_finite(decoder.prefill(history))
    # Grown as needed: max_new_tokens may be far more than an end-of-text or stop string lets through.
    out = torch.zeros(B, min(max_new_tokens, 1024), dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    every = 1 if on_token is not None else check_every
    checked = 0  # the tokens out[:, :checked] are checked for end-of-text, and in `new` for stop
    new: list[list[int]] = [[] for _ in range(B)]
    stopped: list[int | None] = [None] * B  # the tokens a sequence had when stop() ended it
    n = 0
    for n in range(1, max_new_tokens + 1):
        token = decoder.draw(temperature, top_k, top_p, generators)
        if n > out.size(1):
            out = torch.cat([out, torch.zeros_like(out)], dim=1)
        out[:, n - 1] = token[:, 0]
        if on_token is not None:
            # A streamed token is read on the host at once, so check first the logits it came
            # from: non-finite ones give the error and no token (a draw from them is some token).
            if not bool(torch.isfinite(decoder.logits).all()):
                raise GenerationError(_NOT_FINITE)
            on_token(token)
        if n % every == 0 or n == max_new_tokens:
            # The logits token n came from: NaN or inf ones (fp16 overflowing as the context
            # grows) would go on giving tokens, and the draws read none of them on the host.
            # A NaN in the cache spreads to every later step, so this sees it within `every`.
            finite = torch.isfinite(decoder.logits).all()
            # Only the tokens since the last check: a check costs the same however long the output.
            if eot_token is not None:
                done |= (out[:, checked:n] == eot_token).any(dim=1)
            if stop is not None:
                for row, tokens in zip(new, out[:, checked:n].tolist()):
                    row.extend(tokens)
                ended = [stop(b, new[b]) for b in range(B)]
                stopped = [n if s is None and e else s for s, e in zip(stopped, ended)]
                done |= torch.tensor(ended, device=device)
            checked = n
            finite, all_done = torch.stack([finite, done.all()]).tolist()  # one sync for both
            if not finite:
                raise GenerationError(_NOT_FINITE)
            if all_done:
                break
        if n == max_new_tokens:
            break
        if max(lengths) == S:  # no room for this token: slide the full sequences' windows
            keep = [max(1, S // 2) if length == S else length + 1 for length in lengths]
            last = out[:, max(0, n - S):n].tolist()  # keep <= S tokens of prompt and output
            history = [(list(p[-S:]) + last[b])[-keep[b]:] for b, p in enumerate(prompts)]
            lengths = [len(h) for h in history]
            _check_finite(decoder.prefill(history))
        else:
            decoder.step()
            lengths = [x + 1 for x in lengths]
    result = []
    for row, end in zip(out[:, :n].tolist(), stopped):
        # Not the tokens drawn while the batch's other sequences went on.
        row = row[:end]
        if eot_token is not None and eot_token in row:
            row = row[: row.index(eot_token)]
        result.append(row)
    return result


def _check_finite(logits: Tensor) -> None:
    # Once per prefill (one sync): NaN weights or an overflowing dtype show there, and a draw
    # from NaN logits would return some token as if nothing were wrong.
    if not bool(torch.isfinite(logits).all()):
        raise GenerationError(_NOT_FINITE)

import math

import torch

from gpt import GPT, GPTConfig
from gpt.generate import filter_logits, generate, sample_next


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


def test_greedy_is_argmax():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 0.0]])
    assert sample_next(logits, temperature=0).flatten().tolist() == [1, 0]


def test_seeded_sampling_is_reproducible_and_crops_context():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=16, kernels="torch")).eval()
    prompt = torch.randint(0, 20, (2, 5))
    run = lambda seed: generate(model, prompt, 12, top_k=10, generator=torch.Generator().manual_seed(seed))
    a, b, c = run(1), run(1), run(2)
    assert a.shape == (2, 17)  # longer than block_size: the context is cropped, not an error
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a[:, :5], prompt)

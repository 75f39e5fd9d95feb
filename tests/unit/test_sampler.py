"""Sampler: greedy, temperature, top-k, top-p and per-request seeds."""

import torch

from common.protocol import SamplingParams
from workers.engine.sampler import Sampler, make_generator

VOCAB = 50


def _logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 2


def test_greedy_is_argmax():
    logits = _logits(4)
    params = [SamplingParams(temperature=0.0)] * 4
    assert Sampler()(logits, params, [None] * 4) == logits.argmax(-1).tolist()


def test_greedy_rows_stay_greedy_in_a_mixed_batch():
    logits = _logits(3)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=5.0), SamplingParams(temperature=0.0)]
    out = Sampler()(logits, params, [None] * 3)
    assert out[0] == int(logits[0].argmax()) and out[2] == int(logits[2].argmax())


def test_top_k_one_and_tiny_top_p_pick_the_top_token():
    logits = _logits(2)
    params = [SamplingParams(temperature=10.0, top_k=1), SamplingParams(temperature=10.0, top_p=1e-6)]
    for _ in range(20):
        assert Sampler()(logits, params, [None, None]) == logits.argmax(-1).tolist()


def test_top_k_limits_the_support():
    logits = _logits(1)
    top3 = set(logits[0].topk(3).indices.tolist())
    params = [SamplingParams(temperature=50.0, top_k=3)]
    seen = {Sampler()(logits, params, [None])[0] for _ in range(200)}
    assert seen <= top3 and len(seen) == 3  # hot temperature: all three show up


def test_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    params = [SamplingParams(temperature=1.0, top_p=0.7)]  # nucleus: tokens 0 and 1
    seen = {Sampler()(logits, params, [None])[0] for _ in range(300)}
    assert seen == {0, 1}


def test_temperature_sampling_follows_softmax():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]])).repeat(3000, 1)
    params = [SamplingParams(temperature=1.0)] * 3000
    counts = torch.bincount(torch.tensor(Sampler()(logits, params, [None] * 3000)), minlength=3)
    freq = counts.float() / 3000
    assert torch.allclose(freq, torch.tensor([0.6, 0.3, 0.1]), atol=0.04), freq


def test_seeded_rows_reproduce_regardless_of_batch():
    logits = _logits(5, seed=1)
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=7)
    gen = make_generator(7, "cpu")
    seq_alone = [Sampler()(logits[2:3], [p], [gen])[0] for _ in range(10)]
    gen = make_generator(7, "cpu")
    others = [SamplingParams(temperature=1.0)] * 5
    seq_batched = []
    for _ in range(10):
        params = others[:2] + [p] + others[3:]
        seq_batched.append(Sampler()(logits, params, [None, None, gen, None, None])[2])
    assert seq_alone == seq_batched
    assert len(set(seq_alone)) > 1  # it really samples


def test_different_seeds_differ():
    logits = torch.zeros(1, 1000)  # uniform: two seeds agreeing on 10 draws is ~impossible
    p = SamplingParams(temperature=1.0)
    g1, g2 = make_generator(1, "cpu"), make_generator(2, "cpu")
    a = [Sampler()(logits, [p], [g1])[0] for _ in range(10)]
    b = [Sampler()(logits, [p], [g2])[0] for _ in range(10)]
    assert a != b

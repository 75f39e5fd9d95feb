"""Batched sampling: greedy, temperature, top-k, top-p, per-request seeds.

All rows are handled with batched tensor ops; only rows with their own seed touch Python once
each (a torch.Generator cannot be shared across rows and keep every row reproducible on its own).
Sampling uses the exponential race (argmax of p / q with q ~ Exp(1)), which draws exactly from p
and needs one random number per vocabulary entry from the row's own generator: a seeded row's
tokens depend only on its logits and its seed, never on what else is in the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from common.protocol import SamplingParams

_GREEDY_EPS = 1e-5  # temperatures below this are greedy


def make_generator(seed: int | None, device: str | torch.device) -> torch.Generator | None:
    """The per-request generator for a seeded request (None when unseeded)."""
    if seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def small_tensor(values: Sequence, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A few per-row values on ``device`` without a host sync: a plain ``torch.tensor(...,
    device=cuda)`` copies from pageable memory and waits for the whole stream, which would stall
    the host behind a step still running on the GPU (the engine overlaps steps)."""
    host = torch.tensor(values, dtype=dtype, pin_memory=device.type == "cuda")
    return host.to(device, non_blocking=True)


class Sampler:
    """Turns a batch of logits rows into one token id per row."""

    def __call__(self, logits: torch.Tensor, params: Sequence[SamplingParams],
                 generators: Sequence[torch.Generator | None]) -> list[int]:
        """``logits`` [N, V] float32; ``params``/``generators`` one per row."""
        return self.sample(logits, params, generators).tolist()

    def sample(self, logits: torch.Tensor, params: Sequence[SamplingParams],
               generators: Sequence[torch.Generator | None]) -> torch.Tensor:
        """Token ids [N] (int64, on the logits' device), queued without waiting for the device."""
        greedy = [p.temperature < _GREEDY_EPS for p in params]
        if all(greedy):
            return logits.argmax(dim=-1)
        dev = logits.device
        temps = small_tensor([1.0 if g else p.temperature for g, p in zip(greedy, params)],
                             torch.float32, dev)
        scaled = self._filter(logits / temps.unsqueeze(1), params)
        probs = torch.softmax(scaled, dim=-1)
        sampled = probs.div_(self._exponentials(probs, generators)).argmax(dim=-1)
        greedy_mask = small_tensor(greedy, torch.bool, dev)
        return torch.where(greedy_mask, logits.argmax(dim=-1), sampled)

    @staticmethod
    def _filter(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
        """Mask everything outside each row's top-k, then outside its top-p nucleus."""
        vocab = logits.shape[1]
        top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
        top_p = [p.top_p for p in params]
        if all(k == vocab for k in top_k) and all(p >= 1.0 for p in top_p):
            return logits
        dev = logits.device
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab, device=dev).unsqueeze(0)
        sorted_logits.masked_fill_(ranks >= small_tensor(top_k, torch.int64, dev).unsqueeze(1), float("-inf"))
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # the top token always stays
        drop = mass_before > small_tensor(top_p, torch.float32, dev).unsqueeze(1)
        sorted_logits.masked_fill_(drop, float("-inf"))
        return torch.empty_like(logits).scatter_(1, order, sorted_logits)

    @staticmethod
    def _exponentials(probs: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
        q = torch.empty_like(probs).exponential_()
        for row, gen in enumerate(generators):
            if gen is not None:
                q[row].exponential_(generator=gen)
        return q

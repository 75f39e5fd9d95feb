"""Model runner: turns a step's chunks into one flat, unpadded batch and runs the model.

Inputs are built on the CPU with a handful of tensor ops per batch (not per token) and moved to
the device once: token ids [T], mRoPE positions [3, T] (sliced from each request's precomputed
table), AttentionMetadata, and the image-embedding rows of the placeholders that fall in each chunk
(a chunk boundary may cut an image's placeholder run: each chunk carries just its own rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.engine.attention import AttentionMetadata
from workers.engine.request import Request
from workers.engine.scheduler import Chunk


@dataclass
class Batch:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [3, T]
    attn: AttentionMetadata
    image_embeds: torch.Tensor | None  # one row per image-token id in input_ids, in order
    sample_rows: torch.Tensor  # [N] rows of the hidden states whose logits are sampled
    sample_reqs: list[Request]


class ModelRunner:
    """Builds flat batches for ``model`` over the paged ``kv_cache`` and returns sampled logits."""

    def __init__(self, model, kv_cache: torch.Tensor, block_size: int, device: torch.device) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.device = device
        self._image_token_id = int(model.image_token_id)
        self._image_token_row: torch.Tensor | None = None
        self.graphs = None  # cuda_graphs.DecodeGraphs, set by the engine on CUDA

    @torch.inference_mode()
    def execute(self, chunks: list[Chunk]) -> tuple[torch.Tensor | None, list[Request]]:
        """Run one step; logits [N, vocab] (float32) of the chunks that end their sequence."""
        if self.graphs is not None and self.graphs.can_run(chunks):  # decode: replay a CUDA graph
            return self.model.compute_logits(self.graphs.run(chunks)), [c.req for c in chunks]
        return self._run_batch(self.build(chunks))

    @torch.inference_mode()
    def execute_ahead(self, reqs: list[Request], token_ids: torch.Tensor) -> torch.Tensor:
        """Decode one token per request whose id is not on the host yet: ``token_ids`` [N] (on
        the device, sampled by the step still running) is token ``num_computed`` of each request.
        Returns logits [N, vocab]. Nothing here waits for the device."""
        chunks = [Chunk(r, r.num_computed, r.num_computed + 1) for r in reqs]
        if self.graphs is not None and self.graphs.bucket_for(len(chunks)) is not None:
            return self.model.compute_logits(self.graphs.run(chunks, token_ids))
        # Such a token is never a prompt placeholder: an image-token id sampled here embeds as
        # text (no image rows are passed), as _generated_image_tokens gives it on the host path.
        batch = self.build(chunks, token_ids)
        logits, _ = self._run_batch(batch)
        return logits

    def _run_batch(self, batch: Batch) -> tuple[torch.Tensor | None, list[Request]]:
        hidden = self.model.forward(batch.input_ids, batch.positions, batch.attn, self.kv_cache,
                                    image_embeds=batch.image_embeds)
        if not batch.sample_reqs:
            return None, []
        return self.model.compute_logits(hidden[batch.sample_rows]), batch.sample_reqs

    # ------------------------------------------------------------------ batch building
    def build(self, chunks: list[Chunk], token_ids: torch.Tensor | None = None) -> Batch:
        """The batch of ``chunks``; ``token_ids`` (device, one per chunk) replaces the host ids of
        single-token chunks whose token is not known yet (``execute_ahead``): all rows sample."""
        query_lens = [c.num_tokens for c in chunks]
        seq_lens = [c.end for c in chunks]
        ends = torch.tensor(query_lens).cumsum(0)
        if token_ids is None:
            ids: list[int] = []
            for c in chunks:
                ids.extend(c.req.token_ids[c.start:c.end])
            token_ids = torch.tensor(ids, dtype=torch.long).to(self.device, non_blocking=True)
            image_embeds = self._image_rows(chunks)
            samples = [i for i, c in enumerate(chunks) if c.samples]
        else:
            image_embeds, samples = None, list(range(len(chunks)))
        dev = self.device
        return Batch(
            input_ids=token_ids,
            positions=torch.cat([c.req.chunk_positions(c.start, c.end) for c in chunks], dim=1).to(dev),
            attn=self._attention_metadata(chunks, query_lens, seq_lens),
            image_embeds=image_embeds,
            sample_rows=(ends[samples] - 1).to(dev),
            sample_reqs=[chunks[i].req for i in samples],
        )

    def _attention_metadata(self, chunks: list[Chunk], query_lens: list[int],
                            seq_lens: list[int]) -> AttentionMetadata:
        width = max(len(c.req.block_ids) for c in chunks)
        tables = torch.tensor([c.req.block_ids + [0] * (width - len(c.req.block_ids)) for c in chunks],
                              dtype=torch.int32)
        q = torch.tensor(query_lens)
        starts = torch.zeros(len(chunks) + 1, dtype=torch.int32)
        starts[1:] = q.cumsum(0)
        # Vectorised slot mapping: token j of row b sits at KV position start_b + j.
        row = torch.repeat_interleave(torch.arange(len(chunks)), q)
        first = torch.tensor([c.start for c in chunks])
        pos = torch.arange(int(starts[-1])) - starts[:-1].long()[row] + first[row]
        slots = tables[row, pos // self.block_size].long() * self.block_size + pos % self.block_size
        dev = self.device
        return AttentionMetadata(
            query_start_loc=starts.to(dev), seq_lens=torch.tensor(seq_lens, dtype=torch.int32).to(dev),
            block_tables=tables.to(dev), slot_mapping=slots.to(dev),
            max_query_len=max(query_lens), max_seq_len=max(seq_lens),
            query_lens=query_lens, seq_lens_cpu=seq_lens)

    def _image_rows(self, chunks: list[Chunk]) -> torch.Tensor | None:
        """Embedding rows for every image-token id in the batch, in order."""
        rows: list[torch.Tensor] = []
        for c in chunks:
            prompt_rows = c.req.chunk_image_rows(c.start, c.end)
            if prompt_rows is not None:
                rows.append(prompt_rows)
            rows.extend(self._generated_image_tokens(c))
        if not rows:
            return None
        return torch.cat([r.to(self.device) for r in rows], dim=0)

    def _generated_image_tokens(self, c: Chunk) -> list[torch.Tensor]:
        """The model may *generate* the image-token id. Such a token is text (no image behind it),
        but the model scatters image rows onto every image-token id: give it that id's own text
        embedding so it embeds exactly as a plain token would."""
        lo = max(c.start, c.req.prompt_len)
        if c.end <= lo:
            return []
        count = c.req.token_ids[lo:c.end].count(self._image_token_id)
        return [self._image_token_embedding()] * count

    def _image_token_embedding(self) -> torch.Tensor:
        if self._image_token_row is None:
            table = self.model.language_model.embed_tokens.weight
            self._image_token_row = table[self._image_token_id].detach().unsqueeze(0).clone()
        return self._image_token_row

"""Offline generation: run the engine in-process over a few prompts, no servers.

Python:
    engine = LLMEngine(EngineConfig(model=path))
    results = generate(engine, [Prompt("Describe it.", (image,))], SamplingParams(max_tokens=32))
CLI:
    python -m workers.engine.offline --model DIR --prompt TEXT [--image PATH ...] [--max-tokens N]
prints each output and the throughput.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from PIL import Image

from common.protocol import SamplingParams
from workers.engine.config import EngineConfig
from workers.engine.engine import LLMEngine
from workers.engine.request import MMItem


@dataclass(frozen=True)
class Prompt:
    """A user turn: text plus images (shown before the text). ``token_ids`` skips the template."""

    text: str = ""
    images: tuple[Image.Image | MMItem, ...] = ()
    token_ids: tuple[int, ...] | None = None


@dataclass
class Result:
    request_id: str
    prompt_tokens: int
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    text: str = ""
    first_token_s: float | None = None  # seconds from start to this request's first token


@dataclass(frozen=True)
class Stats:
    wall_s: float
    prompt_tokens: int
    output_tokens: int

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s if self.wall_s > 0 else 0.0


def chat_token_ids(tokenizer, text: str, num_images: int) -> list[int]:
    """Render the checkpoint's chat template for one user turn (one placeholder per image)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template: pass token ids (Prompt.token_ids) instead")
    content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": text}]
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]


def generate(engine: LLMEngine, prompts: Sequence[Prompt], sampling: SamplingParams = SamplingParams(),
             tokenizer=None) -> tuple[list[Result], Stats]:
    """Run every prompt to completion under continuous batching; results in prompt order."""
    results: dict[str, Result] = {}
    start = time.perf_counter()
    for i, p in enumerate(prompts):
        ids = list(p.token_ids) if p.token_ids is not None else chat_token_ids(tokenizer, p.text, len(p.images))
        rid = f"offline-{i}"
        results[rid] = Result(rid, engine.add_request(rid, ids, p.images, sampling))
    while engine.has_unfinished():
        for out in engine.step():
            res = results.get(out.request_id)
            if res is None:
                continue  # someone else's request on a shared engine
            if res.first_token_s is None and out.new_token_ids:
                res.first_token_s = time.perf_counter() - start
            res.token_ids.extend(out.new_token_ids)
            res.finish_reason = out.finish_reason if out.finished else None
    wall = time.perf_counter() - start
    ordered = list(results.values())
    if tokenizer is not None:
        for r in ordered:
            r.text = tokenizer.decode(r.token_ids, skip_special_tokens=True)
    return ordered, Stats(wall, sum(r.prompt_tokens for r in ordered), sum(len(r.token_ids) for r in ordered))


def _parser() -> argparse.ArgumentParser:
    d = EngineConfig(model="-")
    ap = argparse.ArgumentParser(description="Offline generation with the Triad engine")
    ap.add_argument("--model", required=True, help="HF checkpoint directory")
    ap.add_argument("--prompt", action="append", required=True, help="user text (repeat for a batch)")
    ap.add_argument("--image", action="append", default=[], help="image file shown with every prompt")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=-1)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--ignore-eos", action="store_true")
    ap.add_argument("--device", default=d.device)
    ap.add_argument("--dtype", default=d.dtype)
    ap.add_argument("--load-format", default=d.load_format)
    ap.add_argument("--num-kv-blocks", type=int, default=d.num_kv_blocks)
    ap.add_argument("--kv-cache-mb", type=int, default=d.kv_cache_mb)
    ap.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens)
    ap.add_argument("--attention-backend", default=d.attention_backend)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    from transformers import AutoTokenizer

    a = _parser().parse_args(argv)
    config = EngineConfig(model=a.model, device=a.device, dtype=a.dtype, load_format=a.load_format,
                          num_kv_blocks=a.num_kv_blocks, kv_cache_mb=a.kv_cache_mb,
                          max_num_batched_tokens=a.max_num_batched_tokens, attention_backend=a.attention_backend)
    sampling = SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p,
                              top_k=a.top_k, seed=a.seed, ignore_eos=a.ignore_eos)
    images = tuple(Image.open(p).convert("RGB") for p in a.image)
    t0 = time.perf_counter()
    engine = LLMEngine(config)
    tokenizer = AutoTokenizer.from_pretrained(a.model, local_files_only=True)
    print(f"loaded {a.model} in {time.perf_counter() - t0:.2f}s")
    results, stats = generate(engine, [Prompt(text, images) for text in a.prompt], sampling, tokenizer)
    for r in results:
        print(f"--- {r.request_id} ({r.prompt_tokens} prompt tokens, {len(r.token_ids)} generated, "
              f"finish={r.finish_reason}, first token {r.first_token_s:.3f}s)\n{r.text}")
    print(f"{stats.output_tokens} tokens in {stats.wall_s:.3f}s: {stats.output_tokens_per_s:.1f} tokens/s "
          f"({stats.prompt_tokens} prompt tokens)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

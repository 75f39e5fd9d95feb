"""Evaluate the tiny VLM on a fresh held-out set and report accuracy per question type.

The held-out set uses other seeds than training, image sizes training never draws (640x480,
200x300, ...), and sends every image through a JPEG or PNG round trip. Answers are greedy and
must match the expected answer exactly (after stripping whitespace).

    .venv/bin/python -m tools.tinyvlm.eval --model models/triad-tiny-vlm
    .venv/bin/python -m tools.tinyvlm.eval --model models/triad-tiny-vlm --engine triad   # + compare
"""

from __future__ import annotations

import argparse
import io
import random
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from tools.tinyvlm import data

EVAL_SEED = 10_007  # training draws from its own seed; this stream never meets it
Answerer = Callable[[Sequence[data.Sample]], list[str]]


def round_trip(rng: random.Random, image: Image.Image) -> Image.Image:
    """Encode as JPEG (random quality) or PNG and decode again, as an uploaded file would be."""
    buf = io.BytesIO()
    if rng.random() < 0.5:
        image.save(buf, format="JPEG", quality=rng.randint(70, 95))
    else:
        image.save(buf, format="PNG")
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def held_out_set(n_per_type: int, seed: int = EVAL_SEED) -> list[data.Sample]:
    """``n_per_type`` samples of each question type at held-out image sizes, round-tripped."""
    rng = random.Random(seed)
    out = []
    for i in range(n_per_type * len(data.QUESTION_TYPES)):
        qtype = data.QUESTION_TYPES[i % len(data.QUESTION_TYPES)]
        s = data.make_sample(rng, size=data.EVAL_SIZES[i % len(data.EVAL_SIZES)], qtype=qtype)
        out.append(data.Sample(round_trip(rng, s.image), s.color, s.shape, s.qtype, s.question))
    return out


def prompt_ids(tokenizer, question: str) -> list[int]:
    """Chat-template token ids for one user turn: the image, then the question."""
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return list(tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False))


# ---------------------------------------------------------------------------------------------
# Answerers: transformers (reference) and the Triad engine


def hf_answerer(model_dir: Path, batch_size: int = 32, max_new_tokens: int = 8) -> Answerer:
    """Greedy answers from transformers' own model class (left-padded batched generate)."""
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

    from tools.tinyvlm.build import model_class

    cfg = AutoConfig.from_pretrained(model_dir)
    model = model_class(cfg.model_type).from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    proc = AutoImageProcessor.from_pretrained(model_dir)

    def answer(samples: Sequence[data.Sample]) -> list[str]:
        texts = []
        for i in range(0, len(samples), batch_size):
            texts += _hf_generate(model, tok, proc, samples[i:i + batch_size], max_new_tokens)
        return texts

    return answer


def _hf_generate(model, tok, proc, samples: Sequence[data.Sample], max_new_tokens: int) -> list[str]:
    cfg = model.config
    pix = proc([s.image for s in samples], return_tensors="pt")
    counts = (pix["image_grid_thw"].prod(-1) // cfg.vision_config.spatial_merge_size ** 2).tolist()
    rows = []
    for s, n in zip(samples, counts):
        ids = prompt_ids(tok, s.question)
        rows.append([t for i in ids for t in ([i] * n if i == cfg.image_token_id else [i])])
    width = max(map(len, rows))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pix["pixel_values"],
                             image_grid_thw=pix["image_grid_thw"], mm_token_type_ids=(ids == cfg.image_token_id).long(),
                             max_new_tokens=max_new_tokens, do_sample=False)
    return [tok.decode(o[width:], skip_special_tokens=True).strip() for o in out]


def triad_answerer(model_dir: Path, max_new_tokens: int = 8) -> Answerer:
    """Greedy answers from Triad's own engine (workers.engine), run in-process."""
    from transformers import AutoTokenizer

    from common.protocol import SamplingParams
    from workers.engine.config import EngineConfig
    from workers.engine.engine import LLMEngine
    from workers.engine.offline import Prompt, generate

    engine = LLMEngine(EngineConfig(model=str(model_dir)))
    tok = AutoTokenizer.from_pretrained(model_dir)
    sampling = SamplingParams(max_tokens=max_new_tokens, temperature=0.0)

    def answer(samples: Sequence[data.Sample]) -> list[str]:
        prompts = [Prompt(token_ids=tuple(prompt_ids(tok, s.question)), images=(s.image,)) for s in samples]
        results, _ = generate(engine, prompts, sampling, tok)
        return [r.text.strip() for r in results]

    return answer


# ---------------------------------------------------------------------------------------------
# Scoring


@dataclass(frozen=True)
class Report:
    """Accuracy per question type and overall, plus the raw answers."""

    per_type: dict[str, float]
    overall: float
    answers: list[str]
    seconds: float

    def lines(self) -> list[str]:
        rows = [f"{t:9s} {acc * 100:6.2f}%" for t, acc in self.per_type.items()]
        return rows + [f"{'overall':9s} {self.overall * 100:6.2f}%  ({len(self.answers)} questions, "
                       f"{self.seconds:.1f} s)"]


def score(samples: Sequence[data.Sample], answers: Sequence[str], seconds: float = 0.0) -> Report:
    hits: dict[str, list[bool]] = defaultdict(list)
    for s, a in zip(samples, answers, strict=True):
        hits[s.qtype].append(a == s.answer)
    per_type = {t: sum(v) / len(v) for t, v in hits.items()}
    overall = sum(sum(v) for v in hits.values()) / len(samples)
    return Report(per_type, overall, list(answers), seconds)


def evaluate(answerer: Answerer, samples: Sequence[data.Sample]) -> Report:
    t0 = time.perf_counter()
    answers = answerer(samples)
    return score(samples, answers, time.perf_counter() - t0)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="accuracy of the tiny VLM on a fresh held-out set")
    ap.add_argument("--model", type=Path, default=Path("models/triad-tiny-vlm"))
    ap.add_argument("--n-per-type", type=int, default=200)
    ap.add_argument("--seed", type=int, default=EVAL_SEED)
    ap.add_argument("--engine", choices=["hf", "triad"], default="hf",
                    help="triad: also run the set through Triad's engine and compare with transformers")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    samples = held_out_set(a.n_per_type, a.seed)
    hf = evaluate(hf_answerer(a.model), samples)
    print("transformers greedy:\n  " + "\n  ".join(hf.lines()))
    if a.engine == "triad":
        ours = evaluate(triad_answerer(a.model), samples)
        print("triad engine greedy:\n  " + "\n  ".join(ours.lines()))
        same = sum(x == y for x, y in zip(hf.answers, ours.answers))
        print(f"triad == transformers on {same}/{len(samples)} answers")
        return 0 if same == len(samples) else 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

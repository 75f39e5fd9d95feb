"""Train the tiny VLM (Qwen2.5-VL architecture) that answers colour/shape questions about one shape.

End to end with transformers' ``Qwen2_5_VLForConditionalGeneration`` on CPU, loss only on the
assistant's answer tokens, PLUS auxiliary heads on the vision tower output: shape and colour
classification of the attention-pooled image, and a dense per-token target (which shape the
token covers, or background). The LM loss alone reaches the vision tower only weakly and leaves
shape near chance for a long time. The aux heads are not saved.

    .venv/bin/python -m tools.tinyvlm.train --out models/triad-tiny-vlm
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from tools.tinyvlm import build, data

# Small enough for <= 10 MB of float32 weights, large enough to see a shape: patch 8 so an image
# gives ~250 patches (64 LM tokens) instead of ~80 with patch 14 at the same token count.
TRAINED_SIZES = build.TinySizes(
    hidden=128, intermediate=384, layers=3, heads=4, kv_heads=2, mrope_section=(4, 6, 6),
    rope_theta=10000.0, vision_hidden=96, vision_intermediate=192, vision_depth=4, vision_heads=1,
    fullatt_block_indexes=(1, 3), patch_size=8, window_size=64, text_init_std=0.02, vision_init_std=0.02)
TRAINED_PROCESSOR = build.ProcessorSizes(min_pixels=112 * 112, max_pixels=128 * 128, patch_size=8)


@dataclass(frozen=True)
class TrainConfig:
    """One training run; the same config and seed give the same weights."""

    out: Path = Path("models/triad-tiny-vlm")
    seed: int = 0
    steps: int = 1800  # ~26 min on the 2-core machine when nothing else runs on it
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 60
    weight_decay: float = 0.01
    aux_weight: float = 5.0
    dense_aux: bool = True  # per-token shape/background targets: a dense signal, learns far faster
    sizes_json: str = ""  # experiments: JSON overriding fields of `sizes` (e.g. '{"vision_depth": 6}')
    threads: int = 2
    workers: int = 0  # DataLoader processes drawing batches (0: in the training process)
    time_limit_s: float = 0.0  # > 0: stop early (and still save) once training has run this long
    device: str = "cpu"  # the shipped model is trained on CPU; "cuda" only to try settings fast
    sizes: build.TinySizes = field(default=TRAINED_SIZES)
    processor: build.ProcessorSizes = field(default=TRAINED_PROCESSOR)

    def __post_init__(self) -> None:
        if self.sizes_json:
            object.__setattr__(self, "sizes", dataclasses.replace(self.sizes, **json.loads(self.sizes_json)))
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("steps and batch_size must be >= 1 and lr > 0")


class AuxHead(nn.Module):
    """Direct signals for the vision tower: attention-pooled features -> shape and colour logits,
    and (dense) each merged token -> which shape it belongs to, or background."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.score = nn.Linear(dim, 1)
        self.shape = nn.Linear(dim, len(data.SHAPES))
        self.color = nn.Linear(dim, len(data.COLORS))
        self.token = nn.Linear(dim, len(data.SHAPES) + 1)

    def forward(self, feats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = torch.stack([(torch.softmax(self.score(f), dim=0) * f).sum(0) for f in feats])
        return self.shape(pooled), self.color(pooled)


def dense_targets(samples: list[data.Sample], grid: torch.Tensor) -> torch.Tensor:
    """Per merged token: a soft target over (shapes..., background) from the mask's coverage."""
    rows = []
    for s, (_, gh, gw) in zip(samples, grid.tolist()):
        cov = torch.tensor(list(s.mask.resize((gw // 2, gh // 2), Image.BOX).getdata()), dtype=torch.float32) / 255
        t = torch.zeros(len(cov), len(data.SHAPES) + 1)
        t[:, data.SHAPES.index(s.shape)] = cov
        t[:, -1] = 1 - cov
        rows.append(t)
    return torch.cat(rows)


def train_size(rng: random.Random) -> tuple[int, int]:
    """A training image size (never one of the held-out eval sizes)."""
    while (size := data.random_size(rng, 80, 448)) in data.EVAL_SIZES:
        pass
    return size


def encode_sample(tokenizer, sample: data.Sample, image_tokens: int, image_id: int) -> tuple[list[int], list[int]]:
    """Token ids (image placeholder expanded) and labels (-100 except the answer and <|im_end|>)."""
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample.question}]}]
    prompt = list(tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False))
    prompt = [t for i in prompt for t in ([i] * image_tokens if i == image_id else [i])]
    target = tokenizer(sample.answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
    return prompt + target, [-100] * len(prompt) + target


def make_batch(samples: list[data.Sample], tokenizer, processor, cfg) -> dict:
    """Model inputs for a batch: right-padded ids, labels, mask, pixel values and grids."""
    pix = processor([s.image for s in samples], return_tensors="pt")
    grid = pix["image_grid_thw"]
    counts = (grid.prod(-1) // 4).tolist()
    rows = [encode_sample(tokenizer, s, n, cfg.image_token_id) for s, n in zip(samples, counts)]
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([r[0] + [pad] * (width - len(r[0])) for r in rows])
    labels = torch.tensor([r[1] + [-100] * (width - len(r[1])) for r in rows])
    mask = torch.tensor([[1] * len(r[0]) + [0] * (width - len(r[0])) for r in rows])
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "pixel_values": pix["pixel_values"],
            "image_grid_thw": grid, "mm_token_type_ids": (ids == cfg.image_token_id).long()}


def draw_batch(rng: random.Random, n: int) -> list[data.Sample]:
    return [data.make_sample(rng, size=train_size(rng)) for _ in range(n)]


def aux_targets(samples: list[data.Sample], grid: torch.Tensor) -> dict:
    return {"shape_y": torch.tensor([data.SHAPES.index(s.shape) for s in samples]),
            "color_y": torch.tensor([sorted(data.COLORS).index(s.color) for s in samples]),
            "dense_y": dense_targets(samples, grid)}


class BatchStream(torch.utils.data.IterableDataset):
    """Endless fresh batches (model inputs + aux targets). Worker ``i`` of ``n`` draws from its
    own seeded stream, so a fixed ``--workers`` gives the same batches in the same order."""

    def __init__(self, cfg: "TrainConfig", tokenizer, processor, model_config) -> None:
        self.cfg, self.tokenizer, self.processor, self.model_config = cfg, tokenizer, processor, model_config

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rng = random.Random(self.cfg.seed * 1000 + (info.id if info else 0))
        while True:
            samples = draw_batch(rng, self.cfg.batch_size)
            batch = make_batch(samples, self.tokenizer, self.processor, self.model_config)
            yield batch | aux_targets(samples, batch["image_grid_thw"])


def capture_vision(model) -> list:
    """Keep the vision tower's merged output of the latest forward (for the aux head). A hook,
    not a hand-rolled forward, so the model runs exactly as transformers runs it."""
    store: list = []

    def hook(_module, _inputs, output) -> None:
        store[:] = [output if torch.is_tensor(output) else output.pooler_output]

    model.model.visual.register_forward_hook(hook)
    return store


def step_loss(model, aux: AuxHead, vision_out: list, batch: dict, cfg: "TrainConfig"):
    """LM loss on answer tokens + aux losses; returns (loss, lm_loss, shape_acc)."""
    targets = {k: batch.pop(k) for k in ("shape_y", "color_y", "dense_y")}
    out = model(**batch)
    feats = vision_out[0]
    shape_logits, color_logits = aux(list(torch.split(feats, (batch["image_grid_thw"].prod(-1) // 4).tolist())))
    ce = nn.functional.cross_entropy
    aux_loss = ce(shape_logits, targets["shape_y"]) + 0.5 * ce(color_logits, targets["color_y"])
    if cfg.dense_aux:
        aux_loss = aux_loss + ce(aux.token(feats), targets["dense_y"])
    acc = (shape_logits.argmax(-1) == targets["shape_y"]).float().mean().item()
    return out.loss + cfg.aux_weight * aux_loss, out.loss.item(), acc


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup then cosine decay to 5% of the peak."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


def build_model(cfg: TrainConfig):
    """Tokenizer, model, aux head and image processor, seeded."""
    torch.manual_seed(cfg.seed)
    tokenizer = build.build_tokenizer()
    model = build.model_class("qwen2_5_vl")(build.make_config("qwen2_5_vl", tokenizer, cfg.sizes))
    aux = AuxHead(cfg.sizes.hidden)
    return tokenizer, model, aux, build.make_image_processor(cfg.processor)


def train(cfg: TrainConfig) -> Path:
    """Run the training loop and write the model dir to ``cfg.out``."""
    torch.set_num_threads(cfg.threads)
    tokenizer, model, aux, processor = build_model(cfg)
    model.to(cfg.device)
    aux.to(cfg.device)
    vision_out = capture_vision(model)
    stream = torch.utils.data.DataLoader(BatchStream(cfg, tokenizer, processor, model.config), batch_size=None,
                                         num_workers=cfg.workers)
    params = list(model.parameters()) + list(aux.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    model.train()
    start, done, bar = time.time(), 0, tqdm(zip(range(cfg.steps), stream), total=cfg.steps, desc="train", mininterval=5)
    for step, batch in bar:
        if cfg.time_limit_s and time.time() - start > cfg.time_limit_s:
            break
        batch = {k: v.to(cfg.device) for k, v in batch.items()}
        loss, lm, acc = step_loss(model, aux, vision_out, batch, cfg)
        optimizer_step(opt, params, loss, lr_at(step, cfg))
        bar.set_postfix(loss=f"{loss.item():.3f}", lm=f"{lm:.3f}", shape_acc=f"{acc:.2f}")
        done = step + 1
    print(f"trained {done} of {cfg.steps} steps in {time.time() - start:.0f} s")
    model.to("cpu").eval()
    return build.write_model_dir(model, tokenizer, cfg.out, processor=cfg.processor)


def optimizer_step(opt: torch.optim.Optimizer, params: list, loss: torch.Tensor, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


def main() -> None:
    defaults = TrainConfig()
    ap = argparse.ArgumentParser(description="train the tiny VLM on synthetic shapes (CPU)")
    for f in fields(TrainConfig):
        if f.name in ("sizes", "processor"):
            continue
        kind = type(getattr(defaults, f.name))
        kind = (lambda v: v.lower() in ("1", "true", "yes")) if kind is bool else kind
        ap.add_argument("--" + f.name.replace("_", "-"), type=kind, default=getattr(defaults, f.name))
    args = vars(ap.parse_args())
    print(train(TrainConfig(**args)))


if __name__ == "__main__":
    main()

"""Engine-level benchmark (no HTTP) at the exact Qwen2.5-VL-7B shapes, random weights, bf16.

Measures, on one CUDA GPU, the engine as configured for GPUs (Triton attention, decode CUDA
graphs, fused MLPs, compiled LM layers and vision blocks, vision CUDA graphs; ``--no-compile`` for
the eager baseline):
  1. vision tower images/s for 512x512 images (1296 patches -> 324 LM tokens each), batch 1/8/32,
     both dispatched op by op ("vision") and replayed as CUDA graphs ("vision_graphs"), each with
     compiled and with eager blocks (the other setting in a second, vision-only engine; skip it
     with ``--no-vision-alt``);
  2. TTFT for one 512x512 image + 1000 text tokens: vision tower (the engine's path: graphs unless
     ``--no-vision-graphs``) + prefill + first token, through the engine (add_request with the
     encoded item, step until the first token);
  3. decode output tokens/s by batch size (1, 8, 32, 64, 128) with CUDA graphs, and without them
     at a few sizes for comparison; the GPU time of one graph replay alone.
Token ids are random (no tokenizer needed); pixel values are random (no image processor).

    python tests/perf/bench_engine.py --out bench.json
prints a table and writes every number as JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common.protocol import SamplingParams
from workers.engine.config import EngineConfig
from workers.engine.engine import LLMEngine
from workers.engine.request import MMItem
from workers.engine.vision_graphs import VisionGraphs

CONFIG_7B = Path(__file__).resolve().parents[2] / "tools" / "configs" / "qwen2_5_vl_7b.json"
PATCH_DIM = 3 * 2 * 14 * 14  # channels x temporal patch x patch x patch
GRID_512 = (1, 36, 36)  # a 512x512 image after the processor's resize to multiples of 28
# Device copy rates measured on this workplace's machines (bytes read + written per s), taken as
# the read rate: H100 80GB HBM3 ~2.95 TB/s, H200 ~4.3 TB/s. Unknown devices use the H100's.
HBM_BYTES_PER_S = {"H100": 2.95e12, "H200": 4.3e12}


def hbm_bytes_per_s() -> float:
    name = torch.cuda.get_device_name()
    return next((rate for key, rate in HBM_BYTES_PER_S.items() if key in name), HBM_BYTES_PER_S["H100"])


def model_dir() -> Path:
    """A checkpoint directory holding only the 7B config.json (weights: --load-format dummy)."""
    d = Path(tempfile.mkdtemp(prefix="qwen7b_cfg_"))
    shutil.copy(CONFIG_7B, d / "config.json")
    return d


def timed(fn, repeat: int, warmup: int = 1) -> list[float]:
    """Seconds per call of fn (synchronised), after warm-up."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def random_pixels(n_images: int) -> tuple[torch.Tensor, torch.Tensor]:
    t, h, w = GRID_512
    grid = torch.tensor([GRID_512] * n_images)  # on the host, as the image processor returns it
    pixels = torch.randn(n_images * t * h * w, PATCH_DIM, device="cuda", dtype=torch.bfloat16)
    return pixels, grid


def random_text(n: int, vocab: int, avoid: int, gen: torch.Generator) -> list[int]:
    ids = torch.randint(0, min(vocab, 150000), (n,), generator=gen).tolist()
    return [i if i != avoid else i + 1 for i in ids]


# ----------------------------------------------------------------------------- vision


def bench_vision(encode, batches: list[int], repeat: int) -> dict:
    """images/s of ``encode(pixels, grid)`` (the first warm-up call also captures a graph)."""
    out = {}
    for bs in batches:
        pixels, grid = random_pixels(bs)
        times = timed(lambda: encode(pixels, grid), repeat, warmup=2)
        med = statistics.median(times)
        out[bs] = {"median_s": med, "images_per_s": bs / med, "times_s": times}
    return out


def bench_vision_paths(engine: LLMEngine, batches: list[int], repeat: int) -> tuple[dict, dict]:
    """(op-by-op, CUDA graphs) timings of one engine's tower. The graph runner here has no patch
    cap, so that batch 32 runs as a graph too (the engine's own runner runs it eagerly)."""
    dispatched = bench_vision(engine.model.encode_images, batches, repeat)
    t, h, w = GRID_512
    graphs = VisionGraphs(engine.model.visual, max_patches=max(batches) * t * h * w)
    graphed = bench_vision(graphs, batches, repeat)
    assert graphs.num_captures == len(batches) and not graphs.failed, "a vision graph capture failed"
    return dispatched, graphed


def vision_alt_engine(compile_vision: bool) -> LLMEngine:
    """A vision-only engine with the given block compilation (to compare both under graphs)."""
    return LLMEngine(EngineConfig(model=str(model_dir()), device="cuda", dtype="bfloat16", load_format="dummy",
                                  parts=("vision",), compile_vision=compile_vision))


def encode_like_engine(engine: LLMEngine, pixels: torch.Tensor, grid: torch.Tensor) -> list[torch.Tensor]:
    """The tower as ``LLMEngine.encode_images`` runs it (graphs when on), without the processor."""
    if engine.vision_graphs is None:
        return engine.model.encode_images(pixels, grid)
    grids = [tuple(g) for g in grid.tolist()]
    return list(engine.vision_graphs(pixels, grids).split([engine.model.tokens_per_image(g) for g in grids]))


# ----------------------------------------------------------------------------- TTFT


def ttft_once(engine: LLMEngine, rid: str, text: list[int], pixels, grid) -> dict:
    m = engine.model
    t0 = time.perf_counter()
    embeds = encode_like_engine(engine, pixels, grid)[0]
    item = MMItem(embeds=embeds, num_tokens=int(embeds.shape[0]), extras={"grid_thw": list(GRID_512)})
    half = len(text) // 2
    engine.add_request(rid, text[:half] + [m.image_token_id] + text[half:], [item],
                       SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    while not any(o.new_token_ids for o in engine.step() if o.request_id == rid):
        pass
    t2 = time.perf_counter()
    return {"ttft_s": t2 - t0, "vision_s": t1 - t0, "prefill_s": t2 - t1}


def bench_ttft(engine: LLMEngine, text_tokens: int, repeat: int) -> dict:
    gen = torch.Generator().manual_seed(1)
    pixels, grid = random_pixels(1)
    runs = []
    for i in range(repeat + 2):  # the first two warm up (Triton compiles the prefill kernel)
        text = random_text(text_tokens, engine.model.vocab_size, engine.model.image_token_id, gen)
        runs.append(ttft_once(engine, f"ttft{i}", text, pixels, grid))
    runs = runs[2:]
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    return {"prompt_tokens": text_tokens + 324, **{k + "_median": v for k, v in med.items()},
            "vision_path": "eager" if engine.vision_graphs is None else "graphs", "runs": runs}


# ----------------------------------------------------------------------------- decode


def bench_decode(engine: LLMEngine, batch: int, prompt_len: int, new_tokens: int) -> dict:
    """Prefill ``batch`` prompts, then time the decode steps until all are done."""
    gen = torch.Generator().manual_seed(batch)
    sampling = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"d{batch}-{i}",
                           random_text(prompt_len, engine.model.vocab_size, engine.model.image_token_id, gen),
                           sampling=sampling)
    started: set[str] = set()
    while len(started) < batch:  # prefill steps (chunked under the token budget)
        started.update(o.request_id for o in engine.step() if o.new_token_ids)
    torch.cuda.synchronize()
    t0, steps, tokens = time.perf_counter(), 0, 0
    while engine.has_unfinished():
        tokens += sum(len(o.new_token_ids) for o in engine.step())
        steps += 1
    dt = time.perf_counter() - t0
    return {"batch": batch, "decode_tokens": tokens, "steps": steps, "seconds": dt,
            "tokens_per_s": tokens / dt, "ms_per_step": 1e3 * dt / max(steps, 1)}


def bench_decode_all(engine: LLMEngine, batches: list[int], eager_batches: list[int],
                     prompt_len: int, new_tokens: int) -> dict:
    bench_decode(engine, batches[0], prompt_len, 8)  # warm-up
    graphed = {b: bench_decode(engine, b, prompt_len, new_tokens) for b in batches}
    overlap, engine.overlap_decode = engine.overlap_decode, False  # each step read before the next
    try:
        sequential = {b: bench_decode(engine, b, prompt_len, new_tokens) for b in batches}
    finally:
        engine.overlap_decode = overlap
    graphs, engine.runner.graphs = engine.runner.graphs, None
    try:
        eager = {b: bench_decode(engine, b, prompt_len, new_tokens) for b in eager_batches}
    finally:
        engine.runner.graphs = graphs
    return {"graphs": graphed, "graphs_no_overlap": sequential, "eager": eager}


def replay_ms(engine: LLMEngine, buckets: list[int], context: int, repeat: int = 50) -> dict:
    """GPU time of one decode graph replay (no engine/CPU work) at a given context length."""
    graphs = engine.runner.graphs
    d = graphs.dev
    blocks = -(-context // engine.config.block_size)
    d.slots.fill_(-1)  # write nothing
    d.seq_lens.fill_(context)
    d.tables.copy_(torch.arange(d.tables.numel(), device="cuda").view_as(d.tables) % engine.kv_cache.shape[0])
    out = {}
    for bs in buckets:
        graph = graphs.graphs[graphs.bucket_for(bs)][0]
        out[bs] = 1e3 * statistics.median(timed(graph.replay, repeat, warmup=3))
    d.seq_lens.zero_()
    return {"context": context, "blocks": blocks, "ms": out}


def profile_table(fn, steps: int, title: str) -> str:
    """torch.profiler over ``steps`` calls of fn: the top kernels/ops by device time."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    try:
        table = prof.key_averages().table(sort_by="device_time_total", row_limit=30)
    except (AttributeError, KeyError, ValueError):
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)
    return f"\n##### {title} ({steps} calls)\n{table}\n"


def profiles(engine: LLMEngine, path: str) -> None:
    pixels1, grid1 = random_pixels(1)
    pixels32, grid32 = random_pixels(32)
    text = random_text(600, engine.model.vocab_size, engine.model.image_token_id, torch.Generator())
    engine.add_request("prof", text, sampling=SamplingParams(max_tokens=4000, temperature=0.0, ignore_eos=True))
    engine.step()
    parts = [profile_table(lambda: engine.model.encode_images(pixels1, grid1), 3, "vision bs 1"),
             profile_table(lambda: engine.model.encode_images(pixels32, grid32), 1, "vision bs 32"),
             profile_table(engine.step, 20, "engine.step, decode batch 1 (graphs)")]
    if engine.vision_graphs is not None:
        parts.append(profile_table(lambda: encode_like_engine(engine, pixels1, grid1), 3, "vision bs 1 (graph)"))
    engine.abort("prof")
    Path(path).write_text("".join(parts))


# ----------------------------------------------------------------------------- main


def floors(engine: LLMEngine) -> dict:
    """The time floors: decode reads every LM weight once per step; vision FLOPs at ~750 TFLOP/s."""
    lm_bytes = sum(p.numel() * p.element_size() for n, p in engine.model.named_parameters()
                   if not n.startswith("visual."))
    vis_params = sum(p.numel() for p in engine.model.visual.parameters())
    patches = GRID_512[0] * GRID_512[1] * GRID_512[2]
    vision_flops = 2 * vis_params * patches  # matmuls; attention adds ~4%
    rate = hbm_bytes_per_s()
    return {"lm_weight_bytes": lm_bytes, "hbm_bytes_per_s": rate, "decode_floor_ms": 1e3 * lm_bytes / rate,
            "decode_b1_ceiling_tok_s": rate / lm_bytes,
            "vision_flops_per_image": vision_flops,
            "vision_ceiling_images_s": 750e12 / vision_flops}


def print_table(r: dict) -> None:
    print("\n=== Qwen2.5-VL-7B shapes, bf16, dummy weights:", r["device"])
    f = r["floors"]
    print(f"floors: decode b1 {f['decode_floor_ms']:.2f} ms/token ({f['decode_b1_ceiling_tok_s']:.0f} tok/s);"
          f" vision {f['vision_ceiling_images_s']:.0f} images/s at 750 TFLOP/s")
    for key, path in (("vision", "op by op"), ("vision_graphs", "graphs")):
        for mode in ("eager", "compiled"):
            for bs, v in r.get(key, {}).get(mode, {}).items():
                print(f"vision {path:8s} {mode:8s} blocks bs {bs:>3}: {v['images_per_s']:8.1f} images/s "
                      f"({1e3 * v['median_s']:.1f} ms)")
    print_lm("compiled LM: " if not r["args"]["no_compile"] else "eager LM: ", r, r["args"]["ttft_text"])


def print_lm(label: str, r: dict, ttft_text: int) -> None:
    t = r["ttft"]
    print(f"{label}TTFT 1 image 512x512 + {ttft_text} text tokens: {1e3 * t['ttft_s_median']:.1f} ms "
          f"(vision {1e3 * t['vision_s_median']:.1f} ms ({t['vision_path']}), "
          f"prefill+sample {1e3 * t['prefill_s_median']:.1f} ms)")
    for mode, runs in r["decode"].items():
        for b, v in runs.items():
            print(f"{label}decode {mode:17s} batch {b:>3}: {v['tokens_per_s']:9.1f} tokens/s "
                  f"({v['ms_per_step']:.2f} ms/step)")
    rep = r.get("replay")
    if rep:
        print(f"{label}graph replay alone at context {rep['context']}: "
              + ", ".join(f"bs {b}: {ms:.2f} ms" for b, ms in rep["ms"].items()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench_engine.json")
    ap.add_argument("--batches", default="1,8,32,64,128")
    ap.add_argument("--eager-batches", default="1,64")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--ttft-text", type=int, default=1000)
    ap.add_argument("--vision-batches", default="1,8,32")
    ap.add_argument("--no-compile", action="store_true",
                    help="engine with compile_lm=False, compile_vision=False (the eager baseline)")
    ap.add_argument("--no-vision-graphs", action="store_true",
                    help="engine with vision_cuda_graphs=False (TTFT then encodes op by op)")
    ap.add_argument("--no-vision-alt", action="store_true",
                    help="skip the second, vision-only engine with the other compile_vision setting")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--profile", default="", help="write torch.profiler tables to this file")
    a = ap.parse_args()
    batches = [int(x) for x in a.batches.split(",")]
    t0 = time.perf_counter()
    engine = LLMEngine(EngineConfig(
        model=str(model_dir()), device="cuda", dtype="bfloat16", load_format="dummy",
        attention_backend="triton", max_num_seqs=max(batches), max_num_batched_tokens=8192,
        kv_cache_mb=24576, max_model_len=4096, compile_lm=not a.no_compile, compile_vision=not a.no_compile,
        vision_cuda_graphs=not a.no_vision_graphs))
    r = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "args": vars(a),
         "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "floors": floors(engine),
         "engine_init_s": time.perf_counter() - t0}
    print(f"engine ready in {r['engine_init_s']:.1f}s (weights + KV + compile + graph capture)", flush=True)
    vb = [int(x) for x in a.vision_batches.split(",")]
    mode = "eager" if a.no_compile else "compiled"
    r["vision"], r["vision_graphs"] = {}, {}
    r["vision"][mode], r["vision_graphs"][mode] = bench_vision_paths(engine, vb, a.repeat)
    if not a.no_vision_alt:
        alt = vision_alt_engine(compile_vision=a.no_compile)
        other = "compiled" if a.no_compile else "eager"
        r["vision"][other], r["vision_graphs"][other] = bench_vision_paths(alt, vb, a.repeat)
        del alt
        torch.cuda.empty_cache()
    r["ttft"] = bench_ttft(engine, a.ttft_text, a.repeat)
    r["decode"] = bench_decode_all(engine, batches, [int(x) for x in a.eager_batches.split(",") if x],
                                   a.prompt_len, a.new_tokens)
    r["replay"] = replay_ms(engine, [1, 64, 128], a.prompt_len + a.new_tokens // 2)
    if a.profile:
        profiles(engine, a.profile)
    Path(a.out).write_text(json.dumps(r, indent=1, default=str))
    print_table(r)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""LLMEngine against HF ``generate`` (fp32, CPU, tiny random Qwen2.5-VL): token for token.

Besides the 32 greedy tokens, every step's logits are compared with HF's (random tiny models
often repeat one token, so equal tokens alone would prove little).
"""

from __future__ import annotations

import pytest
import torch

from common.protocol import SamplingParams
from tests.support.hf_reference import build_inputs, load_hf_model, load_tokenizer
from workers.engine.config import EngineConfig
from workers.engine.engine import LLMEngine
from workers.engine.offline import Prompt, generate
from workers.engine.sampler import Sampler

N_NEW = 32
TOL = 1e-4
GREEDY = SamplingParams(max_tokens=N_NEW, temperature=0.0, ignore_eos=True)
CASES = {
    "text": ("Tell me a short story about a fox and a dog.", 0),
    "one_image": ("What is in the picture?", 1),
    "two_images": ("Compare the two pictures.", 2),
}


class RecordingSampler(Sampler):
    """The real sampler, keeping each batch's logits so the test can compare them with HF's."""

    def __init__(self) -> None:
        self.rows: list[torch.Tensor] = []

    def sample(self, logits, params, generators):
        self.rows.extend(logits.clone())
        return super().sample(logits, params, generators)


@pytest.fixture(scope="module")
def hf_model(tiny_qwen_dir):
    return load_hf_model(tiny_qwen_dir)


@pytest.fixture(scope="module")
def engine(tiny_qwen_dir):
    return LLMEngine(EngineConfig(model=str(tiny_qwen_dir), num_kv_blocks=64))


def case_inputs(path, case: str, test_images):
    text, n_images = CASES[case]
    return build_inputs(path, text, test_images[:n_images])


def hf_generate(hf_model, inputs) -> tuple[list[int], list[torch.Tensor]]:
    with torch.no_grad():
        out = hf_model.generate(**inputs.kwargs, max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False,
                                output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, len(inputs.expanded_ids):].tolist(), [x[0].float() for x in out.logits]


def engine_generate(engine, inputs, images) -> tuple[list[int], list[torch.Tensor], int]:
    engine.sampler = RecordingSampler()
    [res], _ = generate(engine, [Prompt(token_ids=tuple(inputs.prompt_ids), images=tuple(images))], GREEDY)
    assert res.finish_reason == "length"
    return res.token_ids, engine.sampler.rows, res.prompt_tokens


def assert_same_run(ours, ref) -> None:
    tokens, logits = ours
    ref_tokens, ref_logits = ref
    assert tokens == ref_tokens
    assert len(logits) == len(ref_logits) == N_NEW
    for step, (a, b) in enumerate(zip(logits, ref_logits)):
        assert torch.allclose(a, b, atol=TOL, rtol=0), f"step {step}: max diff {(a - b).abs().max():.2e}"


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_matches_hf_generate(case, engine, hf_model, tiny_qwen_dir, test_images):
    inputs = case_inputs(tiny_qwen_dir, case, test_images)
    images = test_images[:CASES[case][1]]
    tokens, logits, prompt_tokens = engine_generate(engine, inputs, images)
    assert prompt_tokens == len(inputs.expanded_ids)
    assert_same_run((tokens, logits), hf_generate(hf_model, inputs))
    assert engine.block_manager.num_free == engine.block_manager.num_blocks


def test_chunked_prefill_equals_unchunked(engine, tiny_qwen_dir, test_images):
    inputs = case_inputs(tiny_qwen_dir, "two_images", test_images)
    # With 16-token chunks the images' placeholder runs are cut by chunk boundaries.
    first_image = inputs.expanded_ids.index(engine.model.image_token_id)
    assert first_image % 16 != 0
    chunked = LLMEngine(EngineConfig(model=str(tiny_qwen_dir), num_kv_blocks=64, max_num_batched_tokens=16))
    tokens, logits, _ = engine_generate(chunked, inputs, test_images)
    ref_tokens, ref_logits, _ = engine_generate(engine, inputs, test_images)
    assert_same_run((tokens, logits), (ref_tokens, ref_logits))


def test_encoded_embeddings_equal_pixel_input(engine, tiny_qwen_dir, test_images):
    vision = LLMEngine(EngineConfig(model=str(tiny_qwen_dir), parts=("vision",)))
    assert vision.kv_cache is None
    items = vision.encode_images(test_images)
    assert [it.extras["grid_thw"] for it in items] == [list(g) for g in case_inputs(
        tiny_qwen_dir, "two_images", test_images).grid_thw]
    assert [it.num_tokens for it in items] == [it.embeds.shape[0] for it in items]
    assert items[0].content_hash != items[1].content_hash
    assert items[0].content_hash == vision.encode_images(test_images[:1])[0].content_hash
    inputs = case_inputs(tiny_qwen_dir, "two_images", test_images)
    from_embeds = engine_generate(engine, inputs, items)
    from_pixels = engine_generate(engine, inputs, test_images)
    assert from_embeds[0] == from_pixels[0]
    assert all(torch.allclose(a, b, atol=TOL) for a, b in zip(from_embeds[1], from_pixels[1]))
    with pytest.raises(ValueError, match="without the LM part"):
        vision.add_request("x", inputs.prompt_ids, items)


def test_prompt_too_long_and_length_clamp(tiny_qwen_dir, test_images):
    inputs = case_inputs(tiny_qwen_dir, "text", test_images)
    n = len(inputs.prompt_ids)
    small = LLMEngine(EngineConfig(model=str(tiny_qwen_dir), num_kv_blocks=16, max_model_len=n + 5))
    with pytest.raises(ValueError, match=rf"{n + 70} tokens .* context holds {n + 5}"):
        small.add_request("long", inputs.prompt_ids + [1] * 70)
    [res], _ = generate(small, [Prompt(token_ids=tuple(inputs.prompt_ids))],
                        SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True))
    assert len(res.token_ids) == 5 and res.finish_reason == "length"
    with pytest.raises(ValueError, match="2 image placeholders but 1 images"):
        small.add_request("bad", case_inputs(tiny_qwen_dir, "two_images", test_images).prompt_ids,
                          test_images[:1])
    assert small.block_manager.num_free == 16 and not small.has_unfinished()


def test_stop_tokens_and_eos(engine, tiny_qwen_dir, test_images):
    inputs = case_inputs(tiny_qwen_dir, "text", test_images)
    [ref], _ = generate(engine, [Prompt(token_ids=tuple(inputs.prompt_ids))], GREEDY)
    stop_at = ref.token_ids[3]
    first = ref.token_ids.index(stop_at)
    stop = SamplingParams(max_tokens=N_NEW, temperature=0.0, stop_token_ids=(stop_at,))
    [res], _ = generate(engine, [Prompt(token_ids=tuple(inputs.prompt_ids))], stop)
    assert res.token_ids == ref.token_ids[:first + 1] and res.finish_reason == "stop"
    # The chat model's end-of-turn token comes from the checkpoint (generation_config / config).
    tok = load_tokenizer(tiny_qwen_dir)
    assert tok.convert_tokens_to_ids("<|im_end|>") in engine.eos_ids

"""Our Qwen2.5-VL / Qwen2-VL against transformers' own classes on tiny random checkpoints (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch

from tests.support.hf_reference import HFInputs, build_inputs, hf_image_embeds, hf_logits, load_hf_model
from workers.engine.attention import AttentionMetadata
from workers.models.loader import load_model
from workers.models.processing import ImageProcessor

BLOCK = 16
TOL = 1e-4
PROMPT = "What is in the picture? Answer in one short sentence."


class PagedSequence:
    """One sequence's paged KV cache, driven by AttentionMetadata directly (no engine)."""

    def __init__(self, model, capacity: int, first_block: int = 3) -> None:
        n_blocks = -(-capacity // BLOCK)
        self.kv = torch.zeros(first_block + n_blocks, model.num_layers, 2, BLOCK, model.num_kv_heads, model.head_dim)
        # Blocks in reverse order: the block table, not contiguity, must define the sequence.
        self.table = list(range(first_block + n_blocks - 1, first_block - 1, -1))
        self.model, self.done = model, 0

    @torch.no_grad()
    def step(self, ids: list[int], positions: torch.Tensor, image_rows: torch.Tensor | None) -> torch.Tensor:
        n = len(ids)
        meta = AttentionMetadata.build([n], [self.done + n], [self.table], BLOCK)
        hidden = self.model(torch.tensor(ids), positions, meta, self.kv, image_rows)
        self.done += n
        return self.model.compute_logits(hidden)


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen2_vl"])
def arch_dir(request, tiny_qwen_dir, tiny_qwen2vl_dir):
    return {"qwen2_5_vl": tiny_qwen_dir, "qwen2_vl": tiny_qwen2vl_dir}[request.param]


@pytest.fixture(scope="module")
def models(arch_dir):
    return load_hf_model(arch_dir), load_model(arch_dir)


def images_for(case: str, square, tall) -> list:
    return {"text": [], "one_image": [square], "two_images": [square, tall]}[case]


def our_image_rows(model, inputs: HFInputs) -> torch.Tensor | None:
    if not inputs.grid_thw:
        return None
    with torch.no_grad():
        return torch.cat(model.encode_images(inputs.pixel_values, torch.tensor(inputs.grid_thw)))


def full_prefill(model, inputs: HFInputs) -> torch.Tensor:
    positions, _ = model.mrope_positions(inputs.expanded_ids, inputs.grid_thw)
    seq = PagedSequence(model, len(inputs.expanded_ids))
    return seq.step(inputs.expanded_ids, positions, our_image_rows(model, inputs))


@pytest.mark.parametrize("case", ["text", "one_image", "two_images"])
def test_prefill_logits_match_hf(models, arch_dir, case, square_image, tall_image):
    hf, ours = models
    inputs = build_inputs(arch_dir, PROMPT, images_for(case, square_image, tall_image))
    assert ours.expand_prompt(inputs.prompt_ids, [ours.tokens_per_image(g) for g in inputs.grid_thw]) \
        == inputs.expanded_ids
    ref = hf_logits(hf, inputs)
    got = full_prefill(ours, inputs)
    assert got.shape == ref.shape and got.dtype == torch.float32
    assert (got - ref).abs().max().item() < TOL
    assert ref.std() > 0.1  # random logits are not degenerate, so the comparison means something


def test_image_embeddings_match_hf(models, arch_dir, test_images):
    hf, ours = models
    inputs = build_inputs(arch_dir, PROMPT, test_images)
    assert inputs.grid_thw[0] != inputs.grid_thw[1]
    ref = hf_image_embeds(hf, inputs)
    got = our_image_rows(ours, inputs)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() < TOL


def test_mrope_positions_match_hf_rope_index(models, arch_dir, test_images):
    hf, ours = models
    for images in ([], test_images[:1], test_images, test_images[::-1]):
        inputs = build_inputs(arch_dir, PROMPT, images)
        positions, delta = ours.mrope_positions(inputs.expanded_ids, inputs.grid_thw)
        if not images:
            assert delta == 0 and torch.equal(positions, torch.arange(len(inputs.expanded_ids)).expand(3, -1))
            continue
        k = inputs.kwargs
        ref_pos, ref_delta = hf.model.get_rope_index(k["input_ids"], k["mm_token_type_ids"], k["image_grid_thw"])
        assert torch.equal(positions, ref_pos[:, 0]) and delta == int(ref_delta) < 0


def test_two_chunk_prefill_through_paged_cache_equals_one_pass(models, arch_dir, test_images):
    hf, ours = models
    inputs = build_inputs(arch_dir, PROMPT, test_images)
    ids, n = inputs.expanded_ids, len(inputs.expanded_ids)
    positions, _ = ours.mrope_positions(ids, inputs.grid_thw)
    rows = our_image_rows(ours, inputs)
    split = ids.index(ours.image_token_id) + 30  # the cut falls inside the first image
    seq = PagedSequence(ours, n)
    first_rows = sum(1 for t in ids[:split] if t == ours.image_token_id)
    a = seq.step(ids[:split], positions[:, :split], rows[:first_rows])
    b = seq.step(ids[split:], positions[:, split:], rows[first_rows:])
    one = full_prefill(ours, inputs)
    assert (torch.cat([a, b]) - one).abs().max().item() < 1e-5


def test_decode_step_uses_rope_delta_and_matches_hf(models, arch_dir, square_image):
    hf, ours = models
    inputs = build_inputs(arch_dir, PROMPT, [square_image])
    ids, n = inputs.expanded_ids, len(inputs.expanded_ids)
    positions, delta = ours.mrope_positions(ids, inputs.grid_thw)
    seq = PagedSequence(ours, n + 2)
    first = int(seq.step(ids, positions, our_image_rows(ours, inputs))[-1].argmax())
    decode_logits = seq.step([first], torch.full((3, 1), n + delta), None)[0]
    longer = build_inputs(arch_dir, PROMPT, [square_image])
    longer.kwargs["input_ids"] = torch.tensor([ids + [first]])
    longer.kwargs["attention_mask"] = torch.ones(1, n + 1, dtype=torch.long)
    longer.kwargs["mm_token_type_ids"] = (longer.kwargs["input_ids"] == ours.image_token_id).to(torch.int32)
    ref = hf_logits(hf, longer)[-1]
    assert (decode_logits - ref).abs().max().item() < TOL


def test_batch_of_two_sequences_matches_separate_runs(models, arch_dir, square_image):
    _, ours = models
    text = build_inputs(arch_dir, "Hello there, how are you?", [])
    image = build_inputs(arch_dir, PROMPT, [square_image])
    p_text, _ = ours.mrope_positions(text.expanded_ids, [])
    p_img, _ = ours.mrope_positions(image.expanded_ids, image.grid_thw)
    lens = [len(text.expanded_ids), len(image.expanded_ids)]
    tables = [[0, 1], list(range(9, 1, -1))]
    kv = torch.zeros(10, ours.num_layers, 2, BLOCK, ours.num_kv_heads, ours.head_dim)
    meta = AttentionMetadata.build(lens, lens, tables, BLOCK)
    with torch.no_grad():
        hidden = ours(torch.tensor(text.expanded_ids + image.expanded_ids), torch.cat([p_text, p_img], 1),
                      meta, kv, our_image_rows(ours, image))
        batched = ours.compute_logits(hidden)
    separate = torch.cat([full_prefill(ours, text), full_prefill(ours, image)])
    assert (batched - separate).abs().max().item() < 1e-5


def test_image_processor_matches_hf_grid(arch_dir, test_images):
    proc = ImageProcessor(arch_dir)
    pixel_values, grid = proc.process(test_images)
    inputs = build_inputs(arch_dir, PROMPT, test_images)
    assert grid.dtype == torch.long and grid.tolist() == [list(g) for g in inputs.grid_thw]
    assert torch.equal(pixel_values, inputs.pixel_values)
    assert [proc.num_tokens(g) for g in grid.tolist()] == [64, 55]


def test_prompt_errors_are_clear(models):
    _, ours = models
    img = ours.image_token_id
    with pytest.raises(ValueError, match="2 image placeholders but 1 images"):
        ours.expand_prompt([1, img, 2, img], [4])
    with pytest.raises(ValueError, match="consecutive placeholder"):
        ours.mrope_positions([1, img, img, 2], [(1, 4, 4)])
    with pytest.raises(ValueError, match="placeholder tokens but the images need 4"):
        ours.mrope_positions([1] + [img] * 5, [(1, 4, 4)])

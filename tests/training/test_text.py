"""training.text: captions into the UNet's context through the family, cached when the text
encoder is frozen, laid out per cross-attention layer for ED-LoRA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sai_diffusion.models import edlora
from sai_diffusion.models.family import STABLE_DIFFUSION
from sai_diffusion.models.tokens import add_concept_tokens, tokenize
from sai_diffusion.training import recipe
from sai_diffusion.training.text import CaptionEncoder
from tests.helpers import load_pipe, make_concept, setup_run

CAPTIONS = ["a photo of <V1> <V2>", "a pencil sketch of <V1> <V2>, red", ""]


def _pipe(base):
    pipe = load_pipe(base)
    add_concept_tokens(pipe.tokenizer, pipe.text_encoder, ["<V1>", "<V2>"], init_word="dog")
    return pipe


def test_cached_captions_read_back_as_encoded(tiny_pipeline_dir):
    pipe = _pipe(tiny_pipeline_dir)
    encoders = STABLE_DIFFUSION.text_encoders(pipe)
    direct = CaptionEncoder(STABLE_DIFFUSION, encoders, device="cpu")
    cached = CaptionEncoder(STABLE_DIFFUSION, encoders, device="cpu")
    cached.cache(CAPTIONS)
    assert cached.cached == frozenset(CAPTIONS) and direct.cached == frozenset()
    order = [CAPTIONS[2], CAPTIONS[0], CAPTIONS[0]]
    with torch.no_grad():
        want = torch.cat([direct([c]) for c in order])
        torch.testing.assert_close(cached(order), want, rtol=0, atol=1e-6)
        assert direct(CAPTIONS).shape == (3, 77, pipe.text_encoder.config.hidden_size)


def test_edlora_captions_are_laid_out_per_layer_and_word_positions_read_layer_0(
    tiny_pipeline_dir,
):
    pipe = _pipe(tiny_pipeline_dir)
    layers = len(edlora.install_processors(pipe.unet, 77))
    edlora.add_layerwise_tokens(pipe.tokenizer, pipe.text_encoder, ["<V1>", "<V2>"], layers)
    words = edlora.LayerWords({w: edlora.layer_tokens(w, layers) for w in ("<V1>", "<V2>")},
                              layers)  # fmt: skip
    text = CaptionEncoder(STABLE_DIFFUSION, STABLE_DIFFUSION.text_encoders(pipe), device="cpu",
                          words=words)  # fmt: skip
    with torch.no_grad():
        context = text(CAPTIONS)  # the empty caption names no word: shared by every layer
        assert context.shape == (3, layers * 77, pipe.text_encoder.config.hidden_size)
        for layer in (0, layers - 1):
            copy = [words.bind(CAPTIONS[1], layer)]
            alone = STABLE_DIFFUSION.encode(STABLE_DIFFUSION.text_encoders(pipe), copy,
                                            device="cpu")  # fmt: skip
            torch.testing.assert_close(context[1:2, layer * 77 : (layer + 1) * 77], alone,
                                       rtol=0, atol=1e-6)  # fmt: skip
        empty = context[2].view(layers, 77, -1)
        assert torch.equal(empty, empty[:1].expand_as(empty))
    positions = text.word_positions(CAPTIONS, ["<V1>", "<V2>"])
    assert positions[0].tolist() == [4, 5]  # after <bos>, "a photo of"
    assert positions[2].tolist() == [-1, -1]  # no word
    ids = tokenize(pipe.tokenizer, [words.bind(CAPTIONS[1], 0)])[0]
    layer_0 = pipe.tokenizer.convert_tokens_to_ids(
        [words.tokens["<V1>"][0], words.tokens["<V2>"][0]]
    )
    assert [ids[j].item() for j in positions[1]] == layer_0  # the words as layer 0 reads them


@pytest.fixture()
def concept(tmp_path: Path) -> Path:
    return make_concept(tmp_path / "concept", n=4)


def test_caption_dropout_empties_captions_per_example_and_the_cache_holds_the_empty_one(
    concept, tiny_pipeline_dir, tmp_path
):
    never = setup_run(concept, tiny_pipeline_dir, tmp_path / "a")
    always = setup_run(concept, tiny_pipeline_dir, tmp_path / "b", "caption_dropout=1")
    half = setup_run(concept, tiny_pipeline_dir, tmp_path / "c", "caption_dropout=0.5")

    def captions(run, step=0):
        return [d.caption for d in run.batches.batch(step, 0).examples]

    assert all(captions(never))
    assert captions(always) == [""] * 4
    assert "" in always.text.cached and "" not in never.text.cached  # encoded once
    drawn = []
    for step in range(6):  # 24 examples at p 0.5: both kinds, and the same again per step
        drawn += captions(half, step)
        assert captions(half, step) == drawn[-4:]
    assert "" in drawn and any(drawn)
    # the other draws (noise, timesteps, latents) are those of the run without dropout
    a, b = never.inputs(never.batches.batch(0, 0)), always.inputs(always.batches.batch(0, 0))
    for key in ("noise", "timesteps", "latents"):
        assert torch.equal(getattr(a, key), getattr(b, key)), key
    # and the run trains
    recipe.train(always)

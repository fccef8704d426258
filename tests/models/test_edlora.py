"""ED-LoRA's layer-wise embeddings on a real tiny UNet and CLIP text encoder: which layer reads
which embedding, and that equal rows give the plain model exactly."""

from __future__ import annotations

import pytest
import torch

from sai_diffusion.errors import UserError
from sai_diffusion.models import edlora
from sai_diffusion.models.tokens import add_concept_tokens, tokenize
from tests.helpers import load_pipe

WORDS = ["<Vp1>", "<Vp2>"]
PROMPT = "a pencil sketch of <Vp1> <Vp2>"


def _edlora_pipe(tiny_pipeline_dir):
    pipe = load_pipe(tiny_pipeline_dir)
    add_concept_tokens(pipe.tokenizer, pipe.text_encoder, WORDS, init_word=["<rand-0.1>", "dog"],
                       generator=torch.Generator().manual_seed(0))  # fmt: skip
    names = edlora.install_processors(pipe.unet, pipe.tokenizer.model_max_length)
    edlora.add_layerwise_tokens(pipe.tokenizer, pipe.text_encoder, WORDS, len(names))
    words = edlora.LayerWords({w: edlora.layer_tokens(w, len(names)) for w in WORDS}, len(names))
    edlora.set_layer_words(pipe.unet, words)
    return pipe, names, words


def _attn2_inputs(pipe, context):
    """The key/value input each cross-attention layer receives, in order."""
    seen = {}
    hooks = []
    for i, (_, module) in enumerate(edlora.cross_attention_layers(pipe.unet)):
        hooks.append(module.to_k.register_forward_hook(
            lambda m, args, out, i=i: seen.__setitem__(i, args[0].detach().clone())))  # fmt: skip
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        out = pipe.unet(latents, 400, encoder_hidden_states=context).sample
    for h in hooks:
        h.remove()
    return [seen[i] for i in range(len(seen))], out


def test_layers_are_counted_from_the_model_in_mix_of_shows_order(tiny_pipeline_dir):
    pipe = load_pipe(tiny_pipeline_dir)
    names = [n for n, _ in edlora.cross_attention_layers(pipe.unet)]
    every_attn2 = [n for n, _ in pipe.unet.named_modules() if n.endswith("attn2")]
    assert sorted(names) == sorted(every_attn2) and len(names) > 2
    order = [n.split(".")[0] for n in names]
    assert order == sorted(order, key=["down_blocks", "mid_block", "up_blocks"].index)


def test_changing_layer_k_changes_the_input_of_attn2_k_and_no_other(tiny_pipeline_dir):
    pipe, names, words = _edlora_pipe(tiny_pipeline_dir)
    encode = lambda: edlora.encode_layerwise(  # noqa: E731
        pipe.tokenizer, pipe.text_encoder, [PROMPT], words, device="cpu"
    )
    with torch.no_grad():
        before, _ = _attn2_inputs(pipe, encode())
        k = len(names) // 2
        weight = pipe.text_encoder.get_input_embeddings().weight
        token_id = pipe.tokenizer.convert_tokens_to_ids(edlora.layer_token("<Vp2>", k))
        weight[token_id] += 0.5
        after, _ = _attn2_inputs(pipe, encode())
    changed = [i for i in range(len(names)) if not torch.equal(before[i], after[i])]
    assert changed == [k]


def test_equal_rows_give_exactly_the_plain_models_output(tiny_pipeline_dir):
    pipe, names, words = _edlora_pipe(tiny_pipeline_dir)
    plain_pipe = load_pipe(tiny_pipeline_dir)
    add_concept_tokens(plain_pipe.tokenizer, plain_pipe.text_encoder, WORDS,
                       init_word=["<rand-0.1>", "dog"], generator=torch.Generator().manual_seed(0))  # fmt: skip
    with torch.no_grad():
        layered = edlora.encode_layerwise(
            pipe.tokenizer, pipe.text_encoder, [PROMPT], words, device="cpu"
        )
        plain = plain_pipe.text_encoder(tokenize(plain_pipe.tokenizer, [PROMPT]))[0]
    assert layered.shape == (1, len(names) * 77, plain.shape[-1])
    _, out_layered = _attn2_inputs(pipe, layered)
    _, out_plain = _attn2_inputs(plain_pipe, plain)
    assert torch.equal(out_layered, out_plain)
    # and the plain context through the layer-wise processors: shared by every layer
    _, out_shared = _attn2_inputs(pipe, plain)
    assert torch.equal(out_shared, out_plain)


def test_mix_of_shows_four_dimensional_context_reads_the_same(tiny_pipeline_dir):
    pipe, names, words = _edlora_pipe(tiny_pipeline_dir)
    with torch.no_grad():
        flat = edlora.encode_layerwise(
            pipe.tokenizer, pipe.text_encoder, [PROMPT], words, device="cpu"
        )
    four = flat.reshape(1, len(names), 77, -1)
    assert torch.equal(_attn2_inputs(pipe, flat)[1], _attn2_inputs(pipe, four)[1])


def test_recorded_attention_matches_the_layer_output(tiny_pipeline_dir):
    pipe, names, words = _edlora_pipe(tiny_pipeline_dir)
    with torch.no_grad():
        context = edlora.encode_layerwise(
            pipe.tokenizer, pipe.text_encoder, [PROMPT], words, device="cpu"
        )
    _, want = _attn2_inputs(pipe, context)
    record: list = []
    for p in edlora.processors(pipe.unet):
        p.record = record
    _, got = _attn2_inputs(pipe, context)
    for p in edlora.processors(pipe.unet):
        p.record = None
    assert [i for i, _ in record] == list(range(len(names)))
    for _, probs in record:
        assert probs.shape[0] == 1 and probs.shape[-1] == 77
        torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs.sum(-1)))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_unet_without_cross_attention_is_refused():
    from diffusers import UNet2DModel

    unet = UNet2DModel(sample_size=8, block_out_channels=(8, 8), layers_per_block=1,
                       norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"))  # fmt: skip
    with pytest.raises(UserError, match="edlora=true needs a UNet with cross-attention"):
        edlora.install_processors(unet, 77)

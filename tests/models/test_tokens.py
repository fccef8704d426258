"""models.tokens: concept tokens added to a real tiny tokenizer and text encoder."""

from __future__ import annotations

import pytest
import torch

from sai_diffusion.errors import UserError
from sai_diffusion.models.tokens import add_concept_tokens
from tests.helpers import PROMPT, TOKEN, load_pipe


def test_concept_token_starts_from_the_init_word_mean_plus_seeded_noise(tiny_pipeline_dir):
    pipe = load_pipe(tiny_pipeline_dir)
    tok, te = pipe.tokenizer, pipe.text_encoder
    init_ids = tok("pencil sketch", add_special_tokens=False).input_ids
    assert len(init_ids) > 1  # a multi-token init word exercises the mean
    mean = te.get_input_embeddings().weight[init_ids].mean(0)

    ids = add_concept_tokens(tok, te, ["<a>", "<b>"], init_word="pencil sketch")
    rows = te.get_input_embeddings().weight
    assert ids == tok.convert_tokens_to_ids(["<a>", "<b>"]) and rows.shape[0] == len(tok)
    torch.testing.assert_close(rows[ids[0]], mean)
    torch.testing.assert_close(rows[ids[1]], mean)
    assert tok(PROMPT.replace(TOKEN, "<a>"), add_special_tokens=False).input_ids[-1] == ids[0]

    noisy = []
    for _ in range(2):
        p = load_pipe(tiny_pipeline_dir)
        (i,) = add_concept_tokens(p.tokenizer, p.text_encoder, ["<c>"], init_word="pencil sketch",
                                  init_noise_std=0.1, generator=torch.Generator().manual_seed(7))  # fmt: skip
        noisy.append(p.text_encoder.get_input_embeddings().weight[i].detach())
    torch.testing.assert_close(noisy[0], noisy[1])  # same seed, same start
    assert 0.01 < (noisy[0] - mean).std().item() < 1.0


def test_concept_token_errors_name_the_problem(tiny_pipeline_dir):
    pipe = load_pipe(tiny_pipeline_dir)
    tok, te = pipe.tokenizer, pipe.text_encoder
    with pytest.raises(UserError, match=r"'man</w>' is already in the tokenizer's vocabulary"):
        add_concept_tokens(tok, te, ["man</w>"], init_word="man")
    with pytest.raises(UserError, match="tokenises to nothing"):
        add_concept_tokens(tok, te, [TOKEN], init_word="  ")
    with pytest.raises(UserError, match="repeat"):
        add_concept_tokens(tok, te, [TOKEN, TOKEN], init_word="man")
    assert TOKEN not in tok.get_vocab()  # nothing was added by the failed calls

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


def test_several_words_start_from_their_own_initialisers(tiny_pipeline_dir):
    """Mix-of-Show's "<Vpotter1>+<Vpotter2>" from "<rand-0.013>+man": the first row is an
    N(0, 0.013^2) draw of the run's generator (compared exactly with the same draw), the second
    exactly the embedding of "man" (no noise, init_noise_std 0); both rows are new."""
    pipe = load_pipe(tiny_pipeline_dir)
    table = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    (man,) = pipe.tokenizer("man", add_special_tokens=False).input_ids
    ids = add_concept_tokens(
        pipe.tokenizer, pipe.text_encoder, ["<Vp1>", "<Vp2>"],
        init_word=["<rand-0.013>", "man"], generator=torch.Generator().manual_seed(7),
    )  # fmt: skip
    weight = pipe.text_encoder.get_input_embeddings().weight
    expected = 0.013 * torch.randn(table.shape[1], generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(weight[ids[0]], expected, rtol=0, atol=0)
    torch.testing.assert_close(weight[ids[1]], table[man], rtol=0, atol=0)
    assert ids[0] >= table.shape[0] and ids[1] == ids[0] + 1


def test_an_initialiser_the_tokenizer_splits_is_refused_for_several_words(tiny_pipeline_dir):
    pipe = load_pipe(tiny_pipeline_dir)
    word = next(
        w for w in ("hippopotamus", "xylophone", "quixotic", "zzyzx")
        if len(pipe.tokenizer(w, add_special_tokens=False).input_ids) > 1
    )  # fmt: skip
    with pytest.raises(UserError, match=f"initialiser '{word}' is [0-9]+ tokens"):
        add_concept_tokens(pipe.tokenizer, pipe.text_encoder, ["<a1>", "<a2>"],
                           init_word=["<rand-0.01>", word])  # fmt: skip
    # one word of several tokens still starts a single-word concept (the mean, as before)
    add_concept_tokens(pipe.tokenizer, pipe.text_encoder, ["<b1>"], init_word=word)

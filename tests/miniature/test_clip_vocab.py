"""miniature.clip_vocab: CLIP's BPE vocabulary rebuilt offline, full (SD 1.5's shipped tokenizer)
and cut to a few merges (tiny models)."""

from __future__ import annotations

import pytest
from transformers import CLIPTokenizer

from sai_diffusion._resources import sd15_config_dir
from sai_diffusion.errors import UserError
from sai_diffusion.miniature import clip_vocab

# SD 1.5 / OpenAI CLIP ids, as published with the model (tokenizer of openai/clip-vit-large-patch14).
SD15_A_PHOTO_OF_A_CAT = [49406, 320, 1125, 539, 320, 2368, 49407]


def test_shipped_sd15_tokenizer_has_sd15_ids():
    tok = CLIPTokenizer.from_pretrained(sd15_config_dir() / "tokenizer")
    assert len(tok) == 49408
    assert tok.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"]) == [49406, 49407]
    assert tok.pad_token_id == 49407 and tok.model_max_length == 77
    assert tok("a photo of a cat").input_ids == SD15_A_PHOTO_OF_A_CAT
    padded = tok("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[7:] == [49407] * 70


def test_shipped_tokenizer_is_what_clip_anytorch_builds(tmp_path):
    """Guards configs/sd15/tokenizer against drifting from the BPE file it is built from."""
    if clip_vocab.clip_bpe_file() is None:
        pytest.skip("clip-anytorch not installed (pip install --no-deps clip-anytorch)")
    built = clip_vocab.write_tokenizer_files(tmp_path)
    shipped = sd15_config_dir() / "tokenizer"
    for name in ("vocab.json", "merges.txt"):
        assert (built / name).read_bytes() == (shipped / name).read_bytes(), name


def test_small_vocab_is_a_consistent_prefix_of_the_full_one():
    full = clip_vocab.build_vocab(clip_vocab.load_merges())
    merges = clip_vocab.load_merges(1000)
    small = clip_vocab.build_vocab(merges)
    assert len(full) == clip_vocab.FULL_VOCAB_SIZE == 49408
    assert len(small) == 514 + 1000
    assert small["<|startoftext|>"] == 1512 and small["<|endoftext|>"] == 1513
    for token, i in small.items():
        if i < 1512:
            assert full[token] == i, token
    # every merge joins two symbols the vocabulary already has, so BPE never leaves it
    for merge in merges:
        left, right = merge.split(" ")
        assert left in small and right in small and left + right in small


def test_small_tokenizer_tokenises_english_with_sd15_ids(tmp_path):
    tok = CLIPTokenizer.from_pretrained(clip_vocab.write_tokenizer_files(tmp_path, num_merges=4000))
    assert len(tok) == 4514
    ids = tok("a photo of a cat").input_ids
    assert ids == [4512, *SD15_A_PHOTO_OF_A_CAT[1:-1], 4513]


def test_no_merges_gives_a_header_only_merges_file(tmp_path):
    out = clip_vocab.write_tokenizer_files(tmp_path, num_merges=0)
    assert (out / "merges.txt").read_text() == "#version: 0.2\n"
    tok = CLIPTokenizer.from_pretrained(out)
    assert len(tok) == 514
    assert tok.convert_ids_to_tokens(tok("cat").input_ids) == [
        "<|startoftext|>", "c", "a", "t</w>", "<|endoftext|>"
    ]  # fmt: skip


def test_missing_clip_anytorch_names_the_install_command(monkeypatch):
    monkeypatch.setattr(clip_vocab, "clip_bpe_file", lambda: None)
    monkeypatch.setattr(clip_vocab, "_shipped_merges_file", lambda: None)
    with pytest.raises(UserError, match=r"pip install --no-deps clip-anytorch"):
        clip_vocab.load_merges(10)


def test_without_clip_anytorch_the_shipped_merges_are_used(monkeypatch):
    if clip_vocab.clip_bpe_file() is None:
        pytest.skip("clip-anytorch not installed: nothing to compare the fallback with")
    expected = clip_vocab.load_merges(2000)
    monkeypatch.setattr(clip_vocab, "clip_bpe_file", lambda: None)
    assert clip_vocab.load_merges(2000) == expected


def test_num_merges_out_of_range_is_a_user_error():
    with pytest.raises(UserError, match="num_merges"):
        clip_vocab.load_merges(clip_vocab.FULL_NUM_MERGES + 1)

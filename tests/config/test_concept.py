"""config.concept: the concept YAML, its words in Mix-of-Show's notation, checked before any
model loads."""

from __future__ import annotations

import pytest

from sai_diffusion import config
from sai_diffusion.config import load_concept
from sai_diffusion.errors import UserError
from tests.helpers import concept_file


def test_a_concept_of_several_words_in_mix_of_show_notation(tmp_path):
    c = load_concept(str(concept_file(tmp_path, "<Vpotter1>+<Vpotter2>", "<rand-0.013>+man")))
    assert c.words == ["<Vpotter1>", "<Vpotter2>"]
    assert c.initialisers == ["<rand-0.013>", "man"]
    assert c.prompts() == ["a pencil sketch of <Vpotter1> <Vpotter2>"]
    assert c.class_text == "man"
    single = load_concept(str(concept_file(tmp_path, "<Vdog>", "dog")))
    assert (single.words, single.text, single.class_text) == (["<Vdog>"], "<Vdog>", "dog")
    assert config.random_init_std("<rand-0.013>") == 0.013
    assert config.random_init_std("man") is None


@pytest.mark.parametrize(
    "token,class_word,message",
    [
        ("<V1>+<V2>", "man", "has 2 word\\(s\\) but class_word 'man' has 1 initialiser"),
        ("<V1>+<V1>", "man+man", "repeats a word"),
        ("<V1>+", "man+man", "empty word"),
        ("<V1>+<V2>", "<rand-x>+man", "is not <rand-S>"),
        ("<V1>+<V2>", "<rand-2>+man", "0 < S <= 1"),
        ("<V1>+<V2>", "teddy bear+man", "must be one word"),
    ],
)
def test_bad_words_or_initialisers_are_refused_naming_the_fix(tmp_path, token, class_word,
                                                              message):  # fmt: skip
    with pytest.raises(UserError, match=message):
        load_concept(str(concept_file(tmp_path, token, class_word)))

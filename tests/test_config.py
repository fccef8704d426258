"""config: the concept YAMLs and the training settings, checked before any model loads."""

from __future__ import annotations

import pytest

from sai_diffusion import config
from sai_diffusion.config import TrainConfig, load_concept
from sai_diffusion.errors import UserError


def test_every_shipped_concept_config_loads():
    """configs/concepts/*.yaml parse, type-check and name an existing optimizer lr table."""
    names = config.available_concepts()
    assert {"potter", "hermione"} <= set(names)
    for name in names:
        c = load_concept(name)
        assert "{token}" in " ".join(c.validation_prompts)
        assert any("pencil sketch" in p for p in c.validation_prompts)
        config.apply_overrides(TrainConfig(), c.train, name)
    assert load_concept("potter").lr["sgd-sai"] == 0.1


def test_settings_come_in_precedence_order_and_typos_get_the_closest_name(tmp_path):
    """Defaults < the concept's train: < flags < --set; an unknown or retired key is refused
    with the name it was probably meant to be."""
    demo = load_concept("demo").train
    cfg, _ = config.resolve("demo", {"lr": None}, [])
    assert (cfg.rank, cfg.max_steps) == (demo["rank"], demo["max_steps"]) != (4, 500)
    cfg, _ = config.resolve("demo", {"rank": 8}, [])
    assert cfg.rank == 8  # a flag beats the concept
    cfg, _ = config.resolve("demo", {"rank": 8}, ["rank=12", "lora_targets=to_q,to_v"])
    assert cfg.rank == 12 and cfg.lora_targets == ["to_q", "to_v"]  # --set beats a flag
    with pytest.raises(UserError, match="did you mean 'max_steps'"):
        config.resolve("demo", {}, ["max_step=3"])
    with pytest.raises(UserError, match="did you mean 'grad_accum'"):
        config.resolve("demo", {}, ["gradient_accumulation_steps=2"])
    with pytest.raises(UserError, match="unknown setting 'num_workers'"):
        config.resolve("demo", {}, ["num_workers=2"])  # dead settings are gone
    with pytest.raises(UserError, match="'rank' must be int, got 'four'"):
        config.resolve("demo", {}, ["rank=four"])


def test_words_yaml_1_1_reads_as_booleans_stay_words(tmp_path):
    """Guards ``--set mixed_precision=no`` being refused ("got 'False'"): YAML 1.1 reads
    no/off/yes/on as booleans. A string setting takes the word, in --set and in YAML files;
    a boolean setting still accepts the words; true/false stay booleans."""
    cfg, _ = config.resolve("demo", {}, ["mixed_precision=no", "text_encoder_lora=on"])
    assert cfg.mixed_precision == "no" and cfg.text_encoder_lora is True
    cfg, _ = config.resolve("demo", {}, ["vae_fp32=off", "cache_latents=false"])
    assert cfg.vae_fp32 is False and cfg.cache_latents is False
    data = tmp_path / "img"
    data.mkdir()
    path = tmp_path / "c.yaml"
    path.write_text(
        "token: <Vx>\nclass_word: dog\ndata: img\n"
        "train: {mixed_precision: no, negative_prompt: off, train_embeddings: yes}\n"
    )
    cfg, _ = config.resolve(str(path), {}, [])
    assert (cfg.mixed_precision, cfg.negative_prompt) == ("no", "off")
    assert cfg.train_embeddings is True
    assert config.load_yaml("a: no\nb: true\nc: 'yes'") == {"a": "no", "b": True, "c": "yes"}


def _concept_file(tmp_path, token: str, class_word: str):
    (tmp_path / "img").mkdir(exist_ok=True)
    path = tmp_path / "c.yaml"
    path.write_text(f'token: "{token}"\nclass_word: "{class_word}"\ndata: img\n'
                    'validation_prompts: ["a pencil sketch of {token}"]\n')  # fmt: skip
    return path


def test_a_concept_of_several_words_in_mix_of_show_notation(tmp_path):
    c = load_concept(str(_concept_file(tmp_path, "<Vpotter1>+<Vpotter2>", "<rand-0.013>+man")))
    assert c.words == ["<Vpotter1>", "<Vpotter2>"]
    assert c.initialisers == ["<rand-0.013>", "man"]
    assert c.prompts() == ["a pencil sketch of <Vpotter1> <Vpotter2>"]
    assert c.class_text == "man"
    single = load_concept(str(_concept_file(tmp_path, "<Vdog>", "dog")))
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
        load_concept(str(_concept_file(tmp_path, token, class_word)))

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
    assert load_concept("potter").lr["sgd-sai"]["unet"] == 0.1


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


@pytest.mark.parametrize("name", ["potter", "hermione", "potter-edlora", "hermione-edlora"])
def test_the_paper_presets_follow_mix_of_shows_setup(name):
    """docs/mix-of-show.md, point by point: two words, LoRA scale 1.0 (alpha 4 at rank 4),
    text-encoder LoRA, global batch 4, Mix-of-Show's training pieces; SGD-SaI at 0.1 on every
    group, scaled-AdamW at 1e-4 (UNet) / 1e-5 (text encoder)."""
    edlora = name.endswith("-edlora")
    for optimizer in ("sgd-sai", "scaled-adamw", "adamw"):
        cfg, c = config.resolve(name, {"optimizer": optimizer}, [])
        assert len(c.words) == 2 and c.initialisers[0] == "<rand-0.013>"
        assert c.initialisers[1] == ("man" if "potter" in name else "woman")
        assert (cfg.rank, cfg.alpha, cfg.text_encoder_lora) == (4, 4.0, True)
        assert cfg.batch_size * cfg.grad_accum == 4
        assert cfg.max_steps == (1750 if "potter" in name else 1875)
        assert (cfg.edlora, cfg.train_embeddings) == (edlora, edlora)
        assert cfg.embeddings_max_norm == (0.55 if edlora else 0.0)
        assert (cfg.attn_reg_weight, cfg.noise_offset, cfg.weight_decay) == (0.01, 0.01, 0.01)
        assert (cfg.augmentation, cfg.shuffle_captions, cfg.caption_templates) == (
            "resize-crop-pad", True, True)  # fmt: skip
        assert (cfg.loss_scale, cfg.lr_scheduler, cfg.mixed_precision) == (4.0, "linear", "fp16")
        lrs = cfg.group_lrs(c)
        if optimizer == "sgd-sai":
            assert set(lrs.values()) == {0.1}
        else:
            assert (lrs["unet"], lrs["text_encoder"]) == (1e-4, 1e-5)
            assert lrs["embeddings"] == (1e-3 if edlora else 1e-4)
    assert config.resolve(name, {"optimizer": "scaled-adamw"}, [])[0].scaled_reg == 0.0


def test_group_lrs_per_optimizer_and_their_precedence(tmp_path):
    path = _concept_file(tmp_path, "<Vx>", "dog")
    path.write_text(path.read_text() + "lr:\n  adamw: {unet: 2.0e-4, text_encoder: 3.0e-5}\n"
                    "  sgd-sai: 0.2\n")  # fmt: skip
    cfg, c = config.resolve(str(path), {"optimizer": "adamw"}, [])
    assert cfg.group_lrs(c) == {"unet": 2e-4, "text_encoder": 3e-5, "embeddings": 2e-4}
    cfg, c = config.resolve(str(path), {"optimizer": "adamw", "lr": 1e-3},
                            ["lr_text_encoder=5e-6"])  # fmt: skip
    assert cfg.group_lrs(c) == {"unet": 1e-3, "text_encoder": 5e-6, "embeddings": 1e-3}
    cfg, c = config.resolve(str(path), {"optimizer": "adamw", "lr": 1e-3}, [])
    lrs = cfg.group_lrs(c)  # --lr moves the mapping's groups with it, ratios kept
    assert lrs == pytest.approx({"unet": 1e-3, "text_encoder": 1.5e-4, "embeddings": 1e-3})
    cfg, c = config.resolve(str(path), {}, [])  # a number: text encoder at lr / 10
    assert cfg.group_lrs(c) == {"unet": 0.2, "text_encoder": 0.02, "embeddings": 0.2}
    for bad, says in (("{adamw: {text_encoder: 1.0e-5}}", "needs a unet entry"),
                      ("{adamw: {unet: 1.0e-4, vae: 1.0e-4}}", "unknown group"),
                      ("{adamw: {unet: -1}}", "lr.adamw.unet must be a number")):  # fmt: skip
        path.write_text(f'token: "<Vx>"\nclass_word: dog\ndata: img\nlr: {bad}\n')
        with pytest.raises(UserError, match=says):
            load_concept(str(path))


@pytest.mark.parametrize(
    ("settings", "says"),
    [
        (["attn_reg_weight=0.01", "use_masks=false"], "attn_reg_weight"),
        (["attn_reg_weight=0.01", "gradient_checkpointing=true"], "gradient_checkpointing"),
        (["augmentation=resize-crop-pad"], "cache_latents=false"),
        (["augmentation=pad"], "augmentation must be one of"),
        (["loss_scale=0"], "loss_scale"),
    ],
)
def test_mix_of_show_settings_that_cannot_work_are_refused(settings, says):
    with pytest.raises(UserError, match=says):
        config.resolve("demo", {}, settings)

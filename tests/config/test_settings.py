"""config.settings and config.resolve: the training settings in sections, their flat names,
their checks (ranges, rules between settings, settings that cannot act), checked before any
model loads."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sai_diffusion import config
from sai_diffusion.config import FLAT, SETTINGS, TrainConfig, load_concept, reference
from sai_diffusion.errors import UserError
from tests.helpers import concept_file

REPO = Path(__file__).resolve().parents[2]


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
    assert (cfg.lora.rank, cfg.max_steps) == (demo["rank"], demo["max_steps"]) != (4, 500)
    cfg, _ = config.resolve("demo", {"rank": 8}, [])
    assert cfg.lora.rank == 8  # a flag beats the concept
    cfg, _ = config.resolve("demo", {"rank": 8}, ["rank=12", "lora_targets=to_q,to_v"])
    assert cfg.lora.rank == 12 and cfg.lora.targets == ["to_q", "to_v"]  # --set beats a flag
    with pytest.raises(UserError, match="did you mean 'max_steps'"):
        config.resolve("demo", {}, ["max_step=3"])
    with pytest.raises(UserError, match="did you mean 'grad_accum'"):
        config.resolve("demo", {}, ["gradient_accumulation_steps=2"])
    with pytest.raises(UserError, match="unknown setting 'num_workers'"):
        config.resolve("demo", {}, ["num_workers=2"])  # dead settings are gone
    with pytest.raises(UserError, match="'lora.rank \\(rank\\)' must be int, got 'four'"):
        config.resolve("demo", {}, ["rank=four"])


def test_words_yaml_1_1_reads_as_booleans_stay_words(tmp_path):
    """Guards ``--set mixed_precision=no`` being refused ("got 'False'"): YAML 1.1 reads
    no/off/yes/on as booleans. A string setting takes the word, in --set and in YAML files;
    a boolean setting still accepts the words; true/false stay booleans."""
    cfg, _ = config.resolve("demo", {}, ["mixed_precision=no", "text_encoder_lora=on"])
    assert cfg.compute.mixed_precision == "no" and cfg.lora.text_encoder is True
    cfg, _ = config.resolve("demo", {}, ["mixed_precision=bf16", "vae_fp32=off",
                                         "cache_latents=false"])  # fmt: skip
    assert cfg.compute.vae_fp32 is False and cfg.compute.cache_latents is False
    data = tmp_path / "img"
    data.mkdir()
    path = tmp_path / "c.yaml"
    path.write_text(
        "token: <Vx>\nclass_word: dog\ndata: img\n"
        "train: {mixed_precision: no, negative_prompt: off, train_embeddings: yes}\n"
    )
    cfg, _ = config.resolve(str(path), {}, [])
    assert (cfg.compute.mixed_precision, cfg.sampling.negative_prompt) == ("no", "off")
    assert cfg.embeddings.train is True
    assert config.load_yaml("a: no\nb: true\nc: 'yes'") == {"a": "no", "b": True, "c": "yes"}


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
        assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.text_encoder) == (4, 4.0, True)
        assert cfg.batch_size * cfg.grad_accum == 4
        assert cfg.max_steps == (1750 if "potter" in name else 1875)
        assert (cfg.embeddings.edlora, cfg.embeddings.train) == (edlora, edlora)
        assert cfg.embeddings.max_norm == (0.55 if edlora else 0.0)
        assert (cfg.loss.attn_reg_weight, cfg.loss.noise_offset) == (0.01, 0.01)
        assert cfg.optimizer.weight_decay == 0.01
        assert (cfg.data.augmentation, cfg.captions.shuffle, cfg.captions.templates) == (
            "resize-crop-pad", True, True)  # fmt: skip
        assert (cfg.loss.scale, cfg.optimizer.schedule) == (4.0, "linear")
        assert cfg.compute.mixed_precision == "fp16"
        lrs = cfg.group_lrs(c)
        if optimizer == "sgd-sai":
            assert set(lrs.values()) == {0.1}
        else:
            assert (lrs["unet"], lrs["text_encoder"]) == (1e-4, 1e-5)
            assert lrs["embeddings"] == (1e-3 if edlora else 1e-4)
    assert config.resolve(name, {"optimizer": "scaled-adamw"}, [])[0].optimizer.scaled_reg == 0.0


def test_group_lrs_per_optimizer_and_their_precedence(tmp_path):
    path = concept_file(tmp_path, "<Vx>", "dog")
    path.write_text(path.read_text() + "lr:\n  adamw: {unet: 2.0e-4, text_encoder: 3.0e-5}\n"
                    "  sgd-sai: 0.2\n")  # fmt: skip
    cfg, c = config.resolve(str(path), {"optimizer": "adamw"}, [])
    assert cfg.group_lrs(c) == {"unet": 2e-4, "text_encoder": 3e-5, "embeddings": 2e-4}
    cfg, c = config.resolve(str(path), {"optimizer": "adamw", "lr": 1e-3},
                            ["lr_text_encoder=5e-6", "text_encoder_lora=true"])  # fmt: skip
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
        (["augmentation=pad"], "augmentation\\) must be one of"),
        (["loss_scale=0"], "loss_scale"),
    ],
)
def test_mix_of_show_settings_that_cannot_work_are_refused(settings, says):
    with pytest.raises(UserError, match=says):
        config.resolve("demo", {}, settings)


def test_a_setting_reads_the_same_flat_dotted_or_as_a_section_mapping(tmp_path):
    """``rank``, ``lora.rank`` and ``lora: {rank: ...}`` name one setting, in --set and in a
    concept's train: section; ``optimizer`` is the optimizer's name unless given a mapping."""
    flat, _ = config.resolve("demo", {}, ["rank=8", "use_dora=true", "optimizer=adamw"])
    dotted, _ = config.resolve("demo", {}, ["lora.rank=8", "lora.dora=true",
                                            "optimizer.name=adamw"])  # fmt: skip
    mapped, _ = config.resolve("demo", {}, ["lora={rank: 8, dora: true}",
                                            "optimizer={name: adamw}"])  # fmt: skip
    assert flat == dotted == mapped
    assert (flat.lora.rank, flat.lora.dora, flat.optimizer.name) == (8, True, "adamw")
    path = concept_file(tmp_path, "<Vx>", "dog")
    path.write_text(path.read_text() + "train: {lora: {rank: 6}, max_steps: 7, cache_latents: "
                    "false, data: {random_flip: 0}}\n")  # fmt: skip
    cfg, _ = config.resolve(str(path), {}, [])
    assert (cfg.lora.rank, cfg.max_steps, cfg.compute.cache_latents) == (6, 7, False)
    assert cfg.data.random_flip == 0.0
    with pytest.raises(UserError, match="did you mean 'lora.rank'"):
        config.resolve("demo", {}, ["lora.rnak=3"])
    with pytest.raises(UserError, match="'lora' is a section of settings .*lora.KEY=value"):
        config.resolve("demo", {}, ["lora=3"])


def test_every_flat_name_the_docs_and_shipped_configs_use_still_works():
    """Each ``--set key=`` in README and docs, and each key of a shipped concept's train:
    section, is a setting (flat, dotted or a section)."""
    docs = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
    docs.remove(REPO / "docs" / "bad-inputs.md")  # its rows are bad inputs on purpose
    keys = {m for path in docs for m in re.findall(r"--set ([a-z_.]+)=", path.read_text())}
    for name in config.available_concepts():
        keys |= set(load_concept(name).train)
    assert {"rank", "use_dora", "ema_decay", "buckets", "validation_split"} <= keys | set(FLAT)
    for key in sorted(keys):
        assert key in FLAT or key in SETTINGS or key in config.SECTIONS, key


@pytest.mark.parametrize(("setting", "value", "needs"), [
    ("momentum", 0.8, "optimizer.name"),
    ("scaled_reg", 0.0, "optimizer.name"),
    ("sai_eps", 1e-8, "optimizer.name"),
    ("lr_text_encoder", 1e-5, "lora.text_encoder"),
    ("text_encoder_rank", 8, "lora.text_encoder"),
    ("text_encoder_alpha", 2.0, "lora.text_encoder"),
    ("lr_embeddings", 1e-3, "embeddings.train"),
    ("embeddings_max_norm", 0.55, "embeddings.train"),
    ("keep_tokens", 2, "captions.shuffle"),
    ("bucket_step", 16, "data.buckets"),
    ("prior_loss_weight", 0.5, "prior.num_class_images"),
    ("class_prompt", "a photo of a dog", "prior.num_class_images"),
    ("validation_loss_every", 10, "validation.split"),
    ("vae_fp32", False, "compute.mixed_precision"),
    ("base_config", "configs/sd15", "base.model"),
])  # fmt: skip
def test_a_setting_that_cannot_act_is_refused_on_the_command_line_naming_both(
    tmp_path, setting, value, needs
):
    """Given on the command line (with adamw, or sgd-sai where adamw would let it act), the
    setting is refused with both names; from a concept YAML it is kept and listed by
    ``inert_settings`` for the run to warn about."""
    optimizer = "sgd-sai" if setting in ("scaled_reg",) else "adamw"
    path = concept_file(tmp_path, "<Vx>", "dog")
    with pytest.raises(UserError, match=rf"{re.escape(setting)}.*acts only with.*{needs}"):
        config.resolve(str(path), {"optimizer": optimizer}, [f"{setting}={value}"])
    path.write_text(path.read_text() + f"train: {{{setting}: {value!r}}}\n".replace("'", '"'))
    cfg, concept = config.resolve(str(path), {"optimizer": optimizer}, [])
    inert = config.inert_settings(cfg, concept)
    assert [i.path for i in inert] == [FLAT[setting]]
    assert "it is ignored" in inert[0].message("settings")


def test_a_setting_at_its_default_from_a_yaml_is_not_reported_and_one_that_acts_is_kept():
    cfg, concept = config.resolve("demo", {"optimizer": "adamw"}, [])
    assert config.inert_settings(cfg, concept) == []  # momentum 0.9 is the default
    cfg, _ = config.resolve("demo", {"optimizer": "sgd"}, ["momentum=0.8"])
    assert cfg.optimizer.momentum == 0.8


def test_init_noise_std_cannot_act_when_every_word_starts_random(tmp_path):
    path = concept_file(tmp_path, "<V1>+<V2>", "<rand-0.01>+<rand-0.02>")
    with pytest.raises(UserError, match="init_noise_std.*acts only with a concept word"):
        config.resolve(str(path), {}, ["init_noise_std=0.1"])
    path = concept_file(tmp_path, "<V1>+<V2>", "<rand-0.01>+man")
    assert config.resolve(str(path), {}, ["init_noise_std=0.1"])[0].embeddings.init_noise_std == 0.1


@pytest.mark.parametrize(("item", "says"), [
    ("alpha=.inf", "lora.alpha \\(alpha\\) must be a finite number > 0"),
    ("scaled_reg=.nan", "scaled_reg\\) must be a finite number >= 0"),
    ("seed=99999999999999999999999", "seed must be in \\[0, 2\\*\\*63\\)"),
    ("lora_targets=[]", "must name at least one module"),
    ("class_prompt=a {x}", "holds braces"),
])  # fmt: skip
def test_values_out_of_range_are_refused_with_the_setting_and_the_range(item, says):
    with pytest.raises(UserError, match=says):
        config.resolve("demo", {"optimizer": "scaled-adamw"}, [item, "num_class_images=1"])


def test_the_settings_reference_in_the_docs_is_generated_from_the_declarations():
    doc = REPO / "docs" / "training.md"
    assert reference.main(["--check", str(doc)]) == 0, (
        "run: python -m sai_diffusion.config.reference --write docs/training.md"
    )
    text = doc.read_text()
    for path, info in SETTINGS.items():  # each setting, its flat name and its help
        assert f"`{path}`" in text and info.doc.split(" (")[0].replace("|", "\\|") in text

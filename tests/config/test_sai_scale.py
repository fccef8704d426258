"""The ``sai_scale`` setting (``optimizer.sai_scale``): SGD-SaI's per-tensor lr scale rule,
``paper`` (default), ``released`` or ``sqrt-numel``; checked, refused where it cannot act, kept
in run.yaml and held fixed on resume. Which SGDSaI it builds: tests/optim/test_sai_scale.py."""

from __future__ import annotations

import pytest
import yaml

from sai_diffusion import config
from sai_diffusion.config import FLAT, SETTINGS
from sai_diffusion.errors import UserError
from sai_diffusion.files.run_dir import RunDir
from sai_diffusion.optim.names import SAI_SCALES
from sai_diffusion.training.resume import resumed_settings
from tests.helpers import concept_file, make_concept


def test_sai_scale_is_an_optimizer_setting_defaulting_to_the_paper():
    assert FLAT["sai_scale"] == "optimizer.sai_scale"
    assert SETTINGS["optimizer.sai_scale"].default == "paper"
    assert tuple(SAI_SCALES) == ("paper", "released", "sqrt-numel")
    cfg, _ = config.resolve("demo", {}, [])
    assert cfg.optimizer.sai_scale == "paper"


@pytest.mark.parametrize("item", ["sai_scale=released", "optimizer.sai_scale=released"])
def test_sai_scale_reads_flat_or_dotted(item):
    cfg, _ = config.resolve("demo", {}, [item])
    assert cfg.optimizer.sai_scale == "released"


def test_an_unknown_sai_scale_is_refused_naming_the_choices():
    with pytest.raises(UserError, match=r"sai_scale.*must be one of") as info:
        config.resolve("demo", {}, ["sai_scale=bogus"])
    assert all(choice in str(info.value) for choice in SAI_SCALES)


def test_sai_scale_acts_only_with_sgd_sai(tmp_path):
    """Given with another optimizer on the command line it is refused naming both settings;
    from a concept YAML it is kept and listed for the run to warn about."""
    path = concept_file(tmp_path, "<Vx>", "dog")
    with pytest.raises(UserError, match=r"sai_scale.*acts only with.*optimizer.name sgd-sai"):
        config.resolve(str(path), {"optimizer": "adamw"}, ["sai_scale=sqrt-numel"])
    path.write_text(path.read_text() + 'train: {sai_scale: "released"}\n')
    cfg, concept = config.resolve(str(path), {"optimizer": "adamw"}, [])
    inert = config.inert_settings(cfg, concept)
    assert [i.path for i in inert] == ["optimizer.sai_scale"]
    assert "it is ignored" in inert[0].message("settings")
    cfg, concept = config.resolve(str(path), {}, [])  # sgd-sai: it acts
    assert cfg.optimizer.sai_scale == "released" and config.inert_settings(cfg, concept) == []


def test_run_yaml_keeps_sai_scale_and_a_resume_must_match_it(tmp_path):
    """Saved in run.yaml; a resume with another value is refused (it changes what trains), one
    with the same value or without it continues; a run.yaml without the key (written before
    the setting) reads as paper, the rule those runs trained with."""
    concept = make_concept(tmp_path / "concept")
    cfg, c = config.resolve(str(concept), {"max_steps": 10}, ["sai_scale=sqrt-numel"])
    run = RunDir(tmp_path / "run")
    run.write_config(cfg, c, {"lr": cfg.resolved_lr(c)})
    assert run.read_config()[0].optimizer.sai_scale == "sqrt-numel"
    flags = {"max_steps": None}
    assert resumed_settings(run, None, flags, ["sai_scale=sqrt-numel"])[0] == cfg
    assert resumed_settings(run, None, flags, [])[0].optimizer.sai_scale == "sqrt-numel"
    with pytest.raises(UserError, match=r"sai_scale\): 'sqrt-numel' in run.yaml, 'paper' given"):
        resumed_settings(run, None, flags, ["sai_scale=paper"])

    data = yaml.safe_load(run.run_yaml.read_text())
    assert data["config"]["optimizer"].pop("sai_scale") == "sqrt-numel"
    run.run_yaml.write_text(yaml.safe_dump(data, sort_keys=False))
    assert run.read_config()[0].optimizer.sai_scale == "paper"

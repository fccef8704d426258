"""The flags of sai-sample, sai-compare, sai-export, sai-eval and sai-train-lora, and the run
files the drawing tools load (issue 30, "the other commands"): a bad value, a damaged file or
an output path that cannot be written ends in exit code 2 and one ``error:`` line that names
it, before any image is drawn, and leaves nothing written. Before, these were tracebacks,
silent fallbacks (nan guidance turned guidance off, a run without its words drew images
without the concept) or overwritten files (sai-export over the run's own LoRA).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from argparse import ArgumentTypeError
from pathlib import Path

import pytest
import safetensors
import safetensors.torch

from sai_diffusion import cli, cli_args
from tests.helpers import make_concept, train_tiny

BIG = "99999999999999999999999"
ERROR_LINE = re.compile(r"^(?:[\w-]+: )?error: ", re.MULTILINE)  # ours, or argparse's
RESTORE = "train the run again or restore the file"


# -------------------------------------------------------------------------- the rules alone
@pytest.mark.parametrize(
    ("check", "good", "bad"),
    [
        (cli_args.seed, {"0": 0, str(2**63 - 1): 2**63 - 1}, [BIG, "-1", str(2**63), "1.5", "x"]),
        (cli_args.steps, {"1": 1, "1000": 1000}, ["0", "-3", "1001", "2.0"]),
        (cli_args.guidance, {"0": 0.0, "7.5": 7.5, "50": 50.0}, ["nan", "inf", "-1", "50.5"]),
        (cli_args.lora_weight, {"-1": -1.0, "0.7": 0.7}, ["nan", "inf", "-inf", "1e400"]),
        (cli_args.resolution, {"8": 8, "40": 40, "4096": 4096}, ["7", "0", "-8", "12", "4104"]),
        (cli_args.prompt_template, {"a {token} and {token}": "a {token} and {token}"},
         ["a {tokn}", "a {", "a }", "{{token}}", "a {0}"]),
    ],
)  # fmt: skip
def test_each_rule_keeps_good_values_and_refuses_bad_ones(check, good, bad):
    assert {text: check(text) for text in good} == good
    for text in bad:
        with pytest.raises(ArgumentTypeError, match="must be|only placeholder"):
            check(text)


def test_a_long_bad_value_is_quoted_short():
    with pytest.raises(ArgumentTypeError) as caught:
        cli_args.seed("9" * 5000)
    assert len(str(caught.value)) < 120 and "5000 characters" in str(caught.value)


# ------------------------------------------------------------- each flag, in the process
def _paths(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "notes.txt").write_text("my notes\n")
    (tmp_path / "folder.png").mkdir()
    return {"FILE": str(tmp_path / "notes.txt"), "DIR": str(tmp_path / "folder.png")}


SAMPLE = ["--run", "RUN", "--prompt", "a {token}"]
COMPARE = ["RUN", "--prompt", "a {token}", "--out", "grid.png"]
FLAG_CASES = [  # (command, arguments, the flag and the rule the line must give)
    ("sample", [*SAMPLE, "--seed", BIG], "--seed: must be a whole number in [0, 2**63)"),
    ("sample", [*SAMPLE, "--seed", "-1"], "--seed: must be a whole number in [0, 2**63)"),
    ("sample", ["--run", "RUN", "--prompt", "a {tokn}"], "--prompt: 'a {tokn}' has '{tokn}'"),
    ("sample", ["--run", "RUN", "--prompt", "a {"], "--prompt: 'a {' has '{'"),
    ("sample", [*SAMPLE, "--steps", "0"], "--steps: must be a whole number in [1, 1000]"),
    ("sample", [*SAMPLE, "--steps", "-3"], "--steps: must be a whole number in [1, 1000]"),
    ("sample", [*SAMPLE, "--resolution", "7"], "--resolution: must be a multiple of 8"),
    ("sample", [*SAMPLE, "--guidance", "nan"], "--guidance: must be a number in [0, 50]"),
    ("sample", [*SAMPLE, "--guidance", "-1"], "--guidance: must be a number in [0, 50]"),
    ("sample", [*SAMPLE, "--lora-weight", "inf"], "--lora-weight: must be a finite number"),
    ("sample", [*SAMPLE, "--out", "FILE"], "--out: FILE is a file, not a folder"),
    ("compare", [*COMPARE, "--seeds", "1", BIG], "--seeds: must be a whole number in [0, 2**63)"),
    ("compare", [*COMPARE, "--steps", "0"], "--steps: must be a whole number"),
    ("compare", [*COMPARE, "--guidance", "nan"], "--guidance: must be a number"),
    ("compare", [*COMPARE, "--lora-weight", "1", "nan"], "--lora-weight: must be a finite"),
    ("compare", [*COMPARE, "--resolution", "12"], "--resolution: must be a multiple of 8"),
    ("compare", ["RUN", "--prompt", "a {tokn}", "--out", "g.png"], "--prompt: 'a {tokn}'"),
    ("compare", ["RUN", "--prompt", "a {token}", "--out", "DIR"], "--out: DIR is a folder"),
    ("compare", ["RUN", "--prompt", "a", "--out", "FILE/g.png"], "--out: FILE/g.png is under FILE"),
    ("export", ["RUN", "--format", "mix-of-show", "--out", "DIR"], "--out: DIR is a folder"),
    ("export", ["RUN", "--format", "mix-of-show", "--out", "FILE/x.pth"], "--out: FILE/x.pth is"),
    ("eval", ["RUN", "--seeds", BIG], "--seeds: must be a whole number in [0, 2**63)"),
    ("eval", ["RUN", "--steps", "0"], "--steps: must be a whole number in [1, 1000]"),
    ("eval", ["RUN", "--guidance", "nan"], "--guidance: must be a number in [0, 50]"),
    ("train", ["--concept", "demo", "--output-dir", "FILE"], "--output-dir: FILE is a file"),
    ("train", ["--concept", "demo", "--output-dir", "FILE/run"], "--output-dir: FILE/run is under"),
]  # fmt: skip


@pytest.mark.parametrize(("command", "argv", "said"), FLAG_CASES,
                         ids=[f"{c}-{i}" for i, (c, _, _) in enumerate(FLAG_CASES)])  # fmt: skip
def test_a_bad_flag_ends_in_exit_2_naming_the_flag_and_its_rule(
    command, argv, said, tmp_path, capsys
):
    """argparse refuses it while parsing: before the run folder is read or torch imported."""
    paths = _paths(tmp_path)
    for name, path in paths.items():
        argv = [a.replace(name, path) for a in argv]
        said = said.replace(name, path)
    with pytest.raises(SystemExit) as exited:
        getattr(cli, f"{command}_main")(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert len(ERROR_LINE.findall(err)) == 1 and f"argument {said}" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.png", "notes.txt"]


# ------------------------------------------------------------------- a finished run's files
@pytest.fixture(scope="module")
def finished_run(tiny_pipeline_dir, tmp_path_factory) -> Path:
    """A finished 2-step run of the tiny model (no validation samples); copy it to change it."""
    root = tmp_path_factory.mktemp("cli-args")
    concept = make_concept(root / "concept", n=2)
    return train_tiny(concept, tiny_pipeline_dir, root / "run", "sgd-sai",
                      "--set", "validation_seeds=[]")  # fmt: skip


@pytest.fixture()
def run(finished_run, tmp_path) -> Path:
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


def _rewrite_lora(run: Path, change) -> None:
    """``change(tensors)`` applied to the run's lora.safetensors, its header kept."""
    path = run / "lora.safetensors"
    with safetensors.safe_open(path, framework="pt") as f:
        header = f.metadata()
    tensors = safetensors.torch.load_file(path)
    change(tensors)
    safetensors.torch.save_file(tensors, path, header)


def _first(tensors: dict, end: str) -> str:
    return next(k for k in sorted(tensors) if k.startswith("unet.") and k.endswith(end))


def _sample(run: Path, capsys) -> str:
    code = cli._run(cli.sample_main, ["--run", str(run), "--prompt", "a {token}", "--steps", "1"])
    err = capsys.readouterr().err
    assert code == 2 and len(ERROR_LINE.findall(err)) == 1, err
    assert not (run / "samples" / "sai-sample").exists(), "images were drawn"
    return err


def test_a_run_without_its_words_file_is_refused_naming_it(run, capsys):
    """Before, the images were drawn without the concept, without a word."""
    (run / "embeddings.safetensors").unlink()
    err = _sample(run, capsys)
    assert f"{run / 'embeddings.safetensors'} not found" in err and RESTORE in err


def test_a_lora_factor_without_its_pair_is_refused_before_the_model_loads(run, capsys):
    """Before, peft left the missing factor empty and moving the model failed (traceback)."""
    _rewrite_lora(run, lambda t: t.pop(_first(t, ".down.weight")))
    err = _sample(run, capsys)
    assert "has its up factor but not its down one" in err and RESTORE in err


def test_a_lora_factor_of_another_width_names_the_module_and_both_shapes(run, capsys):
    """Before: "Error(s) in loading state_dict for UNet2DConditionModel:", and no module."""

    def narrower(tensors):
        key = _first(tensors, ".down.weight")
        tensors[key] = tensors[key][:, :-8].contiguous()

    _rewrite_lora(run, narrower)
    err = _sample(run, capsys)
    assert re.search(r"lora_A\.weight is \[4, \d+\] in the file, \[4, \d+\] in the model", err)
    assert RESTORE in err


def test_sai_export_asks_force_to_replace_a_file_and_never_replaces_the_runs(run, tmp_path,
                                                                            capsys):  # fmt: skip
    out = tmp_path / "thing.pth"
    out.write_text("an earlier export")
    export = ["--format", "mix-of-show", "--out", str(out)]
    assert cli._run(cli.export_main, [str(run), *export]) == 2
    assert "pass --force to replace it" in capsys.readouterr().err
    assert out.read_text() == "an earlier export"
    assert cli._run(cli.export_main, [str(run), *export, "--force"]) == 0
    assert out.stat().st_size > 1000

    lora = (run / "lora.safetensors").read_bytes()
    inside = ["--format", "mix-of-show", "--out", str(run / "lora.safetensors"), "--force"]
    assert cli._run(cli.export_main, [str(run), *inside]) == 2
    assert "never replaces a run's files" in capsys.readouterr().err
    assert (run / "lora.safetensors").read_bytes() == lora


def test_sai_export_of_a_run_without_its_words_file_is_refused(run, tmp_path, capsys):
    """Before, the export was written without the concept's embedding."""
    (run / "embeddings.safetensors").unlink()
    out = tmp_path / "thing.pth"
    assert cli._run(cli.export_main, [str(run), "--format", "mix-of-show", "--out", str(out)]) == 2
    assert "embeddings.safetensors not found" in capsys.readouterr().err
    assert not out.exists()


# ------------------------------------------------------------------------ as real processes
def _tool(entry: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    code = f"from sai_diffusion.cli import {entry}; {entry}()"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip


def _one_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(ERROR_LINE.findall(proc.stderr)) == 1
    return proc.stderr


@pytest.mark.slow  # two processes that import torch: ~15 s
def test_damaged_run_files_and_the_runs_own_files_as_real_processes(run, tmp_path):
    """sai-sample on a LoRA cut in half (before: diffusers' "Unable to load weights ..." with
    no fix), and sai-export over the run's own LoRA (before: replaced by a pickle)."""
    lora = run / "lora.safetensors"
    whole = lora.read_bytes()
    lora.write_bytes(whole[: len(whole) // 2])
    err = _one_line(_tool("sample_entry", "--run", "run", "--prompt", "a {token}", cwd=tmp_path))
    assert "run/lora.safetensors is not a readable LoRA file" in err and RESTORE in err
    assert not (run / "samples" / "sai-sample").exists()

    lora.write_bytes(whole)
    err = _one_line(_tool("export_entry", "run", "--format", "mix-of-show", "--out",
                          "run/lora.safetensors", cwd=tmp_path))  # fmt: skip
    assert "is inside the run folder run" in err and lora.read_bytes() == whole


def test_bad_flags_as_real_processes_answer_before_torch_loads(tmp_path):
    """A seed past 64 bits (before: torch's overflow traceback after the model loaded) and a
    grid name that is a folder (before: refused only after every image was drawn)."""
    (tmp_path / "grid.png").mkdir()
    err = _one_line(_tool("sample_entry", "--run", "run", "--prompt", "a", "--seed", BIG,
                          cwd=tmp_path))  # fmt: skip
    assert "argument --seed: must be a whole number in [0, 2**63)" in err
    err = _one_line(_tool("compare_entry", "run", "--prompt", "a", "--out", "grid.png",
                          cwd=tmp_path))  # fmt: skip
    assert "argument --out: grid.png is a folder" in err
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]

"""Careless and hostile settings (issue 30): every one is refused by the settings' checks,
before a model loads, with one short line that names the file or setting, the prompt or the
YAML line at fault, and the fix. The last tests run real ``sai-train-lora`` processes: exit 2,
one ``error:`` line, no run folder."""

from __future__ import annotations

import math
import re
import resource
import time
import typing
from pathlib import Path

import pytest
from PIL import Image

from sai_diffusion import config
from sai_diffusion.config import (
    SETTINGS,
    TrainConfig,
    load_concept,
    load_yaml,
    parse_set,
    yaml_problem,
)
from sai_diffusion.config.loading import MAX_YAML_BYTES, YamlRefused, short
from sai_diffusion.errors import UserError
from sai_diffusion.files.run_dir import RunDir
from tests.helpers import run_train

# a "billion laughs" (issue 30: 494 bytes of these cost 6.2 GB and a MemoryError traceback):
# 9 levels of 9 aliases each, 9^9 values once written out, in the setting lora.rank
BOMB = "train:\n  rank:\n    - &a [1,1,1,1,1,1,1,1,1]\n" + "".join(
    f"    - &{b} [{','.join(['*' + a] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi", strict=True)
)


def write_concept(folder: Path, extra: str = "") -> Path:
    """``thing.yaml`` (token, class word, data) over two 32 px images, and ``extra`` YAML
    lines."""
    (folder / "data").mkdir(parents=True, exist_ok=True)
    for i in range(2):
        Image.new("RGB", (32, 32), (90 * i, 120, 40)).save(folder / "data" / f"img{i}.png")
    path = folder / "thing.yaml"
    path.write_text('token: "<Vthing>"\nclass_word: dog\ndata: data\n' + extra, encoding="utf-8")
    return path


def refusal(concept: Path, sets: list[str] = (), flags: dict | None = None) -> str:
    """The message ``resolve`` refuses these settings with (it must)."""
    with pytest.raises(UserError) as caught:
        config.resolve(str(concept), flags or {}, list(sets))
    message = str(caught.value)
    assert "\n" not in message and len(message.replace(str(concept), "")) < 250, message
    return message


# ---------------------------------------------------------------------------------- prompts
@pytest.mark.parametrize(("extra", "says"), [
    ('validation_prompts: ["a photo of {tokn}"]',
     r"validation_prompts\[0\] 'a photo of {tokn}' has the placeholder {tokn}; write the "
     r"concept as {token}"),
    ('validation_prompts: ["a {token}", "a {token} in a {"]',
     r"validation_prompts\[1\] .* has a stray '{'"),
    ('validation_prompts: ["a photo of token}"]', r"validation_prompts\[0\] .* stray '}'"),
    ('validation_prompts: ["{0} and {}"]', "has the placeholder {0}"),
    ('caption_template: "a {name} photo of {token}"', "caption_template .* placeholder {name}"),
    ("caption_template: 7", "caption_template must be a string"),
    ('evaluation: {prompts: ["a {token} by {artist}"]}',
     r"evaluation.prompts\[0\] .* placeholder {artist}"),
])  # fmt: skip
def test_a_prompt_with_a_placeholder_other_than_token_is_refused_naming_it(tmp_path, extra,
                                                                          says):  # fmt: skip
    """Guards the run that trained, wrote its LoRA and then crashed drawing samples (KeyError:
    'tokn'), and again on every resume: the concept's prompts are checked when it loads."""
    concept = write_concept(tmp_path, extra + "\n")
    message = refusal(concept)
    assert message.startswith(f"{concept}: ")
    assert re.search(says, message), message


def test_token_and_the_caption_placeholder_are_what_a_prompt_may_hold(tmp_path):
    concept = write_concept(tmp_path, 'validation_prompts: ["{token} and {token}", "plain"]\n'
                            'caption_template: "a photo of {token}, <TOK>"\n')  # fmt: skip
    c = load_concept(str(concept))
    assert c.prompts() == ["<Vthing> and <Vthing>", "plain"]


def test_a_run_yaml_concept_with_a_bad_prompt_is_refused_by_validate(tmp_path):
    """A concept read back from a run.yaml is not loaded by ``load_concept``; ``validate``
    (which setup and resume call) checks its prompts too."""
    c = load_concept(str(write_concept(tmp_path)))
    c.validation_prompts = ["a {tokn}"]
    with pytest.raises(UserError, match=r"validation_prompts\[0\] 'a {tokn}' has the placeholder"):
        config.validate(TrainConfig(), concept=c)


@pytest.mark.parametrize("item", ["negative_prompt=blurry, {token}", "class_prompt=a {dog"])
def test_plain_prompts_take_no_braces(tmp_path, item):
    message = refusal(write_concept(tmp_path), [item, "num_class_images=1"])
    assert "holds braces; it is a plain prompt" in message


# ------------------------------------------------------------------------------------ seeds
@pytest.mark.parametrize(("sets", "flags", "says"), [
    (["validation_seeds=[99999999999999999999]"], {},
     r"validation_seeds\) must be integers in \[0, 2\*\*63\) .*validation_seeds\[0\] is "
     "99999999999999999999"),
    (["validation_seeds=[1, -1]"], {}, r"validation_seeds\[1\] is -1"),
    (["validation_seeds=[1, 9223372036854775808]"], {}, r"validation_seeds\[1\] is 9223372"),
    ([], {"seed": 99999999999999999999999},
     r"seed must be in \[0, 2\*\*63\) .*, got 99999999999999999999999"),
    (["seed=-1"], {}, r"seed must be in \[0, 2\*\*63\)"),
])  # fmt: skip
def test_seeds_outside_torch_generators_range_are_refused_with_the_range(tmp_path, sets, flags,
                                                                        says):  # fmt: skip
    """torch.Generator.manual_seed takes [0, 2**63); validation seeds used to be found bad
    only when the samples were drawn, after training."""
    message = refusal(write_concept(tmp_path), sets, flags)
    assert re.search(says, message), message


def test_the_largest_seed_torch_takes_is_accepted(tmp_path):
    cfg, _ = config.resolve(str(write_concept(tmp_path)), {"seed": 2**63 - 1},
                            ["validation_seeds=[0, 9223372036854775807]"])  # fmt: skip
    assert cfg.seed == cfg.validation.seeds[1] == 2**63 - 1


def test_evaluation_seeds_are_in_range(tmp_path):
    concept = write_concept(tmp_path, 'evaluation: {prompts: ["a {token}"], seeds: [1, -3]}\n')
    assert r"evaluation.seeds[1] is -3; seeds must be in [0, 2**63)" in refusal(concept)


# ------------------------------------------------------------------------- numbers and steps
_FLOATS = [p for p, i in SETTINGS.items() if float in (i.type, *typing.get_args(i.type))]
_INTS = [p for p, i in SETTINGS.items() if int in (i.type, *typing.get_args(i.type))]


def test_every_number_setting_has_a_rule_refusing_nan_inf_and_64_bit_overflow():
    """A new number setting without a rule would let nan, inf or 10^30 reach torch (``coerce``
    checks types only)."""
    assert len(_FLOATS) >= 20 and len(_INTS) >= 15
    for path in _FLOATS:
        rule = SETTINGS[path].rule
        assert rule is not None, path
        assert not any(rule.ok(v) for v in (math.nan, math.inf, -math.inf)), path
    for path in [*_INTS, "validation.seeds"]:
        rule = SETTINGS[path].rule
        assert rule is not None, path
        assert not any(rule.ok(v) for v in (2**63, -1, 10**400)), path


@pytest.mark.parametrize("path", _FLOATS)
@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_nan_and_inf_are_refused_for_every_number_setting(tmp_path, path, value):
    """Guards alpha=.inf and init_noise_std=.inf (once exit 3, "Lower the learning rate") and
    scaled_reg=.nan (once LinAlgError): refused by the setting's range."""
    message = refusal(write_concept(tmp_path), ["optimizer=scaled-adamw", f"{path}={value}"])
    assert path in message and "got " in message, message


@pytest.mark.parametrize(("item", "says"), [
    ("max_steps=99999999999999999999", r"max_steps must be in \[1, 10_000_000\]"),
    ("max_steps=1.0e+30", r"max_steps must be in \[1, 10_000_000\]"),
    ("log_every=0", r"log_every must be in \[1, 10_000_000\], got 0"),
    ("checkpoint_every=9000000000000000000", r"checkpoint_every\) must be in \[0, 10_000_000\]"),
    ("keep_checkpoints=99999999999", r"keep_checkpoints\) must be in \[1, 10_000_000\]"),
    ("warmup_steps=99999999999", r"warmup_steps\) must be in \[0, 10_000_000\]"),
    ("validation_loss_every=0", r"validation_loss_every\) must be in \[1, 10_000_000\]"),
    ("validation_every=-1", r"validation_every\) must be in \[0, 10_000_000\]"),
])  # fmt: skip
def test_step_counts_and_intervals_are_bounded(tmp_path, item, says):
    """``max_steps=99999999999999999999`` was accepted; ``log_every=0`` once crashed after the
    model loaded."""
    message = refusal(write_concept(tmp_path), [item, "validation_split=0.5"])
    assert re.search(says, message), message


def test_a_concept_lr_must_be_finite(tmp_path):
    assert "lr.sgd-sai must be a number in (0, 10], got nan" in refusal(
        write_concept(tmp_path, "lr: {sgd-sai: .nan}\n")
    )


# ------------------------------------------------------------------------------------- YAML
@pytest.mark.parametrize(("extra", "says"), [
    ("data: other\n", "key 'data' is given twice, at lines 3 and 4; keep one"),
    ("train:\n  max_steps: 3\n  lora: {rank: 4, rank: 8}\n",
     "key 'rank' is given twice, at line 6, columns 10 and 19; keep one"),
    ("train: {max_steps: 3}\ntrain: {max_steps: 9}\n",
     "key 'train' is given twice, at lines 4 and 5; keep one"),
])  # fmt: skip
def test_a_key_given_twice_is_refused_naming_it_and_its_lines(tmp_path, extra, says):
    """PyYAML keeps the last of two equal keys without a word."""
    concept = write_concept(tmp_path, extra)
    assert refusal(concept) == f"{concept}: {says}"


def test_a_key_given_twice_in_a_set_value_is_refused():
    with pytest.raises(UserError, match="--set lora: key 'rank' is given twice"):
        parse_set(["lora={rank: 4, rank: 8}"])


def test_an_alias_bomb_is_refused_before_any_value_is_built(tmp_path):
    """400 bytes, 9^9 values written out: refused in well under a second, naming the line."""
    start = time.perf_counter()
    with pytest.raises(YamlRefused) as caught:
        load_yaml(BOMB)
    assert yaml_problem(caught.value).startswith("aliases that expand to more than 10,000 values")
    concept = write_concept(tmp_path, BOMB)
    assert refusal(concept) == (
        f"{concept}: aliases that expand to more than 10,000 values at line 10, column 7; a "
        "settings file holds a few hundred values: write them out"
    )
    assert time.perf_counter() - start < 2


def test_aliases_within_the_bound_and_merge_keys_still_read():
    text = "lr: &lr 1.0e-4\nother: *lr\nbase: &b {rank: 4, alpha: 2}\nlora: {<<: *b, rank: 8}\n"
    assert load_yaml(text) == {"lr": 1e-4, "other": 1e-4, "base": {"rank": 4, "alpha": 2},
                               "lora": {"rank": 8, "alpha": 2}}  # fmt: skip


@pytest.mark.parametrize(("text", "says"), [
    ("&a [1, *a]", "an alias inside its own anchor"),
    ("x: " + "[" * 5000 + "]" * 5000, "nested more than 32 levels deep at line 1"),
    ("x: &a [[[[[[[[[[1]]]]]]]]]]\n" + "".join(f"{c}: &{c} [[[[[[[[[[*{p}]]]]]]]]]]\n"
                                               for p, c in zip("abc", "bcd", strict=True)),
     "aliases that nest more than 32 levels deep"),
    ("x: [" + "1," * 10_000 + "1]", "^more than 10,000 values at line 1, column 4; a settings"),
    ("seed: " + "9" * 5000, "a value that cannot be read"),  # past int's 4300 digits
    ("seed: 2001-02-30", r"a value that cannot be read \(day is out of range"),
    ("x: " + "1" * (MAX_YAML_BYTES + 1), "characters, more than the 262,144"),
])  # fmt: skip
def test_yaml_that_would_recurse_loop_or_raise_is_refused(text, says):
    with pytest.raises(YamlRefused) as caught:
        load_yaml(text)
    assert re.search(says, yaml_problem(caught.value))


def test_a_concept_file_past_the_size_limit_is_refused_before_it_is_read(tmp_path):
    concept = write_concept(tmp_path, "# padding\n" * (MAX_YAML_BYTES // 10 + 1))
    assert refusal(concept).endswith("larger than 256 KiB, and a settings file is a few KB; is "
                                     "it the right file?")  # fmt: skip


def test_run_yaml_is_read_with_the_same_bounds(tmp_path):
    (tmp_path / "run.yaml").write_text("config: {seed: 1}\nconfig: {seed: 2}\n", encoding="utf-8")
    with pytest.raises(UserError, match="run.yaml: key 'config' is given twice"):
        RunDir(tmp_path).read_config()


# --------------------------------------------------------------------------- short messages
class CountingRepr:
    """A value that counts how often an error message writes it out."""

    calls = 0

    def __repr__(self) -> str:
        CountingRepr.calls += 1
        return "x" * 30


def test_a_huge_value_is_quoted_by_a_short_prefix_without_being_written_out():
    """Guards the 6.2 GB MemoryError: the message quoted the whole value (repr of 10^9
    items) before cutting it to 60 characters."""
    value = [CountingRepr()] * 10
    for _ in range(3):
        value = [value] * 10  # 10^4 leaves, shared
    with pytest.raises(UserError) as caught:
        config.apply_overrides(TrainConfig(), {"lora.rank": value}, "--set")
    assert CountingRepr.calls < 50
    assert len(str(caught.value)) < 120 and str(caught.value).endswith("...")
    assert short("y" * 10_000) == "'" + "y" * 56 + "..."
    assert short(10**5000).startswith("<int")  # past int's 4300 digits: no repr at all


@pytest.mark.parametrize(("where", "item"), [
    ("set", "k" * 10_000 + "=1"),
    ("set", "rank=" + "r" * 10_000),
    ("set", "mixed_precision=" + "m" * 10_000),
    ("set", "base_model=" + "b" * 10_000),  # quoted by the inert base_config's message
    ("set", "negative_prompt={" + "n" * 10_000),
    ("set", "validation_seeds=[" + "9" * 4000 + "]"),
    ("set", "z" * 10_000),
    ("yaml", "k" * 10_000 + ": 1"),
    ("yaml", "lr: {sgd-sai: " + "l" * 10_000 + "}"),
    ("yaml", "lr: {" + "o" * 10_000 + ": 1}"),
    ("yaml", "validation_prompts: ['{" + "p" * 10_000 + "}']"),
    ("yaml", "evaluation: {prompts: ['{token}'], object: [" + "1," * 5000 + "]}"),
    ("yaml", "x: !!" + "t" * 10_000 + " 1"),
])  # fmt: skip
def test_every_message_quotes_at_most_a_short_prefix_of_the_value(tmp_path, where, item):
    concept = write_concept(tmp_path, item + "\n" if where == "yaml" else "")
    sets = [item, "base_config=x"] if "base_model" in item else [item] if where == "set" else []
    refusal(concept, sets)  # one line, at most 250 characters besides the file's name


# ------------------------------------------------------------------- real sai-train-lora runs
def _memory_limit() -> None:
    """The child's address space: 1 GiB (it needs ~25 MB to refuse; the bomb took 6.2 GB)."""
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))


@pytest.mark.parametrize(("extra", "says"), [
    ('validation_prompts: ["a photo of {tokn}"]\n', "has the placeholder {tokn}"),
    ("data: data\n", "key 'data' is given twice, at lines 3 and 4"),
    (BOMB, "aliases that expand to more than 10,000 values at line 10"),
])  # fmt: skip
def test_sai_train_lora_refuses_with_exit_2_one_line_and_nothing_written(tmp_path, extra, says):
    """Each as its own process, under a memory limit (a regression fails instead of taking
    the machine's memory), with one cheap step at 32 px should the input get through."""
    concept = write_concept(tmp_path, extra + "train: {max_steps: 1, resolution: 32}\n"
                            if "train" not in extra else extra)  # fmt: skip
    out = tmp_path / "out"
    proc = run_train("--concept", str(concept), "--output-dir", str(out), "--set",
                     "sample_steps=1", timeout=120, preexec=_memory_limit)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {concept}: "), proc.stderr[-2000:]
    assert says in lines[0]
    assert not out.exists()

"""A concept YAML: the words to learn, what they start from, the images, and optional prompts,
learning rates and settings.

    token: "<Vpotter1>+<Vpotter2>"    # the new words, joined by +
    class_word: "<rand-0.013>+man"    # one initialiser per word: a word, or <rand-S>
    data: images/                     # relative to the YAML file
    validation_prompts: ["a pencil sketch of {token}"]
    lr: {sgd-sai: 0.1, scaled-adamw: {unet: 1.0e-4, text_encoder: 1.0e-5}}
    train: {max_steps: 800, lora: {rank: 8}}   # any setting (config.settings), flat or sectioned
    evaluation: {prompts: [...], seeds: [...]} # sai-eval's

A prompt (``validation_prompts``, ``caption_template``, ``evaluation.prompts``) names the
concept as ``{token}``, its only placeholder (``check_prompt``).

Plain Python and YAML (no torch).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._resources import configs_dir
from ..errors import UserError
from ..optim.names import OPTIMIZERS
from .loading import clip, closest, read_yaml_file, short
from .settings import SEED_LIMIT, TrainConfig, apply_overrides

# a word's initialiser that is a random vector, N(0, S^2) per entry (Mix-of-Show's notation)
_RANDOM_INIT = re.compile(r"^<rand-([0-9]*\.?[0-9]+(?:[eE]-?[0-9]+)?)>$")


def random_init_std(initialiser: str) -> float | None:
    """S of ``<rand-S>``, or None for a plain word."""
    match = _RANDOM_INIT.match(initialiser)
    return float(match.group(1)) if match else None


TOKEN_FIELD = "{token}"  # where a prompt says the concept's words


def _prompt_problem(prompt: str) -> str | None:
    """What is wrong with a prompt's braces (None: nothing): a placeholder other than
    ``{token}``, or a brace that opens or closes none."""
    rest = prompt.replace(TOKEN_FIELD, "")
    field = re.search(r"\{[^{}]*\}", rest)
    if field:
        return f"has the placeholder {clip(field.group(), 40)}"
    stray = next((c for c in rest if c in "{}"), None)
    return f"has a stray {stray!r}" if stray else None


def check_prompt(prompt: str, where: str) -> None:
    """Refuse a prompt whose braces are not all ``{token}`` (``str.format`` would fail on it, or
    fill it in wrongly, when samples are drawn after training).

    Raises:
        UserError: ``where``, the prompt and the placeholder or brace at fault.
    """
    problem = _prompt_problem(prompt)
    if problem:
        raise UserError(
            f"{where} {short(prompt)} {problem}; write the concept as {TOKEN_FIELD}, the only "
            f"placeholder (e.g. 'a photo of {TOKEN_FIELD}')"
        )


@dataclass
class Concept:
    """A concept YAML: the token to learn, the class word it starts from, and its images.

    ``token`` may name several new words joined by ``+`` (Mix-of-Show's "<Vpotter1>+<Vpotter2>"),
    with one initialiser per word in ``class_word`` ("<rand-0.013>+man": a random vector, then
    the word "man"). Prompts and captions see the words joined by spaces (``text``).
    """

    name: str
    path: Path
    token: str
    class_word: str
    data: Path
    caption_template: str = "a photo of {token}"
    validation_prompts: list[str] = field(default_factory=lambda: ["a photo of {token}"])
    # per optimizer: the UNet LoRA's lr, or {unet, text_encoder, embeddings} lrs
    lr: dict[str, float | dict[str, float]] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    # sai-eval's prompts, seeds and sampler settings; ``object`` names the world object the
    # token stands for in a miniature-world concept (the miniature package checks it)
    evaluation: dict[str, Any] | None = None

    @property
    def words(self) -> list[str]:
        """The new words, in order: ``["<Vpotter1>", "<Vpotter2>"]``."""
        return self.token.split("+")

    @property
    def initialisers(self) -> list[str]:
        """One per word: a plain word, or ``<rand-S>``."""
        return self.class_word.split("+")

    @property
    def text(self) -> str:
        """What ``{token}`` in a prompt and ``<TOK>`` in a caption become."""
        return " ".join(self.words)

    @property
    def plain_initialisers(self) -> list[str]:
        """The initialisers that are words (not ``<rand-S>``)."""
        return [w for w in self.initialisers if random_init_std(w) is None]

    @property
    def class_text(self) -> str:
        """The concept said with its class words alone (for the base model): the plain-word
        initialisers joined by spaces ("man" for "<rand-0.013>+man")."""
        return " ".join(self.plain_initialisers) or self.class_word

    def prompts(self) -> list[str]:
        return [p.format(token=self.text) for p in self.validation_prompts]

    def check_prompts(self, where: str | None = None) -> None:
        """``check_prompt`` on every prompt of the concept; messages start with ``where``
        (default: the YAML's path).

        Raises:
            UserError: naming the prompt (``validation_prompts[1]``) and what is wrong in it.
        """
        where = where or str(self.path)
        check_prompt(self.caption_template, f"{where}: caption_template")
        for i, prompt in enumerate(self.validation_prompts):
            check_prompt(prompt, f"{where}: validation_prompts[{i}]")
        for i, prompt in enumerate((self.evaluation or {}).get("prompts", [])):
            check_prompt(prompt, f"{where}: evaluation.prompts[{i}]")

    def folder(self, value: str) -> Path:
        """A folder a setting names (validation_data, class_data): absolute as given; relative
        to this YAML's folder when it exists there, else to the working directory."""
        path = Path(value).expanduser()
        if path.is_absolute():
            return path
        beside = self.path.parent / path
        return beside if beside.exists() or not path.exists() else path.resolve()


# ------------------------------------------------------------------------------------ concepts
_CONCEPT_KEYS = {f.name for f in dataclasses.fields(Concept)} - {"name", "path"}


def concepts_dir() -> Path:
    return configs_dir() / "concepts"


def find_concept(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise UserError(
                f"concept file {clip(str(path), 200)} does not exist; pass a YAML file or one of: "
                f"{', '.join(available_concepts()) or '(none shipped)'}"
            )
        return path
    shipped = concepts_dir() / f"{name_or_path}.yaml"
    if not shipped.is_file():
        raise UserError(
            f"no concept named {short(name_or_path)}{closest(name_or_path, available_concepts())}; "
            f"shipped concepts: {', '.join(available_concepts())}, or pass a path to your own "
            "YAML (token, class_word, data)"
        )
    return shipped


def available_concepts() -> list[str]:
    return sorted(p.stem for p in concepts_dir().glob("*.yaml"))


def load_concept(name_or_path: str) -> Concept:
    """Read and check a concept YAML (``loading.read_yaml_file``'s bounds, then every key and
    prompt). ``data`` is relative to the YAML file.

    Raises:
        UserError: naming the file and the key, prompt or value at fault.
    """
    path = find_concept(name_or_path)
    raw = read_yaml_file(path)
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping with token, class_word and data")
    for key in raw:
        if key not in _CONCEPT_KEYS:
            raise UserError(
                f"{path}: unknown key {short(str(key))}{closest(str(key), _CONCEPT_KEYS)}"
            )
    for key in ("token", "class_word", "data"):
        if not raw.get(key) or not isinstance(raw[key], str):
            raise UserError(f"{path}: '{key}' is required and must be a string")
    _check_words(raw["token"], raw["class_word"], path)
    prompts = raw.get("validation_prompts", ["a photo of {token}"])
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise UserError(f"{path}: validation_prompts must be a list of strings")
    template = raw.get("caption_template", "a photo of {token}")
    if not isinstance(template, str):
        raise UserError(f"{path}: caption_template must be a string, e.g. 'a photo of {{token}}'")
    lr = _check_lr(raw.get("lr", {}) or {}, path)
    train = raw.get("train", {}) or {}
    if not isinstance(train, dict):
        raise UserError(f"{path}: 'train' must be a mapping of settings")
    apply_overrides(TrainConfig(), train, f"{path}: train")  # type-check early
    evaluation = _check_evaluation(raw.get("evaluation"), path)
    concept = Concept(
        name=path.stem,
        path=path.resolve(),
        token=raw["token"],
        class_word=raw["class_word"],
        data=(path.parent / raw["data"]).resolve(),
        caption_template=template,
        validation_prompts=prompts,
        lr=lr,
        train=train,
        evaluation=evaluation,
    )
    concept.check_prompts(str(path))
    return concept


_LR_GROUPS = ("unet", "text_encoder", "embeddings")


def _check_lr(raw: Any, path: Path) -> dict[str, float | dict[str, float]]:
    """``lr:``: per optimizer a number (the UNet LoRA's lr) or a mapping of group lrs
    (``unet`` required; ``text_encoder``, ``embeddings``)."""
    if not isinstance(raw, dict):
        raise UserError(f"{path}: lr must be a mapping of optimizer: lr")
    out: dict[str, float | dict[str, float]] = {}
    for opt, value in raw.items():
        if opt not in OPTIMIZERS:
            raise UserError(
                f"{path}: lr.{clip(str(opt))}: unknown optimizer{closest(str(opt), OPTIMIZERS)}"
            )
        groups = value if isinstance(value, dict) else {"unet": value}
        for group, lr in groups.items():
            where = f"lr.{opt}.{clip(str(group))}" if isinstance(value, dict) else f"lr.{opt}"
            if group not in _LR_GROUPS:
                raise UserError(
                    f"{path}: {where}: unknown group{closest(str(group), _LR_GROUPS)}; the groups "
                    f"are {', '.join(_LR_GROUPS)}"
                )
            if isinstance(lr, bool) or not isinstance(lr, int | float) or not 0 < lr <= 10:
                raise UserError(f"{path}: {where} must be a number in (0, 10], got {short(lr)}")
        if isinstance(value, dict) and "unet" not in value:
            raise UserError(f"{path}: lr.{opt} needs a unet entry (the run's lr)")
        out[opt] = (
            {g: float(v) for g, v in value.items()} if isinstance(value, dict) else float(value)
        )
    return out


def _check_words(token: str, class_word: str, path: Path) -> None:
    """The words of ``token`` and their initialisers in ``class_word`` (the tokenizer, which
    checks that a plain initialiser is one token, comes later)."""
    words, inits = token.split("+"), class_word.split("+")
    bad = [w for w in words if not w or any(c.isspace() for c in w)]
    if bad:
        raise UserError(
            f"{path}: token {short(token)} has an empty word or one with spaces; write the words "
            "joined by '+', e.g. token: \"<Vpotter1>+<Vpotter2>\""
        )
    if len(set(words)) != len(words):
        raise UserError(f"{path}: token {short(token)} repeats a word; give each word its own name")
    if len(inits) != len(words):
        raise UserError(
            f"{path}: token {short(token)} has {len(words)} word(s) but class_word "
            f"{short(class_word)} has {len(inits)} initialiser(s); give one per word joined by "
            "'+', e.g. "
            'class_word: "<rand-0.013>+man"'
        )
    for init in inits:
        std = random_init_std(init)
        if init.startswith("<rand") and (std is None or not 0 < std <= 1):
            raise UserError(
                f"{path}: class_word initialiser {short(init)} is not <rand-S> with 0 < S <= 1 "
                "(e.g. <rand-0.013>, a random vector of that standard deviation)"
            )
        if std is None and len(inits) > 1 and (not init or any(c.isspace() for c in init)):
            raise UserError(
                f"{path}: class_word initialiser {short(init)} must be one word (or <rand-S>)"
            )


EVALUATION_DEFAULTS = {"seeds": list(range(8)), "steps": 20, "guidance": 6.0}


def _check_evaluation(raw: Any, path: Path) -> dict[str, Any] | None:
    """The ``evaluation`` section, completed with defaults: ``prompts`` (each with ``{token}``),
    ``seeds``, ``steps`` and ``guidance`` of the DPM-Solver++ sampler, and ``object``, the
    world object a miniature-world concept's token stands for (a name here; the miniature
    package, which knows the world, checks it)."""
    if raw is None:
        return None
    where = f"{path}: evaluation"
    if not isinstance(raw, dict):
        raise UserError(f"{where} must be a mapping with prompts (and object, for the judge)")
    allowed = {"object", "prompts", *EVALUATION_DEFAULTS}
    for key in raw:
        if key not in allowed:
            raise UserError(f"{where}: unknown key {short(str(key))}{closest(str(key), allowed)}")
    if "object" in raw and not (isinstance(raw["object"], str) and raw["object"]):
        raise UserError(
            f"{where}.object must be the name of a world object, got {short(raw['object'])}"
        )
    prompts = raw.get("prompts")
    if (
        not isinstance(prompts, list)
        or not prompts
        or not all(isinstance(p, str) and "{token}" in p for p in prompts)
    ):
        raise UserError(f"{where}.prompts must be a non-empty list of prompts with {{token}}")
    out = {**EVALUATION_DEFAULTS, **raw}
    seeds = out["seeds"]
    if not isinstance(seeds, list) or not seeds or not all(type(v) is int for v in seeds):
        raise UserError(f"{where}.seeds must be a non-empty list of integers")
    bad = next((i for i, v in enumerate(seeds) if not 0 <= v < SEED_LIMIT), None)
    if bad is not None:
        raise UserError(f"{where}.seeds[{bad}] is {short(seeds[bad])}; seeds must be in "
                        "[0, 2**63) (torch.Generator's seeds)")  # fmt: skip
    if type(out["steps"]) is not int or not 1 <= out["steps"] <= 1000:
        raise UserError(f"{where}.steps must be an integer in [1, 1000]")
    if not isinstance(out["guidance"], int | float) or not 0 <= out["guidance"] <= 50:
        raise UserError(f"{where}.guidance must be a number in [0, 50]")
    out["guidance"] = float(out["guidance"])
    return out

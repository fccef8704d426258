"""Run configuration: the concept YAML, training settings, overrides, and their validation.

Precedence, lowest first: TrainConfig defaults, the concept's ``train:`` section, command-line
flags, ``--set key=value``. Unknown keys and wrong types are rejected with the closest valid key.

Plain Python and YAML (no torch): the command line's ``--help`` and every check of a setting run
before any model library loads. How a run folder stores these (``run.yaml``) is
``files.run_dir``'s business.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ._resources import configs_dir
from .errors import UserError, first_line
from .optim.names import OPTIMIZERS

# Learning rates per optimizer when neither the concept nor the user gives one. SGD-SaI's scales
# are <= 1 relative to its lr, hence a larger lr (the paper trains the potter LoRA at 0.1).
# One entry per name in optim.OPTIMIZERS.
DEFAULT_LR = {"sgd-sai": 0.1, "scaled-adamw": 1e-4, "scaled-sgd": 1e-2, "adamw": 1e-4, "sgd": 1e-2}

# LoRA targets: SD's attention projections (UNet, every attn1/attn2) and CLIP's (text encoder).
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")

# The base model when none is given: the built-in miniature model, the tiny SD-1.5-architecture
# model pretrained on the procedural world (models.base.resolve_source finds its folder).
BUILTIN_BASE_MODEL = "miniature"


# a word's initialiser that is a random vector, N(0, S^2) per entry (Mix-of-Show's notation)
_RANDOM_INIT = re.compile(r"^<rand-([0-9]*\.?[0-9]+(?:[eE]-?[0-9]+)?)>$")


def random_init_std(initialiser: str) -> float | None:
    """S of ``<rand-S>``, or None for a plain word."""
    match = _RANDOM_INIT.match(initialiser)
    return float(match.group(1)) if match else None


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
    def class_text(self) -> str:
        """The concept said with its class words alone (for the base model): the plain-word
        initialisers joined by spaces ("man" for "<rand-0.013>+man")."""
        plain = [w for w in self.initialisers if random_init_std(w) is None]
        return " ".join(plain) or self.class_word

    def prompts(self) -> list[str]:
        return [p.format(token=self.text) for p in self.validation_prompts]

    def folder(self, value: str) -> Path:
        """A folder a setting names (validation_data, class_data): absolute as given; relative
        to this YAML's folder when it exists there, else to the working directory."""
        path = Path(value).expanduser()
        if path.is_absolute():
            return path
        beside = self.path.parent / path
        return beside if beside.exists() or not path.exists() else path.resolve()


@dataclass
class TrainConfig:
    """Every setting of a training run; run.yaml stores the resolved instance."""

    base_model: str | None = BUILTIN_BASE_MODEL
    base_config: str | None = None
    allow_pickle: bool = False
    # optimizer
    optimizer: str = "sgd-sai"
    lr: float | None = None
    lr_text_encoder: float | None = None
    lr_embeddings: float | None = None
    weight_decay: float = 0.0
    momentum: float = 0.9
    scaled_reg: float = 1e-2
    # SGD-SaI's g-SNR eps. 0, not the paper's 1e-8: LoRA's A gets its first gradient when B
    # is still of order lr x |g|, and a fixed 1e-8 beside its tiny std would freeze A's scale
    # near 0 (docs/dev/optimizer-spec.md); a zero variance is handled apart anyway.
    sai_eps: float = 0.0
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    max_grad_norm: float = 0.0
    # length and batch
    max_steps: int = 500
    batch_size: int = 1
    grad_accum: int = 1
    seed: int = 0
    # model
    resolution: int = 512
    rank: int = 4
    alpha: float = 1.0
    lora_targets: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    text_encoder_lora: bool = False
    text_encoder_rank: int | None = None
    text_encoder_alpha: float | None = None
    # DoRA (Liu et al. 2024): each LoRA layer also learns the norm of its weight's rows
    use_dora: bool = False
    train_embeddings: bool = False
    init_noise_std: float = 0.0
    # Mix-of-Show's ED-LoRA: one embedding per word and cross-attention layer (models.edlora)
    edlora: bool = False
    # stop tuning the token vectors once the mean norm of their rows reaches this (0: never;
    # Mix-of-Show 0.55)
    embeddings_max_norm: float = 0.0
    # precision and speed
    mixed_precision: str = "no"
    vae_fp32: bool = True
    gradient_checkpointing: bool = False
    cache_latents: bool = True
    # loss and data
    noise_offset: float = 0.0
    min_snr_gamma: float = 0.0
    # multiplies the noise-prediction loss: Mix-of-Show's masked mean sums the 4 latent
    # channels over a 1-channel mask, 4x the mean (it matters for SGD, not for Adam)
    loss_scale: float = 1.0
    use_masks: bool = True
    # the concept words' cross-attention outside the subject mask, penalised (Mix-of-Show 0.01)
    attn_reg_weight: float = 0.0
    center_crop: bool = False
    # aspect-ratio buckets (kohya's): each image trains at the bucket of about resolution^2
    # pixels nearest its aspect ratio (sides multiples of bucket_step), a batch from one bucket
    buckets: bool = False
    bucket_step: int = 64
    random_flip: float = 0.5
    # "crop": shorter side to the resolution, then a crop; "resize-crop-pad": Mix-of-Show's
    # random rescale, crop (p 0.5) and paste into the square, the loss kept to the pasted area
    augmentation: str = "crop"
    # captions: comma-separated phrases shuffled, the first keep_tokens kept in place
    shuffle_captions: bool = False
    keep_tokens: int = 1
    # wrap each caption in a random template ("a photo of {}", ...), as Mix-of-Show does
    caption_templates: bool = False
    # probability that an example trains with the empty caption (the unconditional branch)
    caption_dropout: float = 0.0
    # an exponential moving average of the trained tensors, saved as its own files in ema/
    # (0: off; e.g. 0.999)
    ema_decay: float = 0.0
    # prior preservation (DreamBooth): class images (a folder, or num_class_images drawn by
    # the base model with class_prompt, default "a photo of <class word>"), trained beside
    # the concept's at prior_loss_weight
    class_data: str | None = None
    class_prompt: str | None = None
    num_class_images: int = 0
    prior_loss_weight: float = 1.0
    # checkpoints, logging, validation
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    log_every: int = 1
    validation_every: int = 0
    # held-out images for a validation loss (fixed timesteps and noise): a fraction of the
    # concept's images, or a folder of its own (relative: to the concept YAML, else the cwd)
    validation_split: float = 0.0
    validation_data: str | None = None
    validation_loss_every: int = 50
    validation_seeds: list[int] = field(default_factory=lambda: [1, 2])
    sample_steps: int = 25
    guidance_scale: float = 7.5
    negative_prompt: str = (
        "lowres, bad anatomy, bad hands, text, error, cropped, worst quality, low quality, blurry"
    )

    def resolved_lr(self, concept: Concept) -> float:
        """The lr of the UNet LoRA (the run's lr): --lr, else the concept's for this
        optimizer, else DEFAULT_LR."""
        if self.lr is not None:
            return self.lr
        given = concept.lr.get(self.optimizer, DEFAULT_LR[self.optimizer])
        return float(given["unet"] if isinstance(given, dict) else given)

    def group_lrs(self, concept: Concept) -> dict[str, float]:
        """The lr of each parameter group: ``unet`` (the run's lr), ``text_encoder`` and
        ``embeddings``. A setting (lr_text_encoder, lr_embeddings) wins, then the concept's
        per-optimizer mapping (``lr: {scaled-adamw: {unet: 1e-4, text_encoder: 1e-5}}``),
        then the defaults: the text encoder at lr / 10 (Mix-of-Show's 1e-5 against 1e-4),
        the embeddings at lr. With --lr and a mapping, every group of the mapping is scaled by
        lr / its unet entry: the ratios between the groups stay."""
        lr = self.resolved_lr(concept)
        given = concept.lr.get(self.optimizer)
        given = dict(given) if isinstance(given, dict) else {}
        if given and self.lr is not None:  # --lr moves the mapping's groups with it
            given = {k: v * self.lr / given["unet"] for k, v in given.items()}
        text_encoder = self.lr_text_encoder or given.get("text_encoder") or lr / 10
        embeddings = self.lr_embeddings or given.get("embeddings") or lr
        return {"unet": lr, "text_encoder": float(text_encoder), "embeddings": float(embeddings)}


class _YamlLoader(yaml.SafeLoader):
    """YAML with YAML 1.2's booleans: only true / false. PyYAML follows YAML 1.1, which also
    reads yes / no / on / off as booleans and so turned ``mixed_precision: no`` into False; here
    a word stays a word, and a boolean setting accepts the words itself (``_coerce``)."""


_BOOL_TAG = "tag:yaml.org,2002:bool"
_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _BOOL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver(
    _BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def load_yaml(text: str) -> Any:
    """Parse YAML text (settings files, run.yaml, ``--set`` values) with 1.2 booleans."""
    return yaml.load(text, Loader=_YamlLoader)  # a SafeLoader: no arbitrary objects


def yaml_problem(error: Exception) -> str:
    """A YAML parse error in one line: what is wrong and where (PyYAML's spans lines)."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or first_line(error)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


_TRUE_WORDS, _FALSE_WORDS = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


CHOICES = {
    "optimizer": OPTIMIZERS,
    "lr_scheduler": ("constant", "linear", "cosine"),
    "mixed_precision": ("no", "fp16", "bf16"),
    "augmentation": ("crop", "resize-crop-pad"),
}
_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


# names other trainers use for our settings, suggested when they are typed here
_ALIASES = {
    "learning_rate": "lr",
    "train_batch_size": "batch_size",
    "steps": "max_steps",
    "max_train_steps": "max_steps",
    "network_dim": "rank",
    "network_alpha": "alpha",
    "lora_rank": "rank",
    "lora_alpha": "alpha",
    "gradient_accumulation_steps": "grad_accum",
}


def closest(key: str, valid) -> str:
    """`` (did you mean 'x'?)`` for the valid name nearest ``key``, or "". Another trainer's
    name for a setting (``_ALIASES``) wins over spelling likeness."""
    valid = list(valid)
    if _ALIASES.get(key) in valid:
        return f" (did you mean '{_ALIASES[key]}'?)"
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if not match:  # a near-miss of another trainer's name
        alias = next(iter(difflib.get_close_matches(key, list(_ALIASES), n=1, cutoff=0.8)), None)
        match = [_ALIASES[alias]] if alias and _ALIASES[alias] in valid else []
    return f" (did you mean '{match[0]}'?)" if match else ""


def _coerce(key: str, value: Any, where: str) -> Any:
    """Check ``value`` against the type of TrainConfig field ``key``."""
    hint = typing.get_type_hints(TrainConfig)[key]
    args = typing.get_args(hint)
    optional = isinstance(hint, types.UnionType) and type(None) in args
    if value is None:
        if optional:
            return None
        raise UserError(f"{where}: '{key}' cannot be empty")
    base = next((a for a in args if a is not type(None)), hint) if optional else hint
    origin = typing.get_origin(base)
    try:
        if origin is list:
            (item,) = typing.get_args(base)
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list):
                raise TypeError
            return [item(v) for v in value]
        if base is bool:
            if isinstance(value, str) and value.lower() in _TRUE_WORDS + _FALSE_WORDS:
                return value.lower() in _TRUE_WORDS
            if not isinstance(value, bool):
                raise TypeError
            return value
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise UserError(
            f"{where}: '{key}' must be {getattr(base, '__name__', base)}, got {value!r}"
        ) from None


def apply_overrides(cfg: TrainConfig, values: dict[str, Any], where: str) -> TrainConfig:
    for key, value in values.items():
        if key not in _FIELDS:
            raise UserError(f"{where}: unknown setting '{key}'{closest(key, _FIELDS)}")
        setattr(cfg, key, _coerce(key, value, where))
    return cfg


def parse_set(items: list[str]) -> dict[str, Any]:
    """``["lr=0.1", "lora_targets=to_q,to_v"]`` -> ``{"lr": 0.1, ...}`` (values parsed as YAML)."""
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set {item!r}: expected key=value, e.g. --set noise_offset=0.01")
        try:
            out[key.strip()] = load_yaml(raw) if raw.strip() else None
        except yaml.YAMLError:
            out[key.strip()] = raw
    return out


def validate(cfg: TrainConfig, where: str = "settings") -> TrainConfig:
    """Reject absurd values, naming the setting and the accepted range."""
    for key, choices in CHOICES.items():
        if getattr(cfg, key) not in choices:
            value = getattr(cfg, key)
            raise UserError(
                f"{where}: {key} must be one of {', '.join(choices)}, got {value!r}"
                f"{closest(str(value), choices)}"
            )

    def need(ok: bool, key: str, rule: str) -> None:
        if not ok:
            raise UserError(f"{where}: {key} {rule}, got {getattr(cfg, key)!r}")

    for key in ("lr", "lr_text_encoder", "lr_embeddings"):
        value = getattr(cfg, key)
        need(value is None or (math.isfinite(value) and 0 < value <= 10), key, "must be in (0, 10]")
    need(cfg.max_steps >= 1, "max_steps", "must be >= 1")
    need(1 <= cfg.batch_size <= 1024, "batch_size", "must be in [1, 1024]")
    need(1 <= cfg.grad_accum <= 1024, "grad_accum", "must be in [1, 1024]")
    need(
        cfg.resolution % 8 == 0 and 8 <= cfg.resolution <= 4096,
        "resolution",
        "must be a multiple of 8 in [8, 4096]",
    )
    need(1 <= cfg.rank <= 1024, "rank", "must be in [1, 1024]")
    need(cfg.alpha > 0, "alpha", "must be > 0")
    need(
        cfg.text_encoder_rank is None or 1 <= cfg.text_encoder_rank <= 1024,
        "text_encoder_rank",
        "must be in [1, 1024]",
    )
    need(0 <= cfg.weight_decay <= 1, "weight_decay", "must be in [0, 1]")
    need(0 <= cfg.momentum < 1, "momentum", "must be in [0, 1)")
    need(0 <= cfg.sai_eps <= 1, "sai_eps", "must be in [0, 1]")
    need(cfg.warmup_steps >= 0, "warmup_steps", "must be >= 0")
    need(cfg.checkpoint_every >= 0, "checkpoint_every", "must be >= 0 (0: only at the end)")
    need(cfg.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1")
    need(0 <= cfg.random_flip <= 1, "random_flip", "must be in [0, 1]")
    need(0 <= cfg.noise_offset <= 1, "noise_offset", "must be in [0, 1]")
    need(cfg.min_snr_gamma >= 0, "min_snr_gamma", "must be >= 0 (0: off)")
    need(cfg.max_grad_norm >= 0, "max_grad_norm", "must be >= 0 (0: off)")
    need(cfg.validation_every >= 0, "validation_every", "must be >= 0 (0: only at the end)")
    need(0 <= cfg.validation_split < 1, "validation_split", "must be in [0, 1) (0: off)")
    need(cfg.validation_loss_every >= 1, "validation_loss_every", "must be >= 1")
    need(0 <= cfg.num_class_images <= 100_000, "num_class_images", "must be in [0, 100000]")
    need(0 < cfg.prior_loss_weight <= 100, "prior_loss_weight", "must be in (0, 100]")
    if cfg.validation_split > 0 and cfg.validation_data:
        raise UserError(
            f"{where}: validation_split and validation_data both name held-out images; keep "
            "one (validation_data=FOLDER, or validation_split=0.1 of the concept's images)"
        )
    need(1 <= cfg.sample_steps <= 1000, "sample_steps", "must be in [1, 1000]")
    need(cfg.lora_targets != [], "lora_targets", "must name at least one module")
    need(0 <= cfg.attn_reg_weight <= 100, "attn_reg_weight", "must be in [0, 100] (0: off)")
    need(0 <= cfg.embeddings_max_norm <= 100, "embeddings_max_norm", "must be in [0, 100] (0: off)")
    need(0 <= cfg.keep_tokens <= 75, "keep_tokens", "must be in [0, 75]")
    need(0 < cfg.loss_scale <= 1000, "loss_scale", "must be in (0, 1000]")
    need(0 <= cfg.caption_dropout <= 1, "caption_dropout", "must be in [0, 1]")
    need(0 <= cfg.ema_decay < 1, "ema_decay", "must be in [0, 1) (0: off)")
    need(8 <= cfg.bucket_step <= 512 and cfg.bucket_step % 8 == 0, "bucket_step",
         "must be a multiple of 8 in [8, 512] (64 for SD 1.5)")  # fmt: skip
    if cfg.buckets and cfg.resolution % cfg.bucket_step:
        raise UserError(
            f"{where}: buckets=true needs resolution ({cfg.resolution}) to be a multiple of "
            f"bucket_step ({cfg.bucket_step}); change one of them"
        )
    if cfg.buckets and cfg.augmentation != "crop":
        raise UserError(
            f"{where}: buckets=true resizes each image to its bucket and crops it; "
            f"augmentation={cfg.augmentation} pastes into a square instead. Keep one"
        )
    if cfg.augmentation != "crop" and cfg.cache_latents:
        raise UserError(
            f"{where}: augmentation={cfg.augmentation} draws a new rescale and placement every "
            "epoch, which cached latents cannot hold; set cache_latents=false"
        )
    if cfg.attn_reg_weight > 0 and not cfg.use_masks:
        raise UserError(
            f"{where}: attn_reg_weight {cfg.attn_reg_weight:g} penalises attention outside the "
            "subject masks, but use_masks is false; set use_masks=true or attn_reg_weight=0"
        )
    if cfg.attn_reg_weight > 0 and cfg.gradient_checkpointing:
        raise UserError(
            f"{where}: attn_reg_weight > 0 needs the attention maps of the forward pass, which "
            "gradient_checkpointing=true discards; set gradient_checkpointing=false or "
            "attn_reg_weight=0"
        )
    return cfg


# ------------------------------------------------------------------------------------ concepts
_CONCEPT_KEYS = {f.name for f in dataclasses.fields(Concept)} - {"name", "path"}


def concepts_dir() -> Path:
    return configs_dir() / "concepts"


def find_concept(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise UserError(
                f"concept file {path} does not exist; pass a YAML file or one of: "
                f"{', '.join(available_concepts()) or '(none shipped)'}"
            )
        return path
    shipped = concepts_dir() / f"{name_or_path}.yaml"
    if not shipped.is_file():
        raise UserError(
            f"no concept named '{name_or_path}'{closest(name_or_path, available_concepts())}; "
            f"shipped concepts: {', '.join(available_concepts())}, or pass a path to your own "
            "YAML (token, class_word, data)"
        )
    return shipped


def available_concepts() -> list[str]:
    return sorted(p.stem for p in concepts_dir().glob("*.yaml"))


def load_concept(name_or_path: str) -> Concept:
    """Read and check a concept YAML. ``data`` is relative to the YAML file."""
    path = find_concept(name_or_path)
    try:
        raw = load_yaml(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid YAML ({yaml_problem(exc)})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping with token, class_word and data")
    for key in raw:
        if key not in _CONCEPT_KEYS:
            raise UserError(f"{path}: unknown key '{key}'{closest(key, _CONCEPT_KEYS)}")
    for key in ("token", "class_word", "data"):
        if not raw.get(key) or not isinstance(raw[key], str):
            raise UserError(f"{path}: '{key}' is required and must be a string")
    _check_words(raw["token"], raw["class_word"], path)
    prompts = raw.get("validation_prompts", ["a photo of {token}"])
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise UserError(f"{path}: validation_prompts must be a list of strings")
    lr = _check_lr(raw.get("lr", {}) or {}, path)
    train = raw.get("train", {}) or {}
    if not isinstance(train, dict):
        raise UserError(f"{path}: 'train' must be a mapping of settings")
    apply_overrides(TrainConfig(), train, f"{path}: train")  # type-check early
    evaluation = _check_evaluation(raw.get("evaluation"), path)
    return Concept(
        name=path.stem,
        path=path.resolve(),
        token=raw["token"],
        class_word=raw["class_word"],
        data=(path.parent / raw["data"]).resolve(),
        caption_template=raw.get("caption_template", "a photo of {token}"),
        validation_prompts=prompts,
        lr=lr,
        train=train,
        evaluation=evaluation,
    )


_LR_GROUPS = ("unet", "text_encoder", "embeddings")


def _check_lr(raw: Any, path: Path) -> dict[str, float | dict[str, float]]:
    """``lr:``: per optimizer a number (the UNet LoRA's lr) or a mapping of group lrs
    (``unet`` required; ``text_encoder``, ``embeddings``)."""
    if not isinstance(raw, dict):
        raise UserError(f"{path}: lr must be a mapping of optimizer: lr")
    out: dict[str, float | dict[str, float]] = {}
    for opt, value in raw.items():
        if opt not in OPTIMIZERS:
            raise UserError(f"{path}: lr.{opt}: unknown optimizer{closest(opt, OPTIMIZERS)}")
        groups = value if isinstance(value, dict) else {"unet": value}
        for group, lr in groups.items():
            where = f"lr.{opt}.{group}" if isinstance(value, dict) else f"lr.{opt}"
            if group not in _LR_GROUPS:
                raise UserError(
                    f"{path}: {where}: unknown group{closest(group, _LR_GROUPS)}; the groups "
                    f"are {', '.join(_LR_GROUPS)}"
                )
            if isinstance(lr, bool) or not isinstance(lr, int | float) or not 0 < lr <= 10:
                raise UserError(f"{path}: {where} must be a number in (0, 10], got {lr!r}")
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
            f"{path}: token {token!r} has an empty word or one with spaces; write the words "
            "joined by '+', e.g. token: \"<Vpotter1>+<Vpotter2>\""
        )
    if len(set(words)) != len(words):
        raise UserError(f"{path}: token {token!r} repeats a word; give each word its own name")
    if len(inits) != len(words):
        raise UserError(
            f"{path}: token {token!r} has {len(words)} word(s) but class_word {class_word!r} "
            f"has {len(inits)} initialiser(s); give one per word joined by '+', e.g. "
            'class_word: "<rand-0.013>+man"'
        )
    for init in inits:
        std = random_init_std(init)
        if init.startswith("<rand") and (std is None or not 0 < std <= 1):
            raise UserError(
                f"{path}: class_word initialiser {init!r} is not <rand-S> with 0 < S <= 1 "
                "(e.g. <rand-0.013>, a random vector of that standard deviation)"
            )
        if std is None and len(inits) > 1 and (not init or any(c.isspace() for c in init)):
            raise UserError(
                f"{path}: class_word initialiser {init!r} must be one word (or <rand-S>)"
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
            raise UserError(f"{where}: unknown key '{key}'{closest(key, allowed)}")
    if "object" in raw and not (isinstance(raw["object"], str) and raw["object"]):
        raise UserError(f"{where}.object must be the name of a world object, got {raw['object']!r}")
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
    if type(out["steps"]) is not int or not 1 <= out["steps"] <= 1000:
        raise UserError(f"{where}.steps must be an integer in [1, 1000]")
    if not isinstance(out["guidance"], int | float) or not 0 <= out["guidance"] <= 50:
        raise UserError(f"{where}.guidance must be a number in [0, 50]")
    out["guidance"] = float(out["guidance"])
    return out


def resolve(
    concept_arg: str, flags: dict[str, Any], set_items: list[str]
) -> tuple[TrainConfig, Concept]:
    """Build the run's config from a concept, command-line flags and ``--set`` overrides."""
    concept = load_concept(concept_arg)
    cfg = TrainConfig()
    apply_overrides(cfg, concept.train, f"{concept.path}: train")
    apply_overrides(cfg, {k: v for k, v in flags.items() if v is not None}, "command line")
    apply_overrides(cfg, parse_set(set_items), "--set")
    return validate(cfg), concept

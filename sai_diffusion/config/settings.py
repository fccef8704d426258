"""Every setting of a training run, declared once and grouped by the component that reads it.

    TrainConfig            seed, max_steps, batch_size, grad_accum, resolution, log_every
      base                 the model the LoRA is trained on
      optimizer            the optimizer, its learning rates and schedule
      lora                 the adapters: rank, alpha, targets, text encoder, DoRA
      embeddings           the concept words' vectors (trained or not, layer-wise or not)
      compute              precision, memory and caching
      data                 how an image becomes a training example
      captions             how a caption becomes a prompt
      loss                 the objective's extra terms and weights
      prior                prior preservation's class images
      validation           held-out images, validation loss and samples
      sampling             how samples and class images are drawn
      checkpoints          how often, how many
      ema                  an exponential moving average of the trained tensors

A setting is written ``section.key`` (``lora.rank``, ``--set lora.rank=8``) or by the flat name
it had before sections existed (``rank``, ``--set rank=8``; ``FLAT``): concept YAMLs, README
commands and the ``run.yaml`` of older runs keep working. Each declaration (``setting``) holds
the default, the accepted range, the flat name and one line of help; the range checks, the
settings reference in docs/training.md (``reference.py``) and ``--set`` all read it.

``validate`` checks a config in one place: each setting's range, the rules between settings,
and the settings that cannot act given the others (``inert_settings``: ``optimizer.momentum``
under AdamW, ``lora.text_encoder_rank`` without text-encoder LoRA, ...), which are refused when
the command line gives them and warned about when a shared YAML does.

Plain Python (no torch): ``--help`` and every check run before a model library loads.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import UserError
from ..optim.names import OPTIMIZERS, SAI_SCALES
from .loading import closest, short

# The base model when none is given: the built-in miniature model, the tiny SD-1.5-architecture
# model pretrained on the procedural world (``_resources.miniature_dir``).
BUILTIN_BASE_MODEL = "miniature"

# LoRA targets: SD's attention projections (UNet, every attn1/attn2) and CLIP's (text encoder).
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")

# Learning rates per optimizer when neither the concept nor the user gives one. SGD-SaI's scales
# are <= 1 relative to its lr, hence a larger lr (the paper trains the potter LoRA at 0.1).
# One entry per name in optim.OPTIMIZERS.
DEFAULT_LR = {"sgd-sai": 0.1, "scaled-adamw": 1e-4, "scaled-sgd": 1e-2, "adamw": 1e-4, "sgd": 1e-2}

SCHEDULES = ("constant", "linear", "cosine")
PRECISIONS = ("no", "fp16", "bf16")
AUGMENTATIONS = ("crop", "resize-crop-pad")

# Step counts and intervals stop here: four months at a step a second, where a LoRA trains for
# a few thousand. Larger values are typos, and past 2**63 they overflow torch's int64.
MAX_STEPS = 10_000_000
# Seeds are in [0, 2**63): a non-negative int64, which every seed path of torch takes (its
# manual_seed takes [-2**63, 2**64) and wraps, so two written seeds would draw the same noise).
SEED_LIMIT = 2**63


# ------------------------------------------------------------------------- declarations
@dataclass(frozen=True)
class Rule:
    """A range check: ``ok(value)`` for a non-empty value (with ``each``: for each item of a
    list), said as ``text`` when it fails."""

    ok: Callable[[Any], bool]
    text: str
    each: bool = False


def _finite(v: float) -> bool:
    """Not nan or ±inf; an int always is (math.isfinite would overflow on 10**400)."""
    return isinstance(v, int) or math.isfinite(v)


def _number(x: float) -> str:
    return f"{x:_}" if isinstance(x, int) and abs(x) >= 100_000 else f"{x:g}"


def within(low: float, high: float, *, low_open: bool = False, high_open: bool = False,
           note: str = "") -> Rule:  # fmt: skip
    """A finite number in [low, high] (an open end excludes it)."""

    def ok(v: float) -> bool:
        above = v > low if low_open else v >= low
        below = v < high if high_open else v <= high
        return _finite(v) and above and below

    text = (f"must be in {'(' if low_open else '['}{_number(low)}, {_number(high)}"
            f"{')' if high_open else ']'}")  # fmt: skip
    return Rule(ok, text + (f" ({note})" if note else ""))


def at_least(low: float, *, note: str = "") -> Rule:
    """A finite number >= low (for floats: a setting with no upper bound that nan or inf
    would break)."""
    return Rule(lambda v: _finite(v) and v >= low,
                f"must be a finite number >= {low:g}" + (f" ({note})" if note else ""))  # fmt: skip


POSITIVE = Rule(lambda v: _finite(v) and v > 0, "must be a finite number > 0")
STEPS = within(1, MAX_STEPS)
SEED = Rule(lambda v: 0 <= v < SEED_LIMIT, "must be in [0, 2**63) (torch.Generator's seeds)")
SEEDS = Rule(SEED.ok, "must be integers in [0, 2**63) (torch.Generator's seeds)", each=True)


def interval(*, note: str = "") -> Rule:
    """Steps between two events: at most MAX_STEPS; 0 allowed only where ``note`` says what it
    means."""
    return within(0 if note else 1, MAX_STEPS, note=note)


def setting(default: Any = dataclasses.MISSING, doc: str = "", *, flat: str | None = None,
            rule: Rule | None = None, choices: tuple[str, ...] | None = None,
            factory: Callable[[], Any] | None = None) -> Any:  # fmt: skip
    """One setting: its default (or ``factory``), one line of help, the flat name it also goes
    by (default: its own key), and what it accepts (``rule`` or ``choices``)."""
    metadata = {"doc": doc, "flat": flat, "rule": rule, "choices": choices}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def section(cls: type) -> Any:
    return field(default_factory=cls, metadata={"section": True})


# ------------------------------------------------------------------------------ sections
@dataclass
class BaseModel:
    """The model the LoRA is trained on."""

    model: str | None = setting(
        BUILTIN_BASE_MODEL, "a diffusers folder, a single-file .safetensors checkpoint, a hub id, "
        "or `miniature` (the built-in model)", flat="base_model")  # fmt: skip
    config: str | None = setting(
        None, "a weight-free diffusers config folder for a single-file checkpoint (default: "
        "the shipped one of its family: configs/sd15, configs/sd2 or configs/sdxl)",
        flat="base_config")  # fmt: skip
    allow_pickle: bool = setting(
        False, "load pickle weights (.ckpt, .bin), which can run code when loaded"
    )
    prediction_type: str = setting(
        "auto", "what the UNet predicts: auto (the model's scheduler config; for an SD 2.x "
        "single file, a v_pred marker or its weights), epsilon or v_prediction",
        choices=("auto", "epsilon", "v_prediction"))  # fmt: skip


@dataclass
class Optimizer:
    """The optimizer, its learning rates and their schedule."""

    name: str = setting("sgd-sai", "sgd-sai, scaled-adamw, scaled-sgd, adamw or sgd",
                        flat="optimizer", choices=OPTIMIZERS)  # fmt: skip
    lr: float | None = setting(
        None, "the UNet LoRA's learning rate (default: the concept's for this optimizer, else "
        "DEFAULT_LR)", rule=within(0, 10, low_open=True))  # fmt: skip
    lr_text_encoder: float | None = setting(
        None, "the text-encoder LoRA's learning rate (default: the concept's, else lr / 10)",
        rule=within(0, 10, low_open=True))  # fmt: skip
    lr_embeddings: float | None = setting(
        None, "the concept words' vectors' learning rate (default: the concept's, else lr)",
        rule=within(0, 10, low_open=True))  # fmt: skip
    weight_decay: float = setting(0.0, "decoupled weight decay (every optimizer)",
                                  rule=within(0, 1))  # fmt: skip
    momentum: float = setting(0.9, "momentum of sgd-sai, sgd and scaled-sgd",
                              rule=within(0, 1, high_open=True))  # fmt: skip
    scaled_reg: float = setting(
        1e-2, "scaled-AdamW / scaled-SGD: the preconditioner's regulariser (B^T B + reg I)",
        rule=at_least(0))  # fmt: skip
    # 0, not the paper's 1e-8: LoRA's A gets its first gradient when B is still of order
    # lr x |g|, and a fixed 1e-8 beside its tiny std would freeze A's scale near 0
    # (docs/dev/optimizer-spec.md); a zero variance is handled apart anyway.
    sai_eps: float = setting(0.0, "SGD-SaI: eps of g-SNR = |g| / (std(g) + eps)",
                             rule=within(0, 1))  # fmt: skip
    sai_scale: str = setting(
        "paper", "SGD-SaI's per-tensor lr scale: paper (g-SNR / max g-SNR, <= 1), released "
        "(the raw g-SNR, as sgd-sai 1.0.3) or sqrt-numel (sqrt of the tensor's size, the "
        "authors' v1.1.0); the last two are tens to hundreds: lower lr to match",
        choices=tuple(SAI_SCALES))  # fmt: skip
    max_grad_norm: float = setting(0.0, "clip the gradients' global norm to this (0: off)",
                                   rule=at_least(0, note="0: off"))  # fmt: skip
    schedule: str = setting("constant", "the lr schedule: constant, linear or cosine (to 0 at "
                            "max_steps)", flat="lr_scheduler", choices=SCHEDULES)  # fmt: skip
    warmup_steps: int = setting(0, "linear warm-up steps", rule=interval(note="0: none"))


@dataclass
class Lora:
    """The LoRA adapters: where they go and their size."""

    rank: int = setting(4, "rank of the UNet's LoRA (and the text encoder's, by default)",
                        rule=within(1, 1024))  # fmt: skip
    alpha: float = setting(1.0, "LoRA alpha: the update is scaled by alpha / rank",
                           rule=POSITIVE)  # fmt: skip
    targets: list[str] = setting(
        doc="UNet module names that get LoRA (Linear or Conv2d; conv1, conv2, conv_shortcut "
        "make LoCon)", flat="lora_targets", factory=lambda: list(DEFAULT_LORA_TARGETS),
        rule=Rule(bool, "must name at least one module"))  # fmt: skip
    text_encoder: bool = setting(False, "LoRA on the text encoder's attention too",
                                 flat="text_encoder_lora")  # fmt: skip
    text_encoder_2: bool | None = setting(
        None, "SDXL-class models: LoRA on the second text encoder (OpenCLIP bigG) too (default: "
        "as text_encoder)")  # fmt: skip
    text_encoder_rank: int | None = setting(None, "rank of the text encoder's LoRA (default: "
                                            "rank)", rule=within(1, 1024))  # fmt: skip
    text_encoder_alpha: float | None = setting(
        None, "alpha of the text encoder's LoRA (default: alpha)", rule=POSITIVE)  # fmt: skip
    dora: bool = setting(False, "DoRA: each adapted layer also learns the norm of its weight's "
                         "rows", flat="use_dora")  # fmt: skip


@dataclass
class Embeddings:
    """The concept words' vectors."""

    train: bool = setting(False, "train the concept words' vectors", flat="train_embeddings")
    init_noise_std: float = setting(
        0.0, "Gaussian noise added to a word initialised from a plain word",
        rule=within(0, 1))  # fmt: skip
    edlora: bool = setting(False, "Mix-of-Show's ED-LoRA: one vector per word and "
                           "cross-attention layer")  # fmt: skip
    max_norm: float = setting(
        0.0, "stop training the vectors once their rows' mean norm reaches this (0: never; "
        "Mix-of-Show 0.55)", flat="embeddings_max_norm", rule=within(0, 100))  # fmt: skip


@dataclass
class Compute:
    """Precision, memory and what is computed once."""

    mixed_precision: str = setting("no", "no, fp16 or bf16", choices=PRECISIONS)
    vae_fp32: bool = setting(True, "keep the VAE in fp32 under mixed precision")
    gradient_checkpointing: bool = setting(False, "recompute activations in the backward pass "
                                           "(less memory, more time)")  # fmt: skip
    cache_latents: bool = setting(True, "encode each image once, at its centre crop (of its "
                                  "bucket), before training")  # fmt: skip
    data_workers: int | None = setting(
        None, "processes preparing the coming steps' examples while the device trains (0: on "
        "the training thread); default: up to 4 on a GPU, 0 on the CPU. The results are the "
        "same for any number", rule=within(0, 64))  # fmt: skip


@dataclass
class Data:
    """How a concept image becomes a training example."""

    augmentation: str = setting(
        "crop", "crop: shorter side to the resolution, then a crop; resize-crop-pad: "
        "Mix-of-Show's random rescale, crop and paste into the square", choices=AUGMENTATIONS)  # fmt: skip
    center_crop: bool = setting(False, "crop the centre instead of a random place")
    random_flip: float = setting(0.5, "probability of a horizontal flip", rule=within(0, 1))
    use_masks: bool = setting(True, "weight the loss by the subject masks (mask/<name>.png)")
    buckets: bool = setting(False, "aspect-ratio buckets: each image trains at about its own "
                            "shape, resolution^2 pixels")  # fmt: skip
    bucket_step: int = setting(
        64, "buckets' sides are multiples of this",
        rule=Rule(lambda v: 8 <= v <= 512 and v % 8 == 0, "must be a multiple of 8 in [8, 512] "
                  "(64 for SD 1.5)"))  # fmt: skip


@dataclass
class Captions:
    """How a caption becomes the prompt an example trains with."""

    shuffle: bool = setting(False, "shuffle the comma-separated phrases of each caption",
                            flat="shuffle_captions")  # fmt: skip
    keep_tokens: int = setting(1, "with shuffle: the leading phrases kept in place",
                               rule=within(0, 75))  # fmt: skip
    templates: bool = setting(False, 'wrap each caption in a random template ("a photo of {}", '
                              '...)', flat="caption_templates")  # fmt: skip
    dropout: float = setting(0.0, "share of examples trained with the empty caption",
                             flat="caption_dropout", rule=within(0, 1))  # fmt: skip


@dataclass
class Loss:
    """The objective: weights and extra terms of the noise-prediction loss."""

    noise_offset: float = setting(0.0, "noise offset (a per-channel constant added to the "
                                  "noise)", rule=within(0, 1))  # fmt: skip
    min_snr_gamma: float = setting(0.0, "min-SNR weighting's gamma (0: off)",
                                   rule=at_least(0, note="0: off"))  # fmt: skip
    # multiplies the noise-prediction loss: Mix-of-Show's masked mean sums the 4 latent
    # channels over a 1-channel mask, 4x the mean (it matters for SGD, not for Adam)
    scale: float = setting(1.0, "multiplies the loss (Mix-of-Show's masked loss: 4)",
                           flat="loss_scale", rule=within(0, 1000, low_open=True))  # fmt: skip
    attn_reg_weight: float = setting(
        0.0, "the words' cross-attention outside the subject mask, penalised (Mix-of-Show "
        "0.01; needs masks)", rule=within(0, 100, note="0: off"))  # fmt: skip


@dataclass
class Prior:
    """Prior preservation (DreamBooth): class images trained beside the concept's."""

    class_data: str | None = setting(
        None, "a folder of class images (relative: to the concept YAML, else the cwd)"
    )
    class_prompt: str | None = setting(
        None, 'the class images\' caption (default: "a photo of <class word>")'
    )
    num_class_images: int = setting(
        0, "class images to use; the base model draws the missing ones", rule=within(0, 100_000)
    )
    loss_weight: float = setting(1.0, "weight of the class examples' loss",
                                 flat="prior_loss_weight", rule=within(0, 100, low_open=True))  # fmt: skip


@dataclass
class Validation:
    """Held-out images for a validation loss, and validation samples."""

    split: float = setting(0.0, "share of the concept's images held out (the same for every "
                           "seed)", flat="validation_split",
                           rule=within(0, 1, high_open=True, note="0: off"))  # fmt: skip
    data: str | None = setting(None, "a folder of held-out images (relative: to the concept "
                               "YAML, else the cwd)", flat="validation_data")  # fmt: skip
    loss_every: int = setting(50, "steps between validation losses",
                              flat="validation_loss_every", rule=interval())  # fmt: skip
    samples_every: int = setting(0, "steps between validation samples (0: only at the end)",
                                 flat="validation_every",
                                 rule=interval(note="0: only at the end"))  # fmt: skip
    seeds: list[int] = setting(doc="seeds of the validation samples", flat="validation_seeds",
                               factory=lambda: [1, 2], rule=SEEDS)  # fmt: skip


@dataclass
class Sampling:
    """How validation samples and class images are drawn (DPM-Solver++)."""

    steps: int = setting(25, "sampler steps", flat="sample_steps", rule=within(1, 1000))
    guidance_scale: float = setting(7.5, "classifier-free guidance", rule=within(0, 50))
    negative_prompt: str | None = setting(
        "lowres, bad anatomy, bad hands, text, error, cropped, worst quality, low quality, "
        "blurry", "the negative prompt")  # fmt: skip


@dataclass
class Checkpoints:
    """How often a run is saved for resuming, and how many saves are kept."""

    every: int = setting(250, "steps between checkpoints (0: only at the end)",
                         flat="checkpoint_every", rule=interval(note="0: only at the end"))  # fmt: skip
    keep: int = setting(2, "checkpoints kept", flat="keep_checkpoints", rule=STEPS)


@dataclass
class Ema:
    """An exponential moving average of the trained tensors, written as its own files."""

    decay: float = setting(0.0, "the average's decay per step (0: off; e.g. 0.999)",
                           flat="ema_decay", rule=within(0, 1, high_open=True, note="0: off"))  # fmt: skip


@dataclass
class TrainConfig:
    """Every setting of a training run; run.yaml stores the resolved instance, in sections."""

    seed: int = setting(0, "the run's seed: every random draw derives from it", rule=SEED)
    max_steps: int = setting(500, "optimizer steps", rule=STEPS)
    batch_size: int = setting(1, "examples per micro-batch and process", rule=within(1, 1024))
    grad_accum: int = setting(1, "micro-batches per optimizer step", rule=within(1, 1024))
    resolution: int | None = setting(
        None, "training size in pixels (the side of the square; with buckets, the side of a "
        "bucket's area); default: the base model's own (512 SD 1.5, 768 SD 2.x-v, 1024 SDXL)",
        rule=Rule(lambda v: v % 8 == 0 and 8 <= v <= 4096, "must be a multiple of 8 in "
                  "[8, 4096]"))  # fmt: skip
    log_every: int = setting(
        1, "steps between two records of the loss, lr and time", rule=interval()
    )
    base: BaseModel = section(BaseModel)
    optimizer: Optimizer = section(Optimizer)
    lora: Lora = section(Lora)
    embeddings: Embeddings = section(Embeddings)
    compute: Compute = section(Compute)
    data: Data = section(Data)
    captions: Captions = section(Captions)
    loss: Loss = section(Loss)
    prior: Prior = section(Prior)
    validation: Validation = section(Validation)
    sampling: Sampling = section(Sampling)
    checkpoints: Checkpoints = section(Checkpoints)
    ema: Ema = section(Ema)

    def get(self, path: str) -> Any:
        """The value of ``section.key`` (or a top-level key)."""
        owner, key = self._owner(path)
        return getattr(owner, key)

    def set(self, path: str, value: Any) -> None:
        owner, key = self._owner(path)
        setattr(owner, key, value)

    def _owner(self, path: str) -> tuple[Any, str]:
        head, _, key = path.rpartition(".")
        return (getattr(self, head) if head else self), key

    def to_dict(self) -> dict[str, Any]:
        """The settings as run.yaml stores them: top-level keys, then one mapping per section."""
        return dataclasses.asdict(self)

    @property
    def trains_text_encoder(self) -> bool:
        """The text encoder runs in the backward pass: its LoRA or the words' vectors train."""
        return self.lora.text_encoder or bool(self.lora.text_encoder_2) or self.embeddings.train

    @property
    def uses_prior(self) -> bool:
        return bool(self.prior.class_data) or self.prior.num_class_images > 0

    @property
    def augments_captions(self) -> bool:
        """A caption's prompt differs per example (so it is encoded every step)."""
        return self.captions.shuffle or self.captions.templates

    def resolved_lr(self, concept) -> float:
        """The lr of the UNet LoRA (the run's lr): optimizer.lr, else the concept's for this
        optimizer, else DEFAULT_LR."""
        if self.optimizer.lr is not None:
            return self.optimizer.lr
        given = concept.lr.get(self.optimizer.name, DEFAULT_LR[self.optimizer.name])
        return float(given["unet"] if isinstance(given, dict) else given)

    def group_lrs(self, concept) -> dict[str, float]:
        """The lr of each parameter group: ``unet`` (the run's lr), ``text_encoder`` and
        ``embeddings``. A setting (optimizer.lr_text_encoder, .lr_embeddings) wins, then the
        concept's per-optimizer mapping (``lr: {scaled-adamw: {unet: 1e-4, text_encoder:
        1e-5}}``), then the defaults: the text encoder at lr / 10 (Mix-of-Show's 1e-5 against
        1e-4), the embeddings at lr. With optimizer.lr and a mapping, every group of the
        mapping is scaled by lr / its unet entry: the ratios between the groups stay."""
        opt = self.optimizer
        lr = self.resolved_lr(concept)
        given = concept.lr.get(opt.name)
        given = dict(given) if isinstance(given, dict) else {}
        if given and opt.lr is not None:  # --lr moves the mapping's groups with it
            given = {k: v * opt.lr / given["unet"] for k, v in given.items()}
        text_encoder = opt.lr_text_encoder or given.get("text_encoder") or lr / 10
        embeddings = opt.lr_embeddings or given.get("embeddings") or lr
        return {"unet": lr, "text_encoder": float(text_encoder), "embeddings": float(embeddings)}


# ----------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class SettingInfo:
    """One setting as ``--set``, run.yaml and the reference know it."""

    path: str  # "lora.rank"; a top-level setting: "seed"
    flat: str  # the name it had before sections ("rank")
    type: Any
    default: Any
    doc: str
    rule: Rule | None
    choices: tuple[str, ...] | None


def _table() -> dict[str, SettingInfo]:
    out: dict[str, SettingInfo] = {}

    def add(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.metadata.get("section"):
                add(hints[f.name], f"{f.name}.")
                continue
            default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
            out[prefix + f.name] = SettingInfo(
                path=prefix + f.name, flat=f.metadata.get("flat") or f.name, type=hints[f.name],
                default=default, doc=f.metadata.get("doc", ""), rule=f.metadata.get("rule"),
                choices=f.metadata.get("choices"),
            )  # fmt: skip

    add(TrainConfig, "")
    return out


SETTINGS = _table()
SECTIONS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("section"))
# the flat names: every setting also goes by the name it had before sections existed
FLAT = {info.flat: path for path, info in SETTINGS.items()}
assert len(FLAT) == len(SETTINGS), "two settings share a flat name"


# -------------------------------------------------------------------------------- checks
def describe(path: str) -> str:
    """``lora.rank`` said with its flat name where that differs: ``lora.text_encoder
    (text_encoder_lora)``."""
    flat = SETTINGS[path].flat
    return path if flat == path else f"{path} ({flat})"


def _check_ranges(cfg: TrainConfig, where: str) -> None:
    for path, info in SETTINGS.items():
        value, rule = cfg.get(path), info.rule
        if info.choices is not None and value not in info.choices:
            raise UserError(
                f"{where}: {describe(path)} must be one of {', '.join(info.choices)}, got "
                f"{short(value)}{closest(str(value), info.choices)}"
            )
        if rule is None or value is None:
            continue
        if rule.each:
            bad = next((i for i, v in enumerate(value) if not rule.ok(v)), None)
            if bad is not None:
                raise UserError(f"{where}: {describe(path)} {rule.text}; "
                                f"{info.flat}[{bad}] is {short(value[bad])}")  # fmt: skip
        elif not rule.ok(value):
            raise UserError(f"{where}: {describe(path)} {rule.text}, got {short(value)}")


def _check_rules(cfg: TrainConfig, where: str) -> None:
    """Settings that contradict each other: each pair named, with the way out."""
    data, loss = cfg.data, cfg.loss
    if cfg.validation.split > 0 and cfg.validation.data:
        raise UserError(
            f"{where}: validation.split and validation.data both name held-out images; keep "
            "one (validation_data=FOLDER, or validation_split=0.1 of the concept's images)"
        )
    if data.buckets and cfg.resolution is not None and cfg.resolution % data.bucket_step:
        raise UserError(
            f"{where}: data.buckets needs resolution ({cfg.resolution}) to be a multiple of "
            f"data.bucket_step ({data.bucket_step}); change one of them"
        )
    if data.buckets and data.augmentation != "crop":
        raise UserError(
            f"{where}: data.buckets resizes each image to its bucket and crops it; "
            f"data.augmentation={data.augmentation} pastes into a square instead. Keep one"
        )
    if data.augmentation != "crop" and cfg.compute.cache_latents:
        raise UserError(
            f"{where}: data.augmentation={data.augmentation} draws a new rescale and placement "
            "every epoch, which cached latents cannot hold; set cache_latents=false"
        )
    if loss.attn_reg_weight > 0 and not data.use_masks:
        raise UserError(
            f"{where}: loss.attn_reg_weight {loss.attn_reg_weight:g} penalises attention outside "
            "the subject masks, but data.use_masks is false; set use_masks=true or "
            "attn_reg_weight=0"
        )
    if loss.attn_reg_weight > 0 and cfg.compute.gradient_checkpointing:
        raise UserError(
            f"{where}: loss.attn_reg_weight > 0 needs the attention maps of the forward pass, "
            "which compute.gradient_checkpointing discards; set gradient_checkpointing=false or "
            "attn_reg_weight=0"
        )
    for path, example in (("prior.class_prompt", "a photo of a man"),
                          ("sampling.negative_prompt", "blurry, low quality")):  # fmt: skip
        prompt = cfg.get(path)
        if prompt and ("{" in prompt or "}" in prompt):
            raise UserError(
                f"{where}: {path} {short(prompt)} holds braces; it is a plain prompt (e.g. "
                f"{example!r}), used as it is"
            )


def _check_class_words(concept) -> None:
    """Prior preservation without a class prompt says the class in the concept's words."""
    if not concept.plain_initialisers:
        raise UserError(
            f"{concept.path}: prior preservation needs a class prompt, and class_word "
            f"{short(concept.class_word)} names no class; set class_prompt (e.g. "
            "class_prompt='a photo of a man')"
        )


# (the setting, when it acts, what the settings that decide it are now): a setting whose
# condition is false does nothing in this run
_SGD_FAMILY = ("sgd-sai", "sgd", "scaled-sgd")
_SINGLE_FILE = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")  # models.base reads these
_INERT_RULES: tuple[tuple[str, Callable[[TrainConfig], bool], str, str], ...] = (
    ("optimizer.momentum", lambda c: c.optimizer.name in _SGD_FAMILY,
     "optimizer.name sgd-sai, sgd or scaled-sgd", "optimizer.name"),
    ("optimizer.scaled_reg", lambda c: c.optimizer.name.startswith("scaled-"),
     "optimizer.name scaled-adamw or scaled-sgd", "optimizer.name"),
    ("optimizer.sai_eps", lambda c: c.optimizer.name == "sgd-sai",
     "optimizer.name sgd-sai", "optimizer.name"),
    ("optimizer.sai_scale", lambda c: c.optimizer.name == "sgd-sai",
     "optimizer.name sgd-sai", "optimizer.name"),
    ("optimizer.lr_text_encoder", lambda c: c.lora.text_encoder,
     "lora.text_encoder (text_encoder_lora) true", "lora.text_encoder"),
    ("lora.text_encoder_rank", lambda c: c.lora.text_encoder,
     "lora.text_encoder (text_encoder_lora) true", "lora.text_encoder"),
    ("lora.text_encoder_alpha", lambda c: c.lora.text_encoder,
     "lora.text_encoder (text_encoder_lora) true", "lora.text_encoder"),
    ("optimizer.lr_embeddings", lambda c: c.embeddings.train,
     "embeddings.train (train_embeddings) true", "embeddings.train"),
    ("embeddings.max_norm", lambda c: c.embeddings.train,
     "embeddings.train (train_embeddings) true", "embeddings.train"),
    ("captions.keep_tokens", lambda c: c.captions.shuffle,
     "captions.shuffle (shuffle_captions) true", "captions.shuffle"),
    ("data.bucket_step", lambda c: c.data.buckets, "data.buckets true", "data.buckets"),
    ("data.center_crop", lambda c: c.data.augmentation == "crop",
     "data.augmentation crop", "data.augmentation"),
    ("prior.class_prompt", lambda c: c.uses_prior,
     "prior.class_data or prior.num_class_images", "prior.num_class_images"),
    ("prior.loss_weight", lambda c: c.uses_prior,
     "prior.class_data or prior.num_class_images", "prior.num_class_images"),
    ("validation.loss_every", lambda c: c.validation.split > 0 or bool(c.validation.data),
     "validation.split or validation.data", "validation.split"),
    ("base.config", lambda c: str(c.base.model).lower().endswith(_SINGLE_FILE),
     "base.model a single-file checkpoint (.safetensors, .ckpt)", "base.model"),
    ("compute.vae_fp32", lambda c: c.compute.mixed_precision != "no",
     "compute.mixed_precision fp16 or bf16 (in fp32 every module is fp32)",
     "compute.mixed_precision"),
)  # fmt: skip


@dataclass(frozen=True)
class Inert:
    """A setting that cannot act given the others."""

    path: str
    needs: str  # when it would act
    decided_by: str  # the setting that decides it, and its value now
    value: Any

    def message(self, where: str, *, refused: bool = False) -> str:
        said = (
            f"{where}: {describe(self.path)} = {short(self.value)} acts only with "
            f"{self.needs}, and this run has {self.decided_by}"
        )
        if refused:
            return (
                f"{said}: drop {SETTINGS[self.path].flat}, or change {self.decided_by.split()[0]}"
            )
        return f"{said}; it is ignored"


def inert_settings(cfg: TrainConfig, concept=None, *, given: frozenset[str] = frozenset()):
    """The settings that cannot act given the others (``_INERT_RULES``; with ``concept``, also
    ``embeddings.init_noise_std`` when every word starts from ``<rand-S>``): those in ``given``
    (set explicitly, e.g. on the command line), and those whose value differs from the
    default (set in a YAML)."""
    found = []
    rules = list(_INERT_RULES)
    if concept is not None:
        plain = bool(concept.plain_initialisers)
        rules.append(("embeddings.init_noise_std", lambda c: plain,
                      "a concept word initialised from a plain word",
                      f"class_word {short(concept.class_word)}"))  # fmt: skip
    for path, acts, needs, decider in rules:
        if acts(cfg):
            continue
        value = cfg.get(path)
        if path in given or value != SETTINGS[path].default:
            decided = decider if decider not in SETTINGS else f"{decider} {short(cfg.get(decider))}"
            found.append(Inert(path, needs, decided, value))
    return found


def validate(cfg: TrainConfig, where: str = "settings", *,
             given: frozenset[str] | set[str] = frozenset(), concept=None) -> TrainConfig:  # fmt: skip
    """Check every setting's range, the rules between settings, the concept's prompts (with
    ``concept``), and refuse a setting in
    ``given`` (set explicitly) that cannot act given the others (``inert_settings``; those set
    elsewhere are for the caller to warn about). Returns ``cfg``.

    Raises:
        UserError: naming the setting (and the other one), the accepted range and the way out.
    """
    _check_ranges(cfg, where)
    _check_rules(cfg, where)
    if concept is not None:
        concept.check_prompts()
    if concept is not None and cfg.uses_prior and not cfg.prior.class_prompt:
        _check_class_words(concept)
    for inert in inert_settings(cfg, concept, given=frozenset(given)):
        if inert.path in given:
            raise UserError(inert.message(where, refused=True))
    return cfg


# ------------------------------------------------------------------------------- parsing
_SECTION_NAMES = frozenset(SECTIONS)


def setting_paths(values: dict[str, Any], where: str) -> dict[str, Any]:
    """``{path: value}`` of a settings mapping in any of its forms: flat names (``rank: 8``),
    dotted paths (``lora.rank: 8``) and section mappings (``lora: {rank: 8}``); ``optimizer``
    is the section when its value is a mapping, else the optimizer's name.

    Raises:
        UserError: an unknown key (with the closest valid one) or a section given a value.
    """
    out: dict[str, Any] = {}
    for key, value in values.items():
        key = str(key)
        if key in _SECTION_NAMES and isinstance(value, dict):
            nested = {f"{key}.{sub}": v for sub, v in value.items()}
            out.update(setting_paths(nested, where))
        elif key in SETTINGS and "." in key:
            out[key] = value
        elif key in FLAT:
            out[FLAT[key]] = value
        elif key in _SECTION_NAMES:
            keys = ", ".join(p for p in SETTINGS if p.startswith(key + "."))
            raise UserError(
                f"{where}: {short(key)} is a section of settings ({keys}); give a mapping "
                f"({key}: {{...}}) or one setting as {key}.KEY=value"
            )
        else:
            names = [*FLAT, *SETTINGS]
            raise UserError(f"{where}: unknown setting {short(key)}{closest(key, names)}")
    return out


def coerce(path: str, value: Any, where: str) -> Any:
    """Check ``value`` against the declared type of setting ``path`` (YAML 1.1 words such as
    ``on`` / ``off`` are read as booleans). Its range is ``validate``'s: an integer of any size
    passes here, and every number setting has a rule that bounds it."""
    hint = SETTINGS[path].type
    args = typing.get_args(hint)
    optional = isinstance(hint, types.UnionType) and type(None) in args
    if value is None:
        if optional:
            return None
        raise UserError(f"{where}: '{describe(path)}' cannot be empty")
    base = next((a for a in args if a is not type(None)), hint) if optional else hint
    origin = typing.get_origin(base)
    try:
        if origin is list:
            (item,) = typing.get_args(base)
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list):
                raise TypeError
            return [_scalar(item, v) for v in value]
        return _scalar(base, value)
    except (TypeError, ValueError, OverflowError):
        name = getattr(base, "__name__", base)
        raise UserError(f"{where}: '{describe(path)}' must be {name}, got {short(value)}") from None


_TRUE_WORDS, _FALSE_WORDS = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _scalar(kind: type, value: Any) -> Any:
    if kind is bool:
        if isinstance(value, str) and value.lower() in _TRUE_WORDS + _FALSE_WORDS:
            return value.lower() in _TRUE_WORDS
        if not isinstance(value, bool):
            raise TypeError
        return value
    if kind is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise TypeError
        return int(value)  # its range is its rule's (every int setting has one)
    if kind is float:
        if isinstance(value, bool):
            raise TypeError
        return float(value)
    if isinstance(value, dict | list):
        raise TypeError
    return str(value)


def apply_overrides(cfg: TrainConfig, values: dict[str, Any], where: str) -> TrainConfig:
    """Set every setting of ``values`` (any form ``setting_paths`` reads) on ``cfg``."""
    for path, value in setting_paths(values, where).items():
        cfg.set(path, coerce(path, value, where))
    return cfg


def flat_settings(values: dict[str, Any]) -> bool:
    """True for a settings mapping written before sections existed (no section mapping)."""
    return not any(k in _SECTION_NAMES and isinstance(v, dict) for k, v in values.items())

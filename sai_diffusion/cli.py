"""Command-line entry points: ``sai-train-lora``, ``sai-sample``, ``sai-eval``, ``sai-compare``,
``sai-export`` and ``sai-app``.

They parse flags into the library's config and call it; bad input ends with exit code 2 and
one message (a flag that breaks its rule in ``cli_args`` while it is parsed), a diverged run
with exit code 3. The library parts that load torch, diffusers or
gradio are imported inside each command, after its flags are parsed: ``--help`` and a typo
answer at once.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import importlib.util
import json
import sys
from collections.abc import Callable
from pathlib import Path

from . import cli_args, config
from ._resources import app_dir
from .errors import EXIT_DIVERGED, EXIT_USER_ERROR, Interrupted, TrainingDiverged, UserError
from .files.run_dir import EVAL_FILE, RUN_FILE, RunDir, load_run_info
from .optim import OPTIMIZERS

# full disk, quota, read-only filesystem, file too large, no permission
_DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EACCES}


def _run(main: Callable[[list[str] | None], int], argv: list[str] | None) -> int:
    """Turn the library's user-facing errors into one line on stderr and an exit code."""
    try:
        return main(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except TrainingDiverged as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_DIVERGED
    except OSError as exc:
        if exc.errno not in _DISK_ERRORS:
            raise
        # a write that failed anywhere (metrics, samples, logs): the run folder is the problem
        where = f" {exc.filename}" if exc.filename else ""
        print(
            f"error: cannot write{where} ({exc.strerror}); free disk space or give a writable "
            "--output-dir; a training run continues from its last checkpoint with --resume",
            file=sys.stderr,
        )
        return EXIT_USER_ERROR
    except Interrupted as exc:  # training stopped by a signal, its work kept
        print(f"interrupted: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:  # before or after training (loading, sampling): nothing to keep
        print("interrupted", file=sys.stderr)
        return 130


# --------------------------------------------------------------------------- sai-train-lora
def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sai-train-lora",
        description="Fine-tune LoRA adapters of an SD-1.5-class checkpoint on a concept "
        "with SGD-SaI, scaled-AdamW, AdamW or SGD.",
        epilog=f"Any setting of {RUN_FILE} can be given as --set key=value, e.g. "
        "--set mixed_precision=bf16 --set lora_targets=to_q,to_v",
    )
    p.add_argument(
        "--concept", help="a shipped concept name (potter, hermione, ...) or a YAML file"
    )
    p.add_argument("--base-model", help="diffusers folder, single-file .safetensors, or hub id")
    p.add_argument(
        "--base-config",
        help="weight-free diffusers config folder for a single file "
        "(default: the shipped SD 1.5 one)",
    )
    p.add_argument("--optimizer", choices=OPTIMIZERS)
    p.add_argument("--lr", type=float, help="learning rate (default: the concept's, per optimizer)")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--resolution", type=int)
    p.add_argument("--rank", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--output-dir", type=cli_args.out_dir,
                   help="run folder (default: runs/<concept>/<optimizer>-lr...)")  # fmt: skip
    p.add_argument(
        "--resume", metavar="DIR|latest", help="continue a run from its latest complete checkpoint"
    )
    p.add_argument(
        "--allow-changed-data",
        action="store_true",
        help="with --resume: continue although the concept's images, masks or captions changed",
    )
    p.add_argument("--set", dest="set_items", action="append", default=[], metavar="KEY=VALUE")
    return p


def train_main(argv: list[str] | None = None) -> int:
    args = train_parser().parse_args(argv)
    flags = {
        "base_model": args.base_model,
        "base_config": args.base_config,
        "optimizer": args.optimizer,
        "lr": args.lr,
        "max_steps": args.max_steps,
        "batch_size": args.batch_size,
        "resolution": args.resolution,
        "rank": args.rank,
        "seed": args.seed,
        "checkpoint_every": args.checkpoint_every,
    }
    if args.resume:
        from .training.resume import resume_dir, resumed_settings  # no torch

        run_dir = resume_dir(args.resume, args.output_dir)
        cfg, concept = resumed_settings(RunDir(run_dir), args.concept, flags, args.set_items)
        from .training.recipe import run_training  # torch: only once the settings are good

        run_training(cfg, concept, run_dir, resume=True,
                     allow_changed_data=args.allow_changed_data)  # fmt: skip
    else:
        if not args.concept:
            raise UserError(
                "--concept is required: a shipped concept name "
                f"({', '.join(config.available_concepts())}) or a YAML file"
            )
        cfg, concept = config.resolve(args.concept, flags, args.set_items)
        _check_judged_object(concept)
        from .training.recipe import default_run_dir, run_training

        run_dir = Path(args.output_dir) if args.output_dir else default_run_dir(cfg, concept)
        run_training(cfg, concept, run_dir)
    from accelerate import PartialState  # set up by the run: under DDP, say it once

    state = PartialState()
    if state.is_main_process:
        print(f"done: {run_dir}")
    if state.num_processes > 1:  # every rank here; leaving the group to exit would race
        state.wait_for_everyone()
        state.destroy_process_group()
    return 0


def _check_judged_object(concept: config.Concept) -> None:
    """A miniature-world concept names the object its judge looks for: check it before
    training, not when sai-eval runs."""
    if concept.evaluation and "object" in concept.evaluation:
        from .miniature.concept import judged_object

        judged_object(concept)


def train_entry() -> None:
    sys.exit(_run(train_main, None))


# ------------------------------------------------------------------------------ sai-sample
def sample_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="sai-sample", description="Generate images with a trained run."
    )
    p.add_argument("--run", required=True, help="run folder written by sai-train-lora")
    p.add_argument("--prompt", type=cli_args.prompt_template, action="append", required=True,
                   help="may repeat; {token} stands for the run's words")  # fmt: skip
    p.add_argument("--seed", type=cli_args.seed, action="append", help="may repeat (default: 1)")
    p.add_argument("--steps", type=cli_args.steps, default=25)
    p.add_argument("--guidance", type=cli_args.guidance, default=7.5)
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--lora-weight", type=cli_args.lora_weight, default=1.0)
    p.add_argument("--resolution", type=cli_args.resolution, help="default: the run's")
    p.add_argument("--out", type=cli_args.out_dir, default=None,
                   help=f"output folder (default: {RunDir('RUN').samples('sai-sample')})")  # fmt: skip
    args = p.parse_args(argv)
    run = RunDir(args.run)
    cfg, concept, _ = run.read_config()
    if not run.is_finished:
        raise UserError(
            f"{run.path} has no {run.lora.name}: the run has not finished; resume it "
            f"with sai-train-lora --resume {run.path}"
        )
    from .models.inference import RunModels  # torch: only once the run proved good
    from .models.sampling import SampleSettings, write_samples

    models = RunModels([load_run_info(run.path)], scheduler="native")  # the model's sampler
    size = args.resolution or cfg.resolution
    settings = SampleSettings(
        steps=args.steps,
        guidance_scale=args.guidance,
        negative_prompt=args.negative_prompt,
        height=size,
        width=size,
    )
    prompts = [pr.replace(cli_args.PLACEHOLDER, concept.text) for pr in args.prompt]
    out = Path(args.out) if args.out else run.samples("sai-sample")
    with models.active(models.runs[0].name, args.lora_weight) as pipe:
        for path in write_samples(pipe, prompts, args.seed or [1], settings, out):
            print(path)
    return 0


def sample_entry() -> None:
    sys.exit(_run(sample_main, None))


# ------------------------------------------------------------------------------ sai-export
EXPORT_FORMATS = ("mix-of-show",)


def export_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="sai-export",
        description="Write a finished run in another tool's layout. mix-of-show: the "
        "edlora_model-latest.pth that Mix-of-Show's inference and gradient fusion load "
        "(merge at alpha 1.0 for the trained strength).",
    )
    p.add_argument("run", metavar="RUN_DIR", help="run folder written by sai-train-lora")
    p.add_argument("--format", required=True, choices=EXPORT_FORMATS)
    p.add_argument("--out", type=cli_args.out_file, required=True,
                   help="the file to write, e.g. potter.pth (outside the run folder)")  # fmt: skip
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = p.parse_args(argv)
    RunDir(args.run).read_config()  # a run folder at all: one clear line before torch loads
    from .files.mix_of_show import export_mix_of_show

    print(export_mix_of_show(Path(args.run), Path(args.out), overwrite=args.force))
    return 0


def export_entry() -> None:
    sys.exit(_run(export_main, None))


# ----------------------------------------------------------------------------- sai-compare
def compare_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sai-compare",
        description="Render several runs side by side: one base model, the same prompts, "
        "seeds, sampler (DPM-Solver++), steps and guidance. Writes a labelled grid PNG (one "
        "row per run, one column per seed, one block per prompt, stacked under the prompt) "
        f"and an HTML report beside it with each run's settings and {EVAL_FILE} scores.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders of sai-train-lora")
    p.add_argument("--prompt", type=cli_args.prompt_template, action="append", required=True,
                   help="may repeat; {token} is each run's token")  # fmt: skip
    p.add_argument("--seeds", type=cli_args.seed, nargs="+", default=[1, 2], help="default: 1 2")
    p.add_argument("--out", type=cli_args.out_file, required=True,
                   help="grid PNG; the report goes beside it as .html")  # fmt: skip
    p.add_argument("--steps", type=cli_args.steps, default=25)
    p.add_argument("--guidance", type=cli_args.guidance, default=7.5)
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--lora-weight", type=cli_args.lora_weight, nargs="+", default=[1.0],
                   help="one grid per weight, e.g. 0 0.7 1.0 as Mix-of-Show compares; 0 gives "
                   "the base model (an ED-LoRA run keeps its embeddings)")  # fmt: skip
    p.add_argument("--resolution", type=cli_args.resolution, help="default: the first run's")
    p.add_argument(
        "--with-base",
        action="store_true",
        help="add a row of the base model without LoRA ({token} read as the class word)",
    )
    p.add_argument("--device", help="default: cuda when available, else cpu")
    return p


def compare_main(argv: list[str] | None = None) -> int:
    args = compare_parser().parse_args(argv)
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise UserError(f"--out {out}: give a .png file name; the report is written beside it")
    if out.with_suffix(".html").is_dir():  # found now, not after every image is drawn
        raise UserError(f"--out {out}: the report's name {out.with_suffix('.html')} is a "
                        "folder; choose another name for the grid")  # fmt: skip
    from tqdm.auto import tqdm

    from .compare import SCHEDULER, Comparer, load_run_info, write_report

    runs = [load_run_info(Path(d)) for d in args.runs]
    comparer = Comparer(runs, device=args.device)
    weights = args.lora_weight
    per_grid = len(args.seeds) * (len(runs) + int(args.with_base))
    grids = {}
    total = per_grid * len(args.prompt) * len(weights)
    with tqdm(total=total, unit="image", dynamic_ncols=True) as bar:
        for prompt in args.prompt:
            for weight in weights:
                title = prompt if len(weights) == 1 else f"{prompt} (LoRA weight {weight:g})"
                shown = comparer.compare(
                    prompt,
                    args.seeds,
                    title=title,
                    steps=args.steps,
                    guidance=args.guidance,
                    negative_prompt=args.negative_prompt,
                    lora_weight=weight,
                    resolution=args.resolution,
                    progress=lambda done, total: bar.update(1),
                    with_base=args.with_base,
                )
                grids[title] = shown.grid
    settings = {
        "seeds": args.seeds,
        "sampler": SCHEDULER,
        "steps": args.steps,
        "guidance": args.guidance,
        "negative prompt": args.negative_prompt,
        "LoRA weight": ", ".join(f"{w:g}" for w in weights),
        "resolution": args.resolution or comparer.runs[0].resolution,
        "base row": "base model without LoRA, {token} read as the class word"
        if args.with_base
        else "no",
    }
    report = write_report(out, grids, comparer.runs, settings)
    print(out)
    print(report)
    return 0


def compare_entry() -> None:
    sys.exit(_run(compare_main, None))


# -------------------------------------------------------------------------------- sai-eval
def eval_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="sai-eval",
        description="Score runs: CLIP text alignment (clip_t, and Mix-of-Show's 2.5 * max(cos, "
        "0) as clip_t_mos), CLIP and DINO image alignment with the training images (clip_i, "
        "dino), each beside the base model's (base_*); runs of the miniature world also get "
        "the judge's concept_fidelity and prompt_fidelity (CLIP figures only with "
        "--clip-model). Prints one JSON line per run, writes RUN_DIR/"
        f"{EVAL_FILE} and keeps the scored images in RUN_DIR/eval/.",
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders of sai-train-lora")
    p.add_argument("--clip-model", help="hub id or folder of a transformers CLIP model "
                   "(default for non-miniature concepts: openai/clip-vit-base-patch32)")  # fmt: skip
    p.add_argument("--dino-model", help="hub id or folder of a DINO ViT (default with CLIP: "
                   "facebook/dino-vits16; 'none' skips DINO)")  # fmt: skip
    p.add_argument("--prompts", help="a file of prompts with {token}, one per line, or a shipped "
                   "set: person, object, style (default: the concept's)")  # fmt: skip
    p.add_argument("--seeds", type=cli_args.seed, nargs="+",
                   help="default: the concept's evaluation seeds")  # fmt: skip
    p.add_argument("--steps", type=cli_args.steps,
                   help="sampler steps (default: the concept's, or 20)")  # fmt: skip
    p.add_argument("--guidance", type=cli_args.guidance,
                   help="guidance scale (default: the concept's, or 6)")  # fmt: skip
    p.add_argument("--no-base", action="store_true", help="skip the base model's scores")
    p.add_argument("--class-fidelity", action="store_true",
                   help="miniature world: also judge the prompts with the class word (what the "
                   "LoRA did to its class; prior preservation's measure)")  # fmt: skip
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    args = p.parse_args(argv)
    concepts = {}
    for run_dir in args.run_dirs:  # before torch loads: a typo answers at once
        _, concepts[run_dir], _ = RunDir(run_dir).read_config()
    if args.prompts is not None:
        from .evaluation.evaluator import read_prompts  # checked before any model loads

        read_prompts(args.prompts)
    from .miniature.concept import judges  # no torch

    judged = {d: judges(c, args.prompts) for d, c in concepts.items()}
    if args.class_fidelity and not all(judged.values()):
        raise UserError(
            "--class-fidelity is the judge's, for runs of miniature-world concepts scored on "
            "their own prompts; drop --prompts, or --class-fidelity for other concepts"
        )
    from .evaluation.alignment import DEFAULT_CLIP, DEFAULT_DINO, AlignmentModels
    from .evaluation.evaluator import evaluate, headline
    from .miniature.evaluate import scorers_for

    models = None  # CLIP / DINO score every run the judge does not (or every run, when asked)
    if args.clip_model or not all(judged.values()):
        dino = args.dino_model or DEFAULT_DINO
        models = AlignmentModels.load(args.clip_model or DEFAULT_CLIP,
                                      None if dino.lower() == "none" else dino)  # fmt: skip
    base_cache: dict = {}  # runs on one base model share its images
    for run_dir, concept in concepts.items():
        scorers = scorers_for(concept, alignment=models, prompts=args.prompts,
                              class_fidelity=args.class_fidelity)  # fmt: skip
        report = evaluate(
            Path(run_dir), scorers, prompts=args.prompts, seeds=args.seeds, steps=args.steps,
            guidance=args.guidance, with_base=not args.no_base, device=args.device,
            base_cache=base_cache,
        )  # fmt: skip
        print(json.dumps(headline(report, scorers)), flush=True)
    return 0


def eval_entry() -> None:
    sys.exit(_run(eval_main, None))


# ---------------------------------------------------------------------------------- sai-app
def app_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sai-app",
        description="Compare trained runs side by side in the browser: same prompts and seeds, "
        "loss curves, SGD-SaI's per-block g-SNR scales, step time and optimizer memory.",
    )
    p.add_argument("--runs-dir", default="runs", help="folder holding the runs (default: runs)")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to serve on (default: 127.0.0.1, this machine only); 0.0.0.0 shows the "
        "runs to your whole network",
    )
    p.add_argument("--port", type=int, help="default: 7860, or the next free one")
    p.add_argument("--device", help="for generating images (default: cuda when available)")
    p.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="another name this app may be reached by (a reverse proxy's); may repeat. Requests "
        "addressed to other names are refused (DNS rebinding)",
    )
    return p


def load_app():
    """The app module (``app/app.py``), from the checkout or from the installed copy.

    ``app/`` is imported as the package ``sai_diffusion_app`` (``app`` is too common a name
    to claim), from wherever ``_resources.app_dir()`` finds it.
    """
    name = "sai_diffusion_app"
    if name not in sys.modules:
        folder = app_dir()
        spec = importlib.util.spec_from_file_location(
            name, folder / "__init__.py", submodule_search_locations=[str(folder)]
        )
        package = importlib.util.module_from_spec(spec)
        sys.modules[name] = package
        spec.loader.exec_module(package)
    return importlib.import_module(f"{name}.app")


def app_main(argv: list[str] | None = None) -> int:
    args = app_parser().parse_args(argv)
    runs_dir = Path(args.runs_dir).expanduser()
    if not runs_dir.is_dir():
        raise UserError(
            f"--runs-dir {runs_dir}: no such folder; point it at the folder your runs are in "
            "(sai-train-lora writes runs/<concept>/... by default)"
        )
    if args.port is not None and not 1 <= args.port <= 65535:
        raise UserError(f"--port must be in [1, 65535], got {args.port}")
    app = load_app()
    if not app.is_loopback(args.host):
        print(
            f"warning: serving on {args.host}: whoever reaches this machine can see the runs in "
            f"{runs_dir} and generate images; starting training from the page is off",
            file=sys.stderr,
        )
    try:
        app.launch(runs_dir, host=args.host, port=args.port, device=args.device,
                   allowed_hosts=args.allow_host)  # fmt: skip
    except OSError as exc:  # the port is taken, or the address is not this machine's
        reason = str(exc).split(". ")[0]
        raise UserError(
            f"cannot serve on {args.host}:{args.port or 7860} ({reason}); pass another --port "
            "or an address of this machine as --host"
        ) from None
    return 0


def app_entry() -> None:
    sys.exit(_run(app_main, None))

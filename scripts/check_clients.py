"""Load a finished run's LoRA files in other tools' real code and measure what each computes.

    python scripts/check_clients.py RUN --base BASE \
        --comfyui ~/src/ComfyUI --comfyui-python ~/venvs/comfy/bin/python \
        --sd-scripts ~/src/sd-scripts --sd-scripts-python ~/venvs/kohya/bin/python \
        --lycoris-python ~/venvs/lycoris/bin/python \
        --diffusers-python ~/venvs/diffusers-0.32/bin/python

Not run in CI: it needs the clients' source trees and their Python environments, which the
project does not install. It trains nothing: RUN is a finished SD 1.x run folder (or its ema/)
and BASE the diffusers folder of its base model. The reference is this project's own reading,
``models.inference.load_run`` (diffusers 0.42 with the DoRA text-encoder magnitudes restored),
with every LoRA layer merged into its weight. Each client then merges the run's files by its
own code, in a child process of the interpreter given for it (default: this one), and the
weights it computes are compared with the reference, layer by layer:

    error     |dW_client - dW_ours| / |dW_ours|  (dW: the change from the base weight;
              0 = the trained model, 1 = the layer left as it was), the largest over the layers
              (|dW_ours| at least 1e-6 |W_ours|: a layer training left as it was is judged
              against fp32's resolution of its weight)
    strength  <dW_client, dW_ours> / |dW_ours|^2, the median over the layers (1 = as trained)
    of |W|    |W_client - W_ours| / |W_ours|, the largest: the error as a share of the weight

A layer the client did not change counts with error 1. The clients and the code each runs:

    diffusers    pipe.load_lora_weights(RUN, weight_name=...) on both files, then peft's merge
                 (any version: give the interpreter of an environment that has it)
    ComfyUI      comfy/lora.py model_lora_keys_unet / model_lora_keys_clip (the key map),
                 comfy/lora_convert.py convert_lora, comfy/lora.py load_lora and
                 calculate_weight (comfy/weight_adapter: LoRA, DoRA), on a key map built from
                 the base checkpoint by comfy/model_detection.py detect_unet_config. One
                 import is replaced, none of the code that maps or merges: comfy.model_base
                 (whose import pulls in every model family and torchvision; the key map only
                 asks it isinstance questions about other families), by classes nothing is
                 an instance of; comfy.cli_args.args.cpu is set.
    sd-scripts   networks/lora.py create_network_from_weights(for_inference=True) and
                 merge_to, on diffusers' UNet2DConditionModel and transformers'
                 CLIPTextModel (kohya's own SD 1.x classes keep their names); the keys it
                 reads are those its load_weights does not call unexpected (after apply_to,
                 as its training and generation scripts load a file). library/utils.py
                 imports torchvision and cv2 for image code; empty modules stand in.
    LyCORIS      lycoris.kohya create_network_from_weights and merge_to (pip lycoris-lora);
                 where the network's constructor refuses the model, the same function's
                 loop over the file's modules (get_module, make_module, merge_to), and the
                 refusal is reported.

The child builds the base UNet and text encoder from BASE's configs and this script's copy of
their weights, so an environment with transformers 4 reads a base saved by transformers 5, and
compares there: the work folder holds only the base and reference weights (about 10 GB for SD
1.5 in fp32; a temporary folder, removed at the end, unless ``--work`` names one). The
children's messages that mention keys, DoRA or errors are kept in the JSON report, ``--json``.

Without a run, two more checks (either or both), on files of SD 1.5's sizes that this
project's writers write from models on the meta device (random LoRA factors, random 768-wide
word vectors; no weights loaded, a few seconds per client):

    python scripts/check_clients.py --word-files --key-maps \
        --comfyui ~/src/ComfyUI --comfyui-python ~/venvs/comfy/bin/python \
        --sd-scripts ~/src/sd-scripts --sd-scripts-python ~/venvs/kohya/bin/python \
        --lycoris-python ~/venvs/lycoris/bin/python \
        --diffusers-python ~/venvs/diffusers-0.32/bin/python \
        --a1111 ~/src/stable-diffusion-webui --a1111-python ~/venvs/kohya/bin/python \
        --forge ~/src/stable-diffusion-webui-forge --forge-python ~/venvs/kohya/bin/python \
        --hf-guess ~/src/huggingface_guess

--word-files: embeddings.safetensors (save_embeddings) and edlora.safetensors (save_edlora)
of one word and of two ("<Vpotter1>+<Vpotter2>"), each loaded as the client loads a
textual-inversion file; a row says whether it loaded, what the user types in the prompt and
which of the file's vectors the prompt then gets ("<Vpotter1>[0..15]": the 16 rows of an
ED-LoRA word as 16 tokens), or the client's error:

    diffusers    TextualInversionLoaderMixin.load_textual_inversion(path), maybe_convert_prompt
    ComfyUI      comfy/sd1_clip.py SDTokenizer(embedding_directory=...).tokenize_with_weights
                 ("a photo of embedding:<file name>"): load_embed reads the file
    sd-scripts   gen_img.py's `if args.textual_inversion_embeddings:` block of main(), read
                 from the tree and run as it stands (SD 1.x), on the CLIP tokenizer and a
                 one-layer text encoder of SD 1.5's width
    A1111        modules/textual_inversion/textual_inversion.py EmbeddingDatabase
                 (load_textual_inversion_embeddings, find_embedding_at_position); the webui
                 modules it imports are replaced (_a1111_stubs says which and how)
    Forge        backend/text_processing/textual_inversion.py EmbeddingDatabase, as its SD 1.5
                 engine makes it (expected shape 768)
    LyCORIS      has no textual-inversion reader (the row says so after searching its files)

--key-maps: lora.safetensors and lora_kohya.safetensors (save_lora; plain LoRA with LoCon on
to_q, to_k, to_v, to_out.0, conv1, conv2, conv_shortcut, proj_in; and DoRA on the attention
projections, with random base weights for those layers), rank 4, alpha 8 (text encoder 2),
mapped by A1111's and Forge's own code onto SD 1.5's layer names; a row gives the keys matched
to a layer, and for each layer built, the weight the client computes against peft's
(_reference_weight: W + up @ down from lora.safetensors' folded factors; DoRA's m (W + dW) /
|W + dW|), as error and strength above:

    A1111        extensions-builtin/Lora/networks.py assign_network_names_to_compvis_modules
                 (on meta-device layers under SD 1.5's LDM and FrozenCLIPEmbedder names) and
                 load_network; network_lora.py calc_updown per layer (plain files only)
    Forge        its UNet and CLIP classes on the meta device (config by huggingface_guess, as
                 backend/loader.py), its ModelPatcher and CLIP patchers,
                 extensions-builtin/sd_forge_lora/networks.py load_lora_for_models (read from
                 the tree and run as it stands), backend/patcher/lora.py merge_lora_to_weight
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

FILES = {"lora": "lora.safetensors", "kohya": "lora_kohya.safetensors"}
# which files each client is asked to read
CLIENT_FILES = {
    "diffusers": ("lora", "kohya"),
    "comfyui": ("lora", "kohya"),
    "sd-scripts": ("lora", "kohya"),  # the diffusers file: to show what they make of it
    "lycoris": ("lora", "kohya"),
}
KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
MESSAGE_WORDS = ("not loaded", "unexpected", "missing", "dora", "warning", "error", "not found")
MESSAGE_NOISE = ("torchvision", "FutureWarning", "DDPMScheduler")  # the environments' own


# ============================================================ parent: this project's venv


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.child:
        return child_main(args)
    if args.word_files or args.key_maps:
        return check_sd15_files(args)
    # the base and reference weights: about 10 GB for SD 1.5 (fp32), kept only under --work
    work = Path(args.work or tempfile.mkdtemp(prefix="check-clients-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"reference: load_run({args.run}) on {args.base}; work folder {work}", flush=True)
    report = []
    try:
        prepare(Path(args.run), Path(args.base), work)
        for client, python, src in _clients(args):
            for which in CLIENT_FILES[client]:
                path = Path(args.run) / FILES[which]
                if path.is_file():
                    report.append(run_child(client, python, src, work, path))
                    print(_line(report[-1]), flush=True)
    finally:
        _finish(args, work, report)
    return 0


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", nargs="?", help="a finished run folder (or its ema/)")
    parser.add_argument("--base", help="the run's base model, a diffusers folder")
    parser.add_argument("--work", help="keep the base and reference weights in this folder")
    parser.add_argument("--json", help="write the full report here")
    parser.add_argument("--diffusers-python", action="append", default=[],
                        help="an interpreter whose environment has some diffusers version "
                        "(repeat for several; this one's is always measured)")  # fmt: skip
    parser.add_argument("--comfyui", help="a ComfyUI source tree")
    parser.add_argument("--comfyui-python", default=sys.executable)
    parser.add_argument("--sd-scripts", help="a kohya-ss/sd-scripts source tree")
    parser.add_argument("--sd-scripts-python", default=sys.executable)
    parser.add_argument("--lycoris-python", help="an interpreter with lycoris-lora installed")
    parser.add_argument("--word-files", action="store_true",
                        help="no RUN: write SD 1.5-sized word files (embeddings.safetensors, "
                        "edlora.safetensors; one word and two) and load them in every client "
                        "given")  # fmt: skip
    parser.add_argument("--key-maps", action="store_true",
                        help="no RUN: write SD 1.5-sized LoRA files (plain with LoCon, DoRA) and "
                        "map their keys with A1111's and Forge's code")  # fmt: skip
    parser.add_argument("--a1111", help="an AUTOMATIC1111/stable-diffusion-webui source tree")
    parser.add_argument("--a1111-python", default=sys.executable,
                        help="an interpreter with torch, einops, transformers, safetensors")  # fmt: skip
    parser.add_argument("--forge", help="a lllyasviel/stable-diffusion-webui-forge source tree")
    parser.add_argument("--forge-python", default=sys.executable,
                        help="an interpreter with torch, diffusers, transformers, einops, psutil")  # fmt: skip
    parser.add_argument("--hf-guess", help="lllyasviel/huggingface_guess, the source tree Forge "
                        "clones (its launch_utils.py names the commit)")  # fmt: skip
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--src", help=argparse.SUPPRESS)
    parser.add_argument("--file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not (args.child or args.word_files or args.key_maps) and not (args.run and args.base):
        parser.error("give RUN and --base (or --word-files / --key-maps)")
    return args


def _clients(args) -> list[tuple[str, str, str | None]]:
    clients = [("diffusers", sys.executable, None)]
    clients += [("diffusers", python, None) for python in args.diffusers_python]
    if args.comfyui:
        clients.append(("comfyui", args.comfyui_python, args.comfyui))
    if args.sd_scripts:
        clients.append(("sd-scripts", args.sd_scripts_python, args.sd_scripts))
    if args.lycoris_python:
        clients.append(("lycoris", args.lycoris_python, None))
    return clients


def prepare(run: Path, base: Path, work: Path) -> None:
    """Write the base weights and configs the children build their models from, and the
    reference: every LoRA layer's merged weight as load_run computes it, and the kohya name of
    each of those layers (names.json)."""
    import safetensors.torch
    from diffusers import StableDiffusionPipeline
    from peft.tuners.tuners_utils import BaseTunerLayer

    from sai_diffusion.models.family import family_of
    from sai_diffusion.models.inference import load_run

    def fresh():
        return StableDiffusionPipeline.from_pretrained(base, local_files_only=True)

    pipe = fresh()
    if family_of(pipe).name != "sd1":  # ComfyUI's CLIP names and kohya's prefixes are SD 1.x's
        raise SystemExit(f"{base}: SD 1.x base models only (this is {family_of(pipe).label})")
    unet_sd = {k: v.contiguous() for k, v in pipe.unet.state_dict().items()}
    text_sd = {_text_model(k): v.contiguous() for k, v in pipe.text_encoder.state_dict().items()}
    safetensors.torch.save_file(unet_sd, work / "base_unet.safetensors")
    safetensors.torch.save_file(text_sd, work / "base_text_encoder.safetensors")
    for part in ("unet", "text_encoder"):
        (work / part).mkdir(exist_ok=True)
        shutil.copy(base / part / "config.json", work / part / "config.json")
    try:  # ComfyUI reads the base as a checkpoint, for its model detection
        from sai_diffusion.files.ldm import save_single_file

        save_single_file(pipe, work / "base_ldm.safetensors")
    except Exception as e:  # noqa: BLE001 - a layout the writer lacks: ComfyUI is then skipped
        print(f"no LDM checkpoint for ComfyUI: {e}")

    ours = fresh()
    load_run(ours, run, adapter="run")
    merged = {}
    for part in ("unet", "text_encoder"):
        for name, module in getattr(ours, part).named_modules():
            if isinstance(module, BaseTunerLayer) and "run" in module.lora_A:
                module.merge(adapter_names=["run"])
                key = f"{part}.{_text_model(name) if part != 'unet' else name}"
                merged[key] = module.get_base_layer().weight.detach().float().contiguous()
    safetensors.torch.save_file(merged, work / "reference.safetensors")
    names = {KOHYA_PREFIXES[key.split(".", 1)[0]] + key.split(".", 1)[1].replace(".", "_"): key
             for key in merged}  # fmt: skip
    (work / "names.json").write_text(json.dumps(names))


def _text_model(name: str) -> str:
    """transformers 5's flattened CLIPTextModel names as transformers 4 and the files say."""
    return name if name.startswith("text_model.") else "text_model." + name


def run_child(client: str, python: str, src: str | None, work: Path, path: Path) -> dict:
    out = work / f"{client}-{Path(python).parent.parent.name}-{path.stem}"
    command = [python, str(Path(__file__).resolve()), "--child", client, "--work", str(work),
               "--file", str(path), "--json", str(out) + ".json"]  # fmt: skip
    if src:
        command += ["--src", str(Path(src).resolve())]
    env = dict(os.environ, PYTHONPATH="")  # the child imports only its own environment
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=work)
    result = {"client": client, "python": python, "file": str(path), "returncode": done.returncode}
    if Path(str(out) + ".json").is_file():
        result |= json.loads(Path(str(out) + ".json").read_text())
    lines = [line for line in done.stderr.splitlines()
             if any(w in line.lower() for w in MESSAGE_WORDS)
             and not any(w in line for w in MESSAGE_NOISE)]  # fmt: skip
    result["messages"] = lines[:40] + ([f"... {len(lines) - 40} more"] if len(lines) > 40 else [])
    if done.returncode != 0:
        result["error"] = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "?"
    return result


def compare(work: Path, theirs: dict) -> dict:
    """A client's weights (by our layer names or kohya's) against the reference, per part
    (module docstring: the numbers). Runs in the child: nothing large is written."""
    import safetensors
    import torch

    names = json.loads((work / "names.json").read_text())
    theirs = {names.get(k, k): v.detach().float() for k, v in theirs.items()}
    out = {}
    with (
        safetensors.safe_open(work / "reference.safetensors", "pt") as reference,
        safetensors.safe_open(work / "base_unet.safetensors", "pt") as unet,
        safetensors.safe_open(work / "base_text_encoder.safetensors", "pt") as text,
    ):
        layers = list(reference.keys())  # noqa: SIM118 (safe_open has no __iter__)
        out["extra_layers"] = sorted(set(theirs) - set(layers))[:10]
        for part, base in (("unet", unet), ("text_encoder", text)):
            keys = [k for k in layers if k.startswith(part + ".")]
            if not keys:
                continue
            errors, strengths, of_weight, applied = {}, [], [], 0
            for key in keys:
                trained = reference.get_tensor(key)
                original = base.get_tensor(key.split(".", 1)[1] + ".weight").float()
                want = trained - original
                got = theirs.get(key, original) - original
                applied += key in theirs and bool((got != 0).any())
                # a layer training barely moved: its change is the merge's rounding, and the
                # error is measured against fp32's resolution of the weight instead
                scale = torch.maximum(want.norm(), 1e-6 * trained.norm()).clamp_min(1e-30)
                errors[key] = float((got - want).norm() / scale)
                strengths.append(float((got * want).sum() / scale**2))
                of_weight.append(float((got - want).norm() / trained.norm().clamp_min(1e-30)))
            worst = max(errors, key=errors.get)
            out[part] = {"layers": len(keys), "applied": applied, "max_error": errors[worst],
                         "worst_layer": worst, "median_strength": statistics.median(strengths),
                         "max_error_of_weight": max(of_weight)}  # fmt: skip
    return out


def _line(r: dict) -> str:
    head = f"{r['client']:<10} {r.get('version', ''):<22} {Path(r['file']).name:<24}"
    if r.get("error"):
        return f"{head} ERROR {r['error']}"
    parts = []
    for part in ("unet", "text_encoder"):
        if part in r:
            p = r[part]
            parts.append(f"{part}: {p['applied']}/{p['layers']} layers, error {p['max_error']:.1e}"
                         f" (of |W| {p['max_error_of_weight']:.1e}), strength "
                         f"{p['median_strength']:.3f}")  # fmt: skip
    if "keys_read" in r:
        keys = f"keys read {r['keys_read']}/{r['keys_in_file']}"
    else:  # diffusers says nothing per key: the layers it gave a LoRA
        keys = f"{r.get('layers_loaded', '?')} LoRA layers built"
    note = f" [{r['entry_point_error']}]" if r.get("entry_point_error") else ""
    return f"{head} {keys}; " + "; ".join(parts) + note


# ============================================================ child: the client's environment


def child_main(args) -> int:
    if args.child in FILE_CHILDREN:  # --word-files, --key-maps: a list of rows
        rows = FILE_CHILDREN[args.child](Path(args.work), args.src, args)
        Path(args.json).write_text(json.dumps(rows))
        return 0
    work, path = Path(args.work), Path(args.file)
    merge = {"diffusers": _diffusers, "comfyui": _comfyui, "sd-scripts": _sd_scripts,
             "lycoris": _lycoris}[args.child]  # fmt: skip
    import safetensors

    result, weights = merge(work, path, args.src)
    with safetensors.safe_open(path, "pt") as f:
        result["keys_in_file"] = len(f.keys())
    result |= compare(work, weights)
    Path(args.json).write_text(json.dumps(result))
    return 0


def _base_models(work: Path):
    """The base UNet (diffusers) and CLIP text encoder (transformers), with the base weights."""
    import safetensors.torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel.from_config(json.loads((work / "unet/config.json").read_text()))
    unet.load_state_dict(safetensors.torch.load_file(work / "base_unet.safetensors"))
    text = CLIPTextModel(CLIPTextConfig.from_pretrained(work / "text_encoder"))
    weights = safetensors.torch.load_file(work / "base_text_encoder.safetensors")
    if not any(k.startswith("text_model.") for k in text.state_dict()):  # transformers 5
        weights = {k.removeprefix("text_model."): v for k, v in weights.items()}
    missing, unexpected = text.load_state_dict(weights, strict=False)
    if unexpected or [k for k in missing if not k.endswith("position_ids")]:
        raise RuntimeError(f"base text encoder: missing {missing}, unexpected {unexpected}")
    return unet.eval(), text.eval()


def _layer_weights(models: dict) -> dict:
    """{part.module: weight} of every Linear / Conv2d of the given models (text encoders'
    names with text_model.)."""
    import torch

    out = {}
    for part, model in models.items():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
                out[f"{part}.{name if part == 'unet' else _text_model(name)}"] = module.weight
    return out


def _changed(before: dict, after: dict) -> dict:
    return {k: v for k, v in after.items() if not bool((v == before[k]).all())}


def _diffusers(work: Path, path: Path, _src):
    import diffusers
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline
    from peft.tuners.tuners_utils import BaseTunerLayer

    unet, text = _base_models(work)
    before = {k: v.clone() for k, v in _layer_weights({"unet": unet, "text_encoder": text}).items()}
    pipe = StableDiffusionPipeline(vae=AutoencoderKL(), text_encoder=text, tokenizer=None,
                                   unet=unet, scheduler=DDPMScheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)  # fmt: skip
    pipe.load_lora_weights(path.parent, weight_name=path.name, adapter_name="run")
    layers = 0
    with torch.no_grad():
        for model in (unet, text):
            for module in model.modules():
                if isinstance(module, BaseTunerLayer) and "run" in module.lora_A:
                    module.merge(adapter_names=["run"])
                    layers += 1
    after = {}
    for part, model in (("unet", unet), ("text_encoder", text)):
        for name, module in model.named_modules():
            if isinstance(module, BaseTunerLayer):
                key = f"{part}.{name if part == 'unet' else _text_model(name)}"
                after[key] = module.get_base_layer().weight
    return {"version": f"diffusers {diffusers.__version__}", "layers_loaded": layers}, _changed(
        {k: before[k] for k in after}, after
    )


def _stub(name: str, **attributes):
    import types

    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    sys.modules[name] = module
    return module


def _import_comfy(src: str) -> None:
    """ComfyUI's package from ``src``, on the CPU, with comfy.model_base replaced (the module
    docstring says why)."""
    sys.path.insert(0, src)
    import comfy

    class NotThisFamily:  # comfy.model_base's classes, as the key map asks about them
        pass

    def any_family(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return NotThisFamily

    comfy.model_base = _stub("comfy.model_base", __getattr__=any_family)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True


def _comfyui(work: Path, path: Path, src: str):
    import logging

    import safetensors.torch

    _import_comfy(src)
    import comfy.lora
    import comfy.lora_convert
    import comfy.model_detection
    import comfy.utils

    checkpoint = safetensors.torch.load_file(work / "base_ldm.safetensors")
    unet_config = comfy.model_detection.detect_unet_config(checkpoint, "model.diffusion_model.")
    # the state dicts of ComfyUI's model and CLIP objects: diffusion_model.*, clip_l.*
    unet_sd = {"diffusion_model." + k.removeprefix("model.diffusion_model."): v
               for k, v in checkpoint.items() if k.startswith("model.diffusion_model.")}  # fmt: skip
    clip_sd = {"clip_l." + k.removeprefix("cond_stage_model."): v
               for k, v in checkpoint.items() if k.startswith("cond_stage_model.")}  # fmt: skip

    class Model:
        def __init__(self, sd, config=None):
            self.sd, self.model_config = sd, type("ModelConfig", (), {"unet_config": config})

        def state_dict(self):
            return self.sd

    key_map = comfy.lora.model_lora_keys_unet(Model(unet_sd, unet_config), {})
    key_map = comfy.lora.model_lora_keys_clip(Model(clip_sd), key_map)
    lora = comfy.lora_convert.convert_lora(safetensors.torch.load_file(path))

    class Collect(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.records = []

        def emit(self, record):
            self.records.append(record.getMessage())

    collect = Collect()
    logging.getLogger().addHandler(collect)
    patches = comfy.lora.load_lora(lora, key_map)
    logging.getLogger().removeHandler(collect)
    not_loaded = [m.split(": ", 1)[1] for m in collect.records if "lora key not loaded" in m]
    # ComfyUI's own table, inverted: its UNet weight names -> diffusers layer names
    to_diffusers = {"diffusion_model." + ldm: "unet." + d.removesuffix(".weight")
                    for d, ldm in comfy.utils.unet_to_diffusers(unet_config).items()}  # fmt: skip
    weights = {}
    for key, patch in patches.items():
        sd = unet_sd if key.startswith("diffusion_model.") else clip_sd
        weight = sd[key].detach().clone().float()
        weight = comfy.lora.calculate_weight([(1.0, patch, 1.0, None, None)], weight, key)
        if key.startswith("clip_l.transformer."):
            name = "text_encoder." + key.removeprefix("clip_l.transformer.").removesuffix(".weight")
        else:
            name = to_diffusers.get(key, key)
        weights[name] = weight
    return {"version": _comfy_label(src), "keys_read": len(lora) - len(not_loaded),
            "not_loaded": not_loaded[:20], "not_loaded_count": len(not_loaded)}, weights  # fmt: skip


def _comfy_label(src: str) -> str:
    commit = (Path(src) / "COMMIT").read_text().strip() if (Path(src) / "COMMIT").is_file() else ""
    return f"ComfyUI {_comfy_version(src)}" + (f" {commit[:12]}" if commit else "")


def _comfy_version(src: str) -> str:
    text = (Path(src) / "comfyui_version.py").read_text() if src else ""
    return text.rsplit("=", 1)[-1].strip().strip("\"'") if "__version__" in text else "?"


def _no_image_libraries() -> None:
    """kohya's library/utils.py imports torchvision and cv2 for its image code, which the LoRA
    code never calls: empty modules stand in (after transformers has looked for the real
    ones)."""
    import diffusers  # noqa: F401 - both probe for torchvision when imported
    import transformers  # noqa: F401

    torchvision = _stub("torchvision", __path__=[])
    torchvision.transforms = _stub("torchvision.transforms")
    _stub("cv2")


def _kohya_weights_of(modules, before: dict) -> dict:
    """{kohya module name: merged weight} of the given kohya / LyCORIS modules."""
    out = {}
    for lora in modules:
        module = lora.org_module  # LyCORIS keeps it in a list
        weight = (module[0] if isinstance(module, list) else module).weight
        if not bool((weight == before[id(weight)]).all()):
            out[lora.lora_name] = weight
    return out


def _weights_by_id(*models) -> dict:
    """{id(weight): a copy} of every Linear / Conv2d weight (kohya merges in place)."""
    import torch

    return {id(m.weight): m.weight.detach().clone() for model in models for m in model.modules()
            if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)}  # fmt: skip


def _sd_scripts(work: Path, path: Path, src: str):
    import subprocess as sp

    import safetensors.torch
    import torch

    _no_image_libraries()
    sys.path.insert(0, src)
    from networks import lora as kohya_lora

    unet, text = _base_models(work)
    before = _weights_by_id(unet, text)
    sd = safetensors.torch.load_file(path)
    network, sd = kohya_lora.create_network_from_weights(1.0, str(path), None, text, unet,
                                                         weights_sd=sd, for_inference=True)  # fmt: skip
    network.merge_to(text, unet, sd, torch.float32, "cpu")
    weights = _kohya_weights_of(network.text_encoder_loras + network.unet_loras, before)
    commit = sp.run(["git", "-C", src, "rev-parse", "HEAD"], capture_output=True, text=True)
    version = commit.stdout.strip()[:12] or (Path(src) / "COMMIT").read_text().strip()[:12]
    # what kohya reports when it loads the file for training or inference (train_network.py,
    # gen_img.py): apply_to, then load_weights, whose unexpected keys it does not use
    text, unet = _base_models(work)[::-1]
    loader, _ = kohya_lora.create_network_from_weights(1.0, str(path), None, text, unet,
                                                       weights_sd=sd)  # fmt: skip
    loader.apply_to(text, unet)
    info = loader.load_weights(str(path))
    return {"version": f"sd-scripts {version}", "keys_read": len(sd) - len(info.unexpected_keys),
            "unexpected": info.unexpected_keys[:20],
            "unexpected_count": len(info.unexpected_keys),
            "modules_created": len(network.text_encoder_loras + network.unet_loras)}, weights  # fmt: skip


def _lycoris(work: Path, path: Path, _src):
    """lycoris.kohya.create_network_from_weights and merge_to; when the network's constructor
    refuses the model (4.1.3 asserts "duplicated lora name: lora_unet_time_embedding_linear_1"
    on every SD UNet: TimestepEmbedding, a target class since its Anima support, and its
    time_embedding.linear_1 name target make the same module twice), the function's own
    loop instead: get_module and make_module per module of the file, then each module's
    merge_to."""
    from importlib.metadata import version

    import safetensors.torch
    from lycoris.kohya import create_network_from_weights
    from lycoris.modules import get_module, make_module

    unet, text = _base_models(work)
    before = _weights_by_id(unet, text)
    sd = safetensors.torch.load_file(path)
    result = {"version": f"LyCORIS {version('lycoris-lora')}"}
    try:
        network, sd = create_network_from_weights(1.0, str(path), None, text, unet, weights_sd=sd)
        network.merge_to(text, unet, sd, None, "cpu")
        modules = network.text_encoder_loras + network.unet_loras
    except AssertionError as e:
        result["entry_point_error"] = f"create_network_from_weights: {e}"
        targets = {f"lora_unet_{n}".replace(".", "_"): m for n, m in unet.named_modules()}
        targets |= {f"lora_te_{n}".replace(".", "_"): m for n, m in text.named_modules()}
        modules = []
        for name in dict.fromkeys(k.split(".", 1)[0] for k in sd):
            if name in targets:
                module = make_module(*get_module(sd, name), name, targets[name])
                if module is not None:
                    module.multiplier = 1.0
                    module.merge_to(1.0)
                    modules.append(module)
    read = {k for k in sd if k.split(".", 1)[0] in {m.lora_name for m in modules}}
    result |= {"keys_read": len(read), "modules_created": len(modules)}
    return result, _kohya_weights_of(modules, before)


# ============================================================ SD 1.5-sized files (no run)
#
# --word-files and --key-maps need no run and no base weights: this project's writers
# (save_embeddings, save_edlora, save_lora) write files of SD 1.5's sizes from models built on
# the meta device with random LoRA factors and word vectors, and each client reads them with its
# own code in a child process.

WORDS = ("<Vpotter1>", "<Vpotter2>")  # a two-word concept, token "<Vpotter1>+<Vpotter2>"
# the plain file: LoRA and LoCon, as the table's runs; the DoRA file: the attention projections
# (DoRA's magnitudes need base weights, drawn here for the layers it adapts)
LORA_VARIANTS = {
    "plain": ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "conv_shortcut", "proj_in"),
    "dora": ("to_q", "to_k", "to_v", "to_out.0"),
}
RANK, ALPHA, TE_ALPHA = 4, 8.0, 2.0  # alpha != rank, and per part, as the table's runs


def check_sd15_files(args) -> int:
    work = Path(args.work or tempfile.mkdtemp(prefix="check-clients-files-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"SD 1.5-sized files by this project's writers in {work}", flush=True)
    report = []
    try:
        write_sd15_files(work, words=args.word_files, loras=args.key_maps)
        for child, python, src in _file_children(args):
            for row in run_files_child(child, python, src, work, args.hf_guess):
                print(_files_line(row), flush=True)
                report.append(row)
    finally:
        _finish(args, work, report)
    return 0


def _file_children(args) -> list[tuple[str, str, str | None]]:
    children = []
    if args.word_files:
        children.append(("diffusers-words", sys.executable, None))
        children += [("diffusers-words", python, None) for python in args.diffusers_python]
        for child, src, python in (("comfyui-words", args.comfyui, args.comfyui_python),
                                   ("sd-scripts-words", args.sd_scripts, args.sd_scripts_python),
                                   ("a1111-words", args.a1111, args.a1111_python),
                                   ("forge-words", args.forge, args.forge_python)):  # fmt: skip
            if src:
                children.append((child, python, src))
        if args.lycoris_python:
            children.append(("lycoris-words", args.lycoris_python, None))
    if args.key_maps:
        if args.a1111:
            children.append(("a1111-keys", args.a1111_python, args.a1111))
        if args.forge:
            children.append(("forge-keys", args.forge_python, args.forge))
    return children


def write_sd15_files(work: Path, *, words: bool, loras: bool) -> None:
    """The files the children read, by this project's writers, of SD 1.5's sizes:

    words/embeddings-N/embeddings.safetensors   save_embeddings, N = 1, 2 words of WORDS
    words/edlora-N/edlora.safetensors           save_edlora, (16, 768) per word
    lora/plain/, lora/dora/                     save_lora: lora.safetensors, lora_kohya.safetensors
                                                and layers.json (how a child finds each layer)
    sd15_modules.json                           SD 1.5's UNet weights under their LDM names and
                                                the text encoder's, with shapes and layer types
    tokenizer/, text_encoder/                   SD 1.5's tokenizer and text-encoder config
    """
    from sai_diffusion._resources import sd15_config_dir

    config = sd15_config_dir()
    for part in ("tokenizer", "text_encoder"):
        shutil.copytree(config / part, work / part, dirs_exist_ok=True)
    unet, text = _meta_sd15(config)
    _write_modules(work, unet, text)
    if words:
        _write_word_files(work, unet, text)
    if loras:
        for variant, targets in LORA_VARIANTS.items():
            unet, text = _meta_sd15(config)
            _write_lora_files(work / "lora" / variant, unet, text, targets, variant == "dora")


def _meta_sd15(config: Path):
    """SD 1.5's UNet and CLIP text encoder on the meta device (no memory)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config / "unet"))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(config / "text_encoder"))
    return unet, text


def _write_modules(work: Path, unet, text) -> None:
    """sd15_modules.json: {"unet": {LDM name: {shape, kind}}, "text_encoder": {...}}, every
    weight of the models, the UNet's under the checkpoint's names (files.ldm.unet_to_ldm, whose
    dict follows state_dict's order), the kind the type of the layer holding it."""
    from sai_diffusion.files.ldm import UNET_PREFIX, unet_to_ldm

    out = {}
    for part, model in (("unet", unet), ("text_encoder", text)):
        layers = dict(model.named_modules())
        names = list(model.state_dict())
        if part == "unet":
            ldm = [k.removeprefix(UNET_PREFIX) for k in unet_to_ldm(unet)]
        else:
            ldm = [_text_model(k) for k in names]
        state = model.state_dict()
        out[part] = {new: {"shape": list(state[old].shape),
                           "kind": type(layers[old.rsplit(".", 1)[0]]).__name__}
                     for old, new in zip(names, ldm, strict=True)}  # fmt: skip
    (work / "sd15_modules.json").write_text(json.dumps(out))


def _write_word_files(work: Path, unet, text) -> None:
    """words.json lists the variants: {variant, path, words}."""
    import types

    import torch
    from transformers import CLIPTokenizer

    from sai_diffusion.files.lora_files import save_embeddings
    from sai_diffusion.files.mix_of_show import save_edlora
    from sai_diffusion.files.run_dir import EDLORA_FILE, EMBEDDINGS_FILE
    from sai_diffusion.models.edlora import cross_attention_layers

    tokenizer = CLIPTokenizer.from_pretrained(work / "tokenizer")
    tokenizer.add_tokens(list(WORDS))
    width = text.config.hidden_size
    generator = torch.Generator().manual_seed(0)
    rows = torch.nn.Embedding(len(tokenizer), width)
    rows.weight.data = torch.randn(len(tokenizer), width, generator=generator) * 0.02
    encoder = types.SimpleNamespace(get_input_embeddings=lambda: rows)  # what save_embeddings reads
    layers = [name for name, _ in cross_attention_layers(unet)]
    variants = []
    for n in (1, 2):
        words = list(WORDS[:n])
        path = work / "words" / f"embeddings-{n}" / EMBEDDINGS_FILE
        save_embeddings(path, tokenizer=tokenizer, text_encoder=encoder, tokens=words)
        variants.append({"variant": f"embeddings, {n} word{'s' * (n > 1)}", "path": str(path),
                         "words": words})  # fmt: skip
        path = work / "words" / f"edlora-{n}" / EDLORA_FILE
        vectors = {w: torch.randn(len(layers), width, generator=generator) * 0.02 for w in words}
        save_edlora(path, vectors, layers=layers)
        variants.append({"variant": f"edlora, {n} word{'s' * (n > 1)}", "path": str(path),
                         "words": words})  # fmt: skip
    (work / "words.json").write_text(json.dumps(variants))


def _write_lora_files(folder: Path, unet, text, targets, dora: bool) -> None:
    """save_lora's two files of random factors (and, for DoRA, random base weights and
    magnitudes), and layers.json: {the layer's kohya name and its lora.safetensors name (the
    key without .lora.down.weight and the like): {down, up, magnitude: lora.safetensors keys;
    DoRA: seed, std, shape of the base weight, randn(shape, seed) * std}}."""
    import math
    import zlib

    import torch
    from peft.tuners.lora import LoraLayer

    from sai_diffusion.files.lora_files import ADAPTER, diffusers_key, save_lora
    from sai_diffusion.models.lora import add_lora

    add_lora(unet, text, rank=RANK, alpha=ALPHA, text_encoder_alpha=TE_ALPHA,
             unet_targets=targets, use_dora=dora)  # fmt: skip
    layers = {}
    for part, model in (("unet", unet), ("text_encoder", text)):
        for name, module in model.named_modules():
            if not (isinstance(module, LoraLayer) and ADAPTER in module.lora_A):
                continue
            name = name if part == "unet" else _text_model(name)
            kohya = KOHYA_PREFIXES[part] + name.replace(".", "_")
            generator = torch.Generator().manual_seed(zlib.crc32(kohya.encode()))
            for side in (module.lora_A[ADAPTER], module.lora_B[ADAPTER]):
                shape = side.weight.shape
                side.weight = torch.nn.Parameter(torch.randn(shape, generator=generator) * 0.1)
            entry = {k: diffusers_key(part, name, k) for k in ("down", "up")}
            if dora:
                base = module.get_base_layer()
                shape = list(base.weight.shape)
                seed, std = (
                    zlib.crc32(f"{kohya}/base".encode()),
                    1 / math.sqrt(math.prod(shape[1:])),
                )
                weight = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * std
                base.weight = torch.nn.Parameter(weight)
                with torch.no_grad():
                    norm = (weight + module.get_delta_weight(ADAPTER)).flatten(1).norm(dim=1)
                magnitude = module.lora_magnitude_vector[ADAPTER]
                scale = 1 + 0.2 * torch.rand(norm.shape, generator=generator)
                magnitude.weight = torch.nn.Parameter(
                    (norm * scale).reshape(magnitude.weight.shape)
                )
                entry |= {"magnitude": diffusers_key(part, name, "magnitude"), "seed": seed,
                          "std": std, "shape": shape}  # fmt: skip
            layers[kohya] = layers[_diffusers_prefix(entry["down"])] = entry
    save_lora(folder, unet=unet, text_encoder=text, rank=RANK, alpha=ALPHA,
              text_encoder_alpha=TE_ALPHA, metadata={})  # fmt: skip
    (folder / "layers.json").write_text(json.dumps(layers))


def _diffusers_prefix(down_key: str) -> str:
    """A lora.safetensors layer name as key maps know it: its down key less the factor's part."""
    for tail in ("_lora.down.weight", ".lora_linear_layer.down.weight", ".lora.down.weight"):
        if down_key.endswith(tail):
            return down_key[: -len(tail)]
    raise ValueError(down_key)


def run_files_child(child: str, python: str, src: str | None, work: Path, hf_guess) -> list:
    out = work / f"{child}-{Path(python).parent.parent.name}.json"
    command = [python, str(Path(__file__).resolve()), "--child", child, "--work", str(work),
               "--json", str(out)]  # fmt: skip
    if src:
        command += ["--src", str(Path(src).resolve())]
    if hf_guess:
        command += ["--hf-guess", str(Path(hf_guess).resolve())]
    env = dict(os.environ, PYTHONPATH="")  # the child imports only its own environment
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=work)
    if done.returncode == 0 and out.is_file():
        return json.loads(out.read_text())
    last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "?"
    return [{"client": child, "python": python, "error": last}]


def _files_line(r: dict) -> str:
    head = f"{r.get('client', '?'):<16} {r.get('version', ''):<26} {r.get('variant', ''):<34}"
    if r.get("error"):
        return f"{head} ERROR {r['error']}"
    return f"{head} {r['result']}"


# ------------------------------------------------------------ the children of --word-files


def _word_variants(work: Path) -> list[dict]:
    return json.loads((work / "words.json").read_text())


def _labels(path: str, vectors) -> list[str]:
    """Which of our file's vectors each of ``vectors`` (a client's, one per prompt token) is:
    the word, "<word>[i]" for row i of an ED-LoRA word, "?" for none."""
    import safetensors.torch
    import torch

    ours = {}
    for word, rows in safetensors.torch.load_file(path).items():
        for i, row in enumerate(rows.reshape(-1, rows.shape[-1])):
            ours[word if rows.shape[0] == 1 else f"{word}[{i}]"] = row.float()
    out = []
    for vector in vectors:
        vector = torch.as_tensor(vector).float().reshape(-1).cpu()
        found = [k for k, row in ours.items() if row.shape == vector.shape
                 and torch.allclose(row, vector, atol=1e-6)]  # fmt: skip
        out.append(found[0] if found else "?")
    return out


def _summary(labels: list[str]) -> str:
    """ "<Vpotter1>[0..15]" for runs of one word's rows, else the labels."""
    if len(labels) > 3 and all("[" in x for x in labels):
        words = dict.fromkeys(x.split("[")[0] for x in labels)
        rows = [int(x.split("[")[1][:-1]) for x in labels]
        if len(words) == 1 and rows == list(range(len(rows))):
            return f"{next(iter(words))}[0..{len(rows) - 1}]"
    return ", ".join(labels)


def _word_row(client: str, version: str, variant: dict, **result) -> dict:
    """A word-file row: result "loaded: ..." or "not loaded: ..." in words."""
    row = {"client": client, "version": version, "variant": variant["variant"], **result}
    if result.get("labels") is not None:
        vectors = _summary(result["labels"])
        row["result"] = (f"loaded; the prompt {result['prompt']!r} gives "
                         f"{len(result['labels'])} vector(s): {vectors}")  # fmt: skip
        if result.get("message"):
            row["result"] += f" ({result['message']})"
    else:
        row["result"] = f"not loaded: {result.get('message', '?')}"
    return row


def _small_text_encoder(tokenizer, width: int):
    """A one-layer CLIPTextModel of SD 1.5's width and the tokenizer's vocabulary: only its
    input embeddings matter to the loaders."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, num_hidden_layers=1,
                            intermediate_size=8, num_attention_heads=1)  # fmt: skip
    return CLIPTextModel(config)


def _diffusers_words(work: Path, _src, _args) -> list[dict]:
    """diffusers' TextualInversionLoaderMixin.load_textual_inversion(path), the stock call, on
    an object with its attributes (tokenizer, text_encoder; no offloading), then
    maybe_convert_prompt: the vectors are the encoder's rows of the converted prompt's tokens."""
    import diffusers
    import torch
    from diffusers.loaders import TextualInversionLoaderMixin
    from transformers import CLIPTokenizer

    version = f"diffusers {diffusers.__version__}"
    rows = []
    for variant in _word_variants(work):
        tokenizer = CLIPTokenizer.from_pretrained(work / "tokenizer")
        width = json.loads((work / "text_encoder" / "config.json").read_text())["hidden_size"]

        class Pipe(TextualInversionLoaderMixin):
            hf_device_map, components = None, {}

        pipe = Pipe()
        pipe.tokenizer, pipe.text_encoder = tokenizer, _small_text_encoder(tokenizer, width)
        before = len(tokenizer)
        try:
            pipe.load_textual_inversion(variant["path"])
        except Exception as e:  # noqa: BLE001 - the client's refusal is the finding
            rows.append(_word_row("diffusers", version, variant, message=_one_line(e)))
            continue
        prompt = variant["words"][0]  # the token: the file's key
        converted = pipe.maybe_convert_prompt(prompt, tokenizer)
        ids = tokenizer(converted, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            vectors = pipe.text_encoder.get_input_embeddings().weight[ids]
        rows.append(_word_row("diffusers", version, variant, prompt=prompt,
                              labels=_labels(variant["path"], vectors),
                              message=f"{len(tokenizer) - before} token(s) added"))  # fmt: skip
    return rows


def _one_line(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()[0]
    return text if len(text) < 120 else text[:117] + "..."


def _comfyui_words(work: Path, src: str, _args) -> list[dict]:
    """comfy/sd1_clip.py SDTokenizer (SD 1.x's clip_l tokenizer, the embedding folder given)
    .tokenize_with_weights on "a photo of embedding:<file name>": load_embed reads the file;
    the vectors are the tensors it puts among the tokens."""
    import logging

    import torch

    _import_comfy(src)
    import comfy.sd1_clip

    version = _comfy_label(src)
    rows = []
    for variant in _word_variants(work):
        path = Path(variant["path"])
        tokenizer = comfy.sd1_clip.SDTokenizer(embedding_directory=str(path.parent))
        prompt = f"a photo of embedding:{path.stem}"
        records = _collect_logs(logging.WARNING)
        tokens = tokenizer.tokenize_with_weights(prompt)[0]
        logging.getLogger().removeHandler(records)
        vectors = [t for t, *_ in tokens if isinstance(t, torch.Tensor)]
        if not vectors:
            message = "; ".join(records.records) or "no embedding among the tokens"
            rows.append(_word_row("comfyui", version, variant, message=message))
            continue
        rows.append(_word_row("comfyui", version, variant, prompt=prompt,
                              labels=_labels(variant["path"], vectors),
                              message="; ".join(records.records)))  # fmt: skip
    return rows


def _collect_logs(level: int):
    import logging

    class Collect(logging.Handler):
        def __init__(self):
            super().__init__(level)
            self.records = []

        def emit(self, record):
            self.records.append(record.getMessage())

    collect = Collect()
    root = logging.getLogger()
    root.addHandler(collect)
    root.setLevel(min(root.level or logging.WARNING, level))
    return collect


def _code_block(path: Path, function: str, test: str) -> str:
    """The text of the ``if <test>:`` statement in ``function`` of the file at ``path``, as it
    stands there (dedented), for exec: the client's own code, read from its tree at run time."""
    import ast
    import textwrap

    source = path.read_text()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef) and node.name == function:
            for inner in ast.walk(node):
                if isinstance(inner, ast.If) and ast.unparse(inner.test) == test:
                    return textwrap.dedent(ast.get_source_segment(source, inner, padded=True))
    raise LookupError(f"{path}: no `if {test}:` in {function}()")


def _sd_scripts_words(work: Path, src: str, _args) -> list[dict]:
    """gen_img.py's own block for --textual_inversion_embeddings (main(), `if
    args.textual_inversion_embeddings:`, read from the tree and run as it stands) on SD 1.x
    (is_sdxl False), with the CLIP tokenizer, a one-layer text encoder of SD 1.5's width and a
    pipeline object that records add_token_replacement. The prompt word is the file's name;
    the vectors are the encoder's rows of the tokens that word is replaced by."""
    import functools
    import logging
    import subprocess as sp
    import types

    import torch
    from transformers import CLIPTokenizer

    _no_image_libraries()
    sys.path.insert(0, src)
    from library import model_util

    block = _code_block(Path(src) / "gen_img.py", "main", "args.textual_inversion_embeddings")
    commit = sp.run(["git", "-C", src, "rev-parse", "HEAD"], capture_output=True, text=True)
    version = "sd-scripts " + (commit.stdout.strip()[:12] or _commit_file(src))
    width = json.loads((work / "text_encoder" / "config.json").read_text())["hidden_size"]
    rows = []
    for variant in _word_variants(work):
        tokenizer = CLIPTokenizer.from_pretrained(work / "tokenizer")
        encoder = _small_text_encoder(tokenizer, width)
        replacements = {}
        pipe = types.SimpleNamespace(
            add_token_replacement=functools.partial(
                lambda found, _i, token, ids: found.__setitem__(token, ids), replacements
            )
        )
        scope = {"args": types.SimpleNamespace(textual_inversion_embeddings=[variant["path"]]),
                 "model_util": model_util, "torch": torch, "os": os, "is_sdxl": False,
                 "logger": logging.getLogger("gen_img"), "tokenizers": [tokenizer],
                 "text_encoders": [encoder], "pipe": pipe}  # fmt: skip
        try:
            exec(compile(block, str(Path(src) / "gen_img.py"), "exec"), scope)
        except Exception as e:  # noqa: BLE001 - the client's refusal is the finding
            rows.append(_word_row("sd-scripts", version, variant, message=_one_line(e)))
            continue
        word = Path(variant["path"]).stem
        first = tokenizer.convert_tokens_to_ids(word)
        ids = replacements.get(first, [first])
        with torch.no_grad():
            vectors = encoder.get_input_embeddings().weight[ids]
        rows.append(_word_row("sd-scripts", version, variant, prompt=word,
                              labels=_labels(variant["path"], vectors),
                              message=f"--textual_inversion_embeddings {Path(variant['path']).name}"
                              ))  # fmt: skip
    return rows


def _commit_file(src: str) -> str:
    path = Path(src) / "COMMIT"
    return path.read_text().strip()[:12] if path.is_file() else "?"


def _lycoris_words(_work: Path, _src, _args) -> list[dict]:
    """LyCORIS is a library of network modules: it has no textual-inversion reader. The row
    says so when none of its files mentions one (string_to_param, textual inversion)."""
    from importlib.metadata import version

    import lycoris

    root = Path(lycoris.__file__).parent
    hits = [str(p.relative_to(root)) for p in root.rglob("*.py")
            if any(w in p.read_text().lower() for w in ("string_to_param", "textual_inversion",
                                                         "textual inversion"))]  # fmt: skip
    message = (f"no textual-inversion reader in the package (files that mention one: {hits})"
               if hits else "no textual-inversion reader in the package")  # fmt: skip
    return [{"client": "lycoris", "version": f"LyCORIS {version('lycoris-lora')}",
             "variant": "any word file", "result": f"not loaded: {message}"}]  # fmt: skip


def _webui_prompt_vectors(database, tokenize, prompt: str) -> list:
    """The vectors A1111's and Forge's prompt code takes for ``prompt``: their tokenize_line
    walks the prompt's tokens, and where database.find_embedding_at_position finds an
    embedding it puts in its vectors (embedding.vec, all its rows) for the matched tokens."""
    tokens, vectors, i = tokenize([prompt])[0], [], 0
    while i < len(tokens):
        embedding, length = database.find_embedding_at_position(tokens, i)
        if embedding is None:
            i += 1
            continue
        vectors += list(embedding.vec.reshape(-1, embedding.vec.shape[-1]))
        i += length
    return vectors


def _a1111_stubs(src: str, tokenizer=None, width: int = 768):
    """A1111's ``modules`` package from ``src`` with the webui's own modules that the Lora
    extension and textual_inversion.py import replaced: shared (opts, sd_model), devices
    (the CPU), sd_models.read_state_dict (safetensors' load_file: its checkpoint-key renaming
    touches no key of ours), errors (reports kept), hashes (none), and empty modules for the
    training, image and UI code (gradio too). shared.sd_model.cond_stage_model.tokenize is
    A1111's FrozenCLIPEmbedderWithCustomWords.tokenize (the tokenizer, no special tokens) and
    encode_embedding_init_text gives SD 1.5's width, from which A1111 takes the expected
    embedding shape."""
    import types

    import safetensors.torch
    import torch

    package = _stub("modules", __path__=[str(Path(src) / "modules")])
    reports = []
    cpu = torch.device("cpu")

    def tokenize(texts):
        return tokenizer(texts, truncation=False, add_special_tokens=False)["input_ids"]

    cond = types.SimpleNamespace(
        tokenize=tokenize, encode_embedding_init_text=lambda text, n: torch.zeros(n, width)
    )
    stubs = {
        "shared": {"opts": types.SimpleNamespace(textual_inversion_print_at_load=True,
                                                 lora_functional=False),
                   # networks.py lists its LoRA folder when imported: an empty one
                   "cmd_opts": types.SimpleNamespace(lora_dir=tempfile.mkdtemp(),
                                                     lyco_dir_backcompat=tempfile.mkdtemp()),
                   "walk_files": lambda path, allowed_extensions=None: [],
                   "sd_model": types.SimpleNamespace(is_sdxl=False, cond_stage_model=cond)},
        "devices": {"cpu": cpu, "device": cpu, "dtype": torch.float32,
                    "torch_npu_set_device": lambda: None},
        "sd_models": {"read_state_dict": lambda f, **_: safetensors.torch.load_file(f)},
        "errors": {"report": lambda message, exc_info=False: reports.append(
                       message + (f": {_one_line(sys.exc_info()[1])}" if exc_info else "")),
                   "display": lambda e, task: reports.append(f"{task}: {_one_line(e)}")},
        "hashes": {"sha256": lambda *_, **__: None},
    }  # fmt: skip
    for name in ("shared", "devices", "sd_models", "errors", "hashes", "sd_hijack", "images",
                 "sd_samplers", "sd_hijack_checkpoint", "cache", "scripts", "patches",
                 "textual_inversion.dataset", "textual_inversion.learn_schedule",
                 "textual_inversion.logging"):  # fmt: skip
        module = _stub(f"modules.{name}", **stubs.get(name, {}))
        if "." not in name:
            setattr(package, name, module)
    sys.modules["modules.textual_inversion.learn_schedule"].LearnRateScheduler = object
    sys.modules["modules.textual_inversion.logging"].save_settings_to_file = None
    _stub("gradio")
    return sys.modules["modules.shared"], reports


def _a1111_version(src: str) -> str:
    changelog = Path(src) / "CHANGELOG.md"
    head = changelog.read_text().split("\n", 1)[0].lstrip("# ") if changelog.is_file() else "?"
    return f"A1111 {head} {_commit_file(src)}"


def _a1111_words(work: Path, src: str, _args) -> list[dict]:
    """modules/textual_inversion/textual_inversion.py EmbeddingDatabase: add_embedding_dir,
    load_textual_inversion_embeddings(force_reload=True) (its load_from_dir, load_from_file,
    create_embedding_from_data, the expected-shape check, register_embedding), then the prompt
    walk of _webui_prompt_vectors. The prompt word is the file's name."""
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(work / "tokenizer")
    width = json.loads((work / "text_encoder" / "config.json").read_text())["hidden_size"]
    shared, reports = _a1111_stubs(src, tokenizer, width)
    import modules.textual_inversion.textual_inversion as ti

    return _webui_words("a1111", _a1111_version(src), work, reports,
                        lambda: ti.EmbeddingDatabase(),
                        shared.sd_model.cond_stage_model.tokenize,
                        lambda db: db.load_textual_inversion_embeddings(force_reload=True))  # fmt: skip


def _webui_words(client, version, work, reports, new_database, tokenize, load) -> list[dict]:
    import contextlib
    import io

    rows = []
    for variant in _word_variants(work):
        path = Path(variant["path"])
        database = new_database()
        database.add_embedding_dir(str(path.parent))
        printed = io.StringIO()
        reports.clear()
        with contextlib.redirect_stdout(printed):
            load(database)
        said = "; ".join(reports + [x for x in printed.getvalue().splitlines() if x.strip()])
        if path.stem not in database.word_embeddings:
            skipped = path.stem in database.skipped_embeddings
            rows.append(_word_row(client, version, variant,
                                  message=("skipped (shape) " if skipped else "") + said))  # fmt: skip
            continue
        vectors = _webui_prompt_vectors(database, tokenize, f"a photo of {path.stem}")
        rows.append(_word_row(client, version, variant, prompt=path.stem,
                              labels=_labels(variant["path"], vectors), message=said))  # fmt: skip
    return rows


def _forge_imports(src: str, hf_guess: str | None) -> None:
    """Forge's backend from ``src``, on the CPU (its --always-cpu), its huggingface_guess from
    ``hf_guess``. Its vendored gguf imports sentencepiece for GGUF vocabularies (not read
    here): an empty class stands in where the package is missing."""
    import diffusers  # noqa: F401 - before the stand-in, which they would probe
    import transformers  # noqa: F401

    sys.path[:0] = [src, str(Path(src) / "packages_3rdparty")] + ([hf_guess] if hf_guess else [])
    try:
        import sentencepiece  # noqa: F401
    except ImportError:
        _stub("sentencepiece", SentencePieceProcessor=type("SentencePieceProcessor", (), {}))
    argv, sys.argv = sys.argv, [sys.argv[0], "--always-cpu"]
    try:
        import backend.args  # noqa: F401 - parses sys.argv when imported
    finally:
        sys.argv = argv


def _forge_version(src: str) -> str:
    return f"Forge {_commit_file(src)}"


def _forge_words(work: Path, src: str, args) -> list[dict]:
    """backend/text_processing/textual_inversion.py EmbeddingDatabase(tokenizer,
    expected_shape=768), as backend/diffusion_engine/sd15.py's text processing makes it:
    add_embedding_dir, load_textual_inversion_embeddings, then the prompt walk of
    _webui_prompt_vectors (Forge's classic_engine tokenizes without special tokens). The
    prompt word is the file's name."""
    from transformers import CLIPTokenizer

    sys.path.insert(0, src)
    from backend.text_processing import textual_inversion as ti

    tokenizer = CLIPTokenizer.from_pretrained(work / "tokenizer")
    width = json.loads((work / "text_encoder" / "config.json").read_text())["hidden_size"]

    def tokenize(texts):
        return tokenizer(texts, truncation=False, add_special_tokens=False)["input_ids"]

    return _webui_words("forge", _forge_version(src), work, [],
                        lambda: ti.EmbeddingDatabase(tokenizer, expected_shape=width), tokenize,
                        lambda db: db.load_textual_inversion_embeddings())  # fmt: skip


# ------------------------------------------------------------ the children of --key-maps


def _lora_variants(work: Path):
    """(variant, folder, layers.json, lora.safetensors' tensors) of each LoRA variant."""
    import safetensors.torch

    for folder in sorted((work / "lora").iterdir()):
        layers = json.loads((folder / "layers.json").read_text())
        yield folder.name, folder, layers, safetensors.torch.load_file(folder / FILES["lora"])


def _base_weight(entry: dict, shape):
    """The layer's base weight as the writer drew it (DoRA), or zeros (plain LoRA, whose
    change does not depend on it)."""
    import torch

    if "seed" not in entry:
        return torch.zeros(tuple(shape))
    generator = torch.Generator().manual_seed(entry["seed"])
    return torch.randn(entry["shape"], generator=generator) * entry["std"]


def _reference_weight(entry: dict, lora: dict, base):
    """The layer's weight as peft computes it from lora.safetensors (the up factors carry
    alpha / rank): W + up @ down, and for DoRA m * (W + dW) / |W + dW| per output row."""
    down, up = lora[entry["down"]].float(), lora[entry["up"]].float()
    merged = base + (up.flatten(1) @ down.flatten(1)).reshape(base.shape)
    if "magnitude" in entry:
        scale = lora[entry["magnitude"]].float().reshape(-1) / merged.flatten(1).norm(dim=1)
        merged = merged * scale.reshape(-1, *[1] * (base.dim() - 1))
    return merged


class _Errors:
    """Per part: |W_client - W_ours| / |W_ours - W| (error; 1 = the layer left as it was) and
    <W_client - W, W_ours - W> / |W_ours - W|^2 (strength), over the layers compared."""

    def __init__(self):
        self.parts = {}

    def add(self, part: str, got, want, base) -> None:
        change = (want - base).norm().clamp_min(1e-30)
        errors, strengths = self.parts.setdefault(part, ([], []))
        errors.append(float((got - want).norm() / change))
        strengths.append(float(((got - base) * (want - base)).sum() / change**2))

    def text(self) -> str:
        return "; ".join(f"{part}: {len(e)} layers, error {max(e):.1e}, strength "
                         f"{statistics.median(s):.3f}"
                         for part, (e, s) in self.parts.items())  # fmt: skip


def _module_tree(names: dict):
    """An nn.Module tree with a meta-device Linear / Conv2d (or an empty module) at each
    dotted name of ``names`` ({name: {shape, kind}}), so that named_modules() walks SD 1.5's
    layer names as A1111's model has them."""
    import torch

    root = torch.nn.Module()
    for name, info in names.items():
        shape, kind = info["shape"], info["kind"]
        if kind in ("Linear", "LoRACompatibleLinear") and len(shape) == 2:
            layer = torch.nn.Linear(shape[1], shape[0], device="meta")
        elif kind in ("Conv2d", "LoRACompatibleConv") and len(shape) == 4:
            layer = torch.nn.Conv2d(shape[1], shape[0], shape[2], padding=shape[2] // 2,
                                    device="meta")  # fmt: skip
        else:
            layer = torch.nn.Module()
        parent = root
        *path, last = name.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        parent.add_module(last, layer)
    return root


def _weight_names(modules: dict, prefix: str) -> dict:
    """{prefix + layer name: {shape, kind}} of the .weight entries of sd15_modules.json."""
    return {prefix + k.removesuffix(".weight"): v for k, v in modules.items()
            if k.endswith(".weight")}  # fmt: skip


def _a1111_keys(work: Path, src: str, _args) -> list[dict]:
    """extensions-builtin/Lora/networks.py: assign_network_names_to_compvis_modules on SD
    1.5's layer names (LatentDiffusion's model.diffusion_model.* and FrozenCLIPEmbedder's
    transformer.text_model.*, meta-device layers of the right type and shape), then
    load_network on each file: the keys it matches to a layer (the others it logs at debug
    level, "didn't match keys") and, per layer it builds, network_lora's calc_updown against
    peft's weight (_reference_weight). DoRA: keys only (the merge of the tree given decides
    whether it reads dora_scale)."""
    import ast
    import logging
    import types

    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(work / "tokenizer")
    shared, reports = _a1111_stubs(src, tokenizer)
    sys.path.insert(0, str(Path(src) / "extensions-builtin" / "Lora"))
    import networks

    modules = json.loads((work / "sd15_modules.json").read_text())
    model = _module_tree(_weight_names(modules["unet"], "diffusion_model."))
    text = _module_tree(_weight_names(modules["text_encoder"], "transformer."))
    shared.sd_model.cond_stage_model.wrapped = text
    shared.sd_model.model = model
    networks.assign_network_names_to_compvis_modules(shared.sd_model)
    version = _a1111_version(src)
    rows = []
    for variant, folder, layers, lora in _lora_variants(work):
        for which in ("lora", "kohya"):
            path = folder / FILES[which]
            logs = _collect_logs(logging.DEBUG)
            net = networks.load_network(path.stem, types.SimpleNamespace(filename=str(path)))
            logging.getLogger().removeHandler(logs)
            failed = {}
            for message in logs.records:
                if "didn't match keys: " in message:
                    failed = ast.literal_eval(message.split("didn't match keys: ", 1)[1])
            errors = _Errors()
            if variant != "dora":
                for module in net.modules.values():
                    entry = layers[module.network_key.split(".", 1)[0]]
                    base = _base_weight(entry, module.shape)
                    updown, _ = module.calc_updown(base)
                    part = "text_encoder" if module.sd_key.startswith("transformer") else "unet"
                    errors.add(part, base + updown, _reference_weight(entry, lora, base), base)
            keys = len(lora) if which == "lora" else len(_keys(path))
            result = (f"keys matched {keys - len(failed)}/{keys}, layers built "
                      f"{len(net.modules)}")  # fmt: skip
            if failed:
                result += f" (unmatched, e.g. {next(iter(failed))})"
            if errors.parts:
                result += "; " + errors.text()
            rows.append({"client": "a1111", "version": version, "variant": f"{variant} {path.name}",
                         "result": result, "reports": reports[:10]})  # fmt: skip
    return rows


def _keys(path: Path) -> list[str]:
    import safetensors

    with safetensors.safe_open(path, "pt") as f:
        return list(f.keys())  # noqa: SIM118 (safe_open has no __iter__)


def _forge_keys(work: Path, src: str, args) -> list[dict]:
    """Forge's own models on the meta device: its UNet (backend/nn/unet.py
    IntegratedUNet2DConditionModel) from the config huggingface_guess.guess detects on SD 1.5's
    checkpoint names and shapes, its CLIP (backend/nn/clip.py IntegratedCLIP in
    backend/patcher/clip.py CLIP, key clip_l), each in its backend/patcher/base.py ModelPatcher
    (the UNet inside a stand-in for backend/modules/k_model.py KModel: the diffusion_model and
    config the key map reads). Then extensions-builtin/sd_forge_lora/networks.py
    load_lora_for_models (read from the tree and run as it stands: its module imports the
    webui) on each file, which prints what it loaded or skipped, and per patched weight
    backend/patcher/lora.py merge_lora_to_weight against peft's weight (_reference_weight)."""
    import ast
    import contextlib
    import io

    import safetensors.torch
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    _forge_imports(src, args.hf_guess)
    import huggingface_guess
    from backend.nn.clip import IntegratedCLIP
    from backend.nn.unet import IntegratedUNet2DConditionModel
    from backend.patcher import lora as forge_lora
    from backend.patcher.base import ModelPatcher
    from backend.patcher.clip import CLIP

    modules = json.loads((work / "sd15_modules.json").read_text())
    checkpoint = {f"model.diffusion_model.{k}": torch.empty(v["shape"], device="meta")
                  for k, v in modules["unet"].items()}  # fmt: skip
    checkpoint |= {f"cond_stage_model.transformer.{k}": torch.empty(v["shape"], device="meta")
                   for k, v in modules["text_encoder"].items()}  # fmt: skip
    guess = huggingface_guess.guess(checkpoint)
    with torch.device("meta"):
        unet = IntegratedUNet2DConditionModel.from_config(guess.unet_config)
        clip_l = IntegratedCLIP(CLIPTextModel, CLIPTextConfig.from_pretrained(work / "text_encoder"),
                                add_text_projection=True)  # fmt: skip
    unet._internal_dict = guess.unet_config  # as backend/loader.py sets it

    class KModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.diffusion_model, self.config = unet, guess

    cpu = torch.device("cpu")
    model = ModelPatcher(KModel(), load_device=cpu, offload_device=cpu)
    clip = CLIP(model_dict={"clip_l": clip_l}, tokenizer_dict={"clip_l": None})
    source = (Path(src) / "extensions-builtin" / "sd_forge_lora" / "networks.py").read_text()
    function = next(n for n in ast.parse(source).body
                    if isinstance(n, ast.FunctionDef) and n.name == "load_lora_for_models")  # fmt: skip
    scope = {"model_lora_keys_clip": forge_lora.model_lora_keys_clip,
             "model_lora_keys_unet": forge_lora.model_lora_keys_unet,
             "load_lora": forge_lora.load_lora}  # fmt: skip
    exec(compile(ast.Module([function], []), "sd_forge_lora/networks.py", "exec"), scope)
    # the key maps, inverted: Forge's weight name -> the file's layer names that reach it
    names = {}
    for prefix, key in (forge_lora.model_lora_keys_unet(model.model, {})
                        | forge_lora.model_lora_keys_clip(clip.cond_stage_model, {})).items():  # fmt: skip
        names.setdefault(key, []).append(prefix)
    shapes = {k: v.shape for k, v in model.model.state_dict().items()}
    shapes |= {k: v.shape for k, v in clip.cond_stage_model.state_dict().items()}
    version = f"{_forge_version(src)} (huggingface_guess {guess.huggingface_repo})"
    rows = []
    for variant, folder, layers, lora in _lora_variants(work):
        for which in ("lora", "kohya"):
            path = folder / FILES[which]
            sd = safetensors.torch.load_file(path)
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                new_model, new_clip = scope["load_lora_for_models"](model, clip, sd, 1.0, 1.0,
                                                                    filename=path.name)  # fmt: skip
            _, rest = forge_lora.load_lora(sd, forge_lora.model_lora_keys_unet(model.model, {}))
            _, rest = forge_lora.load_lora(rest, forge_lora.model_lora_keys_clip(
                clip.cond_stage_model, {}))  # fmt: skip
            errors, patched = _Errors(), 0
            for part, patcher in (("unet", new_model), ("text_encoder", new_clip.patcher)):
                for patches in patcher.lora_patches.values():
                    for key, patch in patches.items():
                        patched += 1
                        entry = next(layers[n] for n in names[key] if n in layers)
                        base = _base_weight(entry, shapes[key])
                        got = forge_lora.merge_lora_to_weight(patch, base.clone(), key)
                        errors.add(part, got, _reference_weight(entry, lora, base), base)
            said = [x for x in printed.getvalue().splitlines() if x.startswith("[LORA]")]
            result = f"keys matched {len(sd) - len(rest)}/{len(sd)}, weights patched {patched}"
            if rest:
                result += f" (unmatched, e.g. {next(iter(rest))})"
            result += "; " + (errors.text() or "nothing applied") + f" [{' | '.join(said)}]"
            rows.append({"client": "forge", "version": version, "variant": f"{variant} {path.name}",
                         "result": result})  # fmt: skip
    return rows


FILE_CHILDREN = {"diffusers-words": _diffusers_words, "comfyui-words": _comfyui_words,
                 "sd-scripts-words": _sd_scripts_words, "lycoris-words": _lycoris_words,
                 "a1111-words": _a1111_words, "forge-words": _forge_words,
                 "a1111-keys": _a1111_keys, "forge-keys": _forge_keys}  # fmt: skip


def _finish(args, work: Path, report: list) -> None:
    """Remove the scratch folder (unless --work named it) and write --json's report."""
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())

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
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
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
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--src", help=argparse.SUPPRESS)
    parser.add_argument("--file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.child and not (args.run and args.base):
        parser.error("give RUN and --base")
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


def _comfyui(work: Path, path: Path, src: str):
    import logging

    import safetensors.torch

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
    commit = (Path(src) / "COMMIT").read_text().strip() if (Path(src) / "COMMIT").is_file() else ""
    version = _comfy_version(src) + (f" {commit[:12]}" if commit else "")
    return {"version": f"ComfyUI {version}", "keys_read": len(lora) - len(not_loaded),
            "not_loaded": not_loaded[:20], "not_loaded_count": len(not_loaded)}, weights  # fmt: skip


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


if __name__ == "__main__":
    sys.exit(main())

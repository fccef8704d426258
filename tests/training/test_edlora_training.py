"""Mix-of-Show's pipeline on the tiny model: an ED-LoRA run with every Mix-of-Show piece on
(two words, layer-wise embeddings, attention regularisation, resize-crop-pad, caption
shuffling and templates, the norm threshold), its files, its resume after SIGKILL, sampling
it, and its export to Mix-of-Show's checkpoint layout checked against that loader's rules."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import UNet2DConditionModel
from PIL import Image
from safetensors.torch import load_file

from sai_diffusion import cli, config
from sai_diffusion.files.mix_of_show import mix_of_show_params, read_edlora
from sai_diffusion.files.run_dir import RunDir
from sai_diffusion.models import edlora
from sai_diffusion.models.inference import add_run_adapter, load_run
from sai_diffusion.models.tokens import add_concept_tokens, tokenize
from sai_diffusion.training import recipe
from sai_diffusion.training.attention import attention_penalty, word_positions
from tests.helpers import load_pipe, make_concept, run_train
from tests.training.test_reliability import _KILLER

MIX_OF_SHOW = ["--set", "edlora=true", "--set", "train_embeddings=true",
               "--set", "text_encoder_lora=true", "--set", "attn_reg_weight=0.01",
               "--set", "augmentation=resize-crop-pad", "--set", "cache_latents=false",
               "--set", "shuffle_captions=true", "--set", "caption_templates=true",
               "--set", "loss_scale=4", "--set", "weight_decay=0.01", "--set", "noise_offset=0.01",
               "--set", "random_flip=0"]  # fmt: skip
FAST = ["--resolution", "64", "--set", "validation_seeds=[]"]


@pytest.fixture()
def concept(tmp_path: Path) -> Path:
    """Two words (a random vector, then "dog"), Mix-of-Show's folder layout with masks."""
    path = make_concept(tmp_path / "concept", n=3, layout="mix")
    masks = path.parent / "data" / "mask"
    masks.mkdir()
    for i in range(3):
        mask = Image.new("L", (80, 72), 0)
        mask.paste(255, (15 + 5 * i, 10, 60, 62))
        mask.save(masks / f"img{i}.png")
    entry = yaml.safe_load(path.read_text())
    entry.update(token="<Vt1>+<Vt2>", class_word="<rand-0.013>+dog")
    path.write_text(yaml.safe_dump(entry))
    return path


def _args(concept: Path, base: Path, out: Path, *extra: str) -> list[str]:
    return ["--concept", str(concept), "--base-model", str(base), "--output-dir", str(out),
            *FAST, *MIX_OF_SHOW, *extra]  # fmt: skip


def test_an_edlora_run_trains_layer_wise_rows_and_writes_edlora_safetensors(
    concept, tiny_pipeline_dir, tmp_path, capsys
):
    out = tmp_path / "run"
    flags = {"base_model": str(tiny_pipeline_dir), "resolution": 64, "max_steps": 3, "lr": 0.3}
    settings = [s for s in MIX_OF_SHOW if s != "--set"] + ["validation_seeds=[]"]
    cfg, c = config.resolve(str(concept), flags, settings)
    run = recipe.setup(cfg, c, out)
    # SGD-SaI (the default) with trained layer-wise rows: the measured caveat, said once
    said = capsys.readouterr().out
    assert said.count("ED-LoRA's layer-wise word vectors lost the concept") == 1
    assert "--optimizer scaled-adamw" in said and "--set edlora=false" in said
    table_before = run.text_encoder.get_input_embeddings().weight.detach().clone()
    recipe.train(run)
    files = recipe.save_outputs(run)

    assert set(files) == {"lora", "lora_kohya", "edlora"}
    assert not RunDir(out).embeddings.exists()  # a TI reader would take (L, D) as L tokens
    vectors, layers = read_edlora(out)
    pipe = load_pipe(tiny_pipeline_dir)
    assert layers == [n for n, _ in edlora.cross_attention_layers(pipe.unet)]
    width = pipe.text_encoder.config.hidden_size
    assert list(vectors) == ["<Vt1>", "<Vt2>"]
    assert all(v.shape == (len(layers), width) for v in vectors.values())
    # trained: the layers' rows no longer all equal (they start as copies)
    assert not torch.equal(vectors["<Vt2>"], vectors["<Vt2>"][:1].expand_as(vectors["<Vt2>"]))
    # the other rows of the table never change (the wrapper holds the trained rows apart)
    table_after = run.text_encoder.get_input_embeddings().weight.detach()
    trained = set(run.adapters.token_ids)
    others = [i for i in range(table_before.shape[0]) if i not in trained]
    assert torch.equal(table_before[others], table_after[others])


@pytest.mark.parametrize(
    ("optimizer", "settings", "warned"),
    [("sgd-sai", ["edlora=true", "train_embeddings=true"], True),
     ("scaled-adamw", ["edlora=true", "train_embeddings=true"], False),
     ("sgd-sai", ["edlora=true", "train_embeddings=false"], False),  # plain LoRA then
     ("sgd-sai", ["edlora=false", "train_embeddings=true"], False)],
)  # fmt: skip
def test_only_sgd_sai_training_layer_wise_rows_gets_the_caveat(optimizer, settings, warned):
    cfg, _ = config.resolve("demo", {"optimizer": optimizer}, settings)
    assert (recipe.edlora_caveat(cfg) is not None) is warned


def test_the_norm_threshold_stops_the_rows_at_the_step_they_reach_it(
    concept, tiny_pipeline_dir, tmp_path
):
    def train(name: str, steps: int, limit: float) -> dict:
        args = _args(concept, tiny_pipeline_dir, tmp_path / name, "--max-steps", str(steps),
                     "--lr", "1.0", "--set", f"embeddings_max_norm={limit}")  # fmt: skip
        assert cli.train_main(args) == 0
        return read_edlora(tmp_path / name)[0]

    free = [train(f"free{n}", n, 0.0) for n in (1, 2)]  # no limit: the rows after steps 1, 2
    norms = [torch.cat(list(f.values())).norm(dim=-1).mean().item() for f in free]
    assert norms[0] < norms[1], "the rows' mean norm should grow over the first steps"
    stopped = train("stopped", 4, (norms[0] + norms[1]) / 2)  # reached at step 2, not 1
    for word in stopped:
        assert torch.equal(stopped[word], free[1][word])  # kept as they were after step 2
        assert not torch.equal(stopped[word], free[0][word])  # they trained until then
    # while the LoRA went on training
    a = load_file(tmp_path / "stopped" / "lora.safetensors")
    b = load_file(tmp_path / "free2" / "lora.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # three real training processes: ~30 s
def test_an_edlora_run_resumes_bitwise_after_sigkill(concept, tiny_pipeline_dir, tmp_path):
    common = ["--concept", str(concept), "--base-model", str(tiny_pipeline_dir), *FAST,
              *MIX_OF_SHOW, "--max-steps", "5", "--checkpoint-every", "2",
              "--set", "keep_checkpoints=1"]  # fmt: skip
    whole = tmp_path / "whole"
    assert run_train(*common, "--output-dir", str(whole)).returncode == 0
    cut = tmp_path / "cut"
    killed = subprocess.run(
        [sys.executable, "-c", _KILLER, "during", "4", *common, "--output-dir", str(cut)],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = run_train(*common, "--output-dir", str(cut), "--resume", str(cut))
    assert resumed.returncode == 0, resumed.stderr
    for name in ("lora.safetensors", "edlora.safetensors"):
        want, got = load_file(whole / name), load_file(cut / name)
        assert want.keys() == got.keys()
        differ = {k: (want[k] - got[k]).abs().max().item() for k in want
                  if not torch.equal(want[k], got[k])}  # fmt: skip
        assert not differ, (
            f"{name}: {len(differ)} tensors differ, e.g. {next(iter(differ.items()))}"
        )


@pytest.fixture()
def edlora_run(concept, tiny_pipeline_dir, tmp_path) -> Path:
    out = tmp_path / "run"
    assert cli.train_main(_args(concept, tiny_pipeline_dir, out, "--max-steps", "2",
                                "--lr", "0.3")) == 0  # fmt: skip
    return out


def test_sai_sample_on_an_edlora_run_is_deterministic_per_seed(edlora_run, tmp_path):
    def sample(out: Path) -> list[bytes]:
        code = cli.sample_main(["--run", str(edlora_run), "--prompt", "a pencil sketch of {token}",
                                "--seed", "1", "--seed", "2", "--steps", "3", "--out", str(out)])  # fmt: skip
        assert code == 0
        return [(out / f"p00-s{s}.png").read_bytes() for s in (1, 2)]

    first, again = sample(tmp_path / "a"), sample(tmp_path / "b")
    assert first == again and first[0] != first[1]


def _mix_of_show_merge(pipe, params: dict, alpha: float) -> set[str]:
    """Mix-of-Show's merge rules (convert_edlora_to_diffusers.py, read from its code): for each
    base weight, the LoRA name is the weight name with ``<proj>.weight`` replaced by
    ``<proj>.lora_down.weight`` (up: ``lora_up``); W += alpha * up @ down when both exist.
    Returns the LoRA keys it read."""
    rules = {
        "text_encoder": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
        "unet": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_out",
                 "proj_in"],
    }  # fmt: skip
    read = set()
    for part, names in rules.items():
        model = getattr(pipe, part)
        lora = params[part]
        state = model.state_dict()
        for key in state:
            # Mix-of-Show pins transformers 4, whose CLIPTextModel names start "text_model."
            # (transformers 5 dropped the prefix from the state dict)
            name = key if part == "unet" or key.startswith("text_model.") else f"text_model.{key}"
            for proj in names:
                if not name.endswith(f"{proj}.weight"):
                    continue
                down = name.replace(f"{proj}.weight", f"{proj}.lora_down.weight")
                up = down.replace("lora_down", "lora_up")
                if up in lora and down in lora:
                    state[key] += alpha * (lora[up] @ lora[down])
                    read |= {f"{part}:{down}", f"{part}:{up}"}
        model.load_state_dict(state)
    return read


def test_the_mix_of_show_export_holds_exactly_the_keys_their_loader_reads(
    edlora_run, tiny_pipeline_dir, tmp_path
):
    out = tmp_path / "potter.pth"
    assert cli.export_main([str(edlora_run), "--format", "mix-of-show", "--out", str(out)]) == 0
    params = torch.load(out, weights_only=True)["params"]
    assert set(params) == {"new_concept_embedding", "text_encoder", "unet"}

    theirs = load_pipe(tiny_pipeline_dir)
    read = _mix_of_show_merge(theirs, params, alpha=1.0)
    written = {f"{p}:{k}" for p in ("text_encoder", "unet") for k in params[p]}
    assert read == written and written  # every key is read, none is left over

    # the concept words, (L, D) each, as their fusion asserts; loaded their way (one new token
    # per word and layer) the merged model computes what ours does with the run's files
    layers = len(edlora.cross_attention_layers(theirs.unet))
    embeddings = params["new_concept_embedding"]
    assert list(embeddings) == ["<Vt1>", "<Vt2>"]
    assert all(v.shape == (layers, theirs.text_encoder.config.hidden_size)
               for v in embeddings.values())  # fmt: skip
    theirs_words = edlora.apply_layerwise(theirs, embeddings, [n for n, _ in
                                          edlora.cross_attention_layers(theirs.unet)], where="x")  # fmt: skip
    ours = load_pipe(tiny_pipeline_dir)
    ours_words = load_run(ours, edlora_run).layerwise
    prompt = ["a pencil sketch of <Vt1> <Vt2>"]
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = [edlora.encode_layerwise(p.tokenizer, p.text_encoder, prompt, w, device="cpu")
               for p, w in ((theirs, theirs_words), (ours, ours_words))]  # fmt: skip
        torch.testing.assert_close(got[0], got[1], atol=1e-5, rtol=1e-5)
        pred = [p.unet(latents, 300, encoder_hidden_states=got[0]).sample for p in (theirs, ours)]
    torch.testing.assert_close(pred[0], pred[1], atol=1e-5, rtol=1e-5)


def test_a_plain_run_exports_its_vector_repeated_for_every_layer(
    concept, tiny_pipeline_dir, tmp_path
):
    out = tmp_path / "plain"
    args = ["--concept", str(concept), "--base-model", str(tiny_pipeline_dir), "--output-dir",
            str(out), *FAST, "--max-steps", "1"]  # fmt: skip
    assert cli.train_main(args) == 0
    params = mix_of_show_params(out)
    layers = len(edlora.cross_attention_layers(load_pipe(tiny_pipeline_dir).unet))
    for rows in params["new_concept_embedding"].values():
        assert rows.shape[0] == layers and torch.equal(rows, rows[:1].expand_as(rows))


def test_attention_penalty_is_zero_inside_the_mask_and_positive_outside():
    latent = (4, 4)
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., :16, :] = 1  # the subject is the top half
    positions = torch.tensor([[2, 3]])  # two words at token positions 2 and 3

    def records(inside: bool):
        probs = torch.full((1, 2, 16, 6), 1e-3)  # (B, heads, Q = 4 x 4, T = 6)
        top = torch.arange(16) < 8
        probs[:, :, top if inside else ~top, 2:4] = 1.0
        return [(0, probs)]

    inside = attention_penalty(records(True), positions, mask, latent).item()
    outside = attention_penalty(records(False), positions, mask, latent).item()
    assert inside == pytest.approx(2 * 1e-3, rel=1e-5)  # the small leak, normalised by max 1
    assert outside == pytest.approx(2 * 1.0)  # both words, all their mass outside
    # a word missing from a caption is skipped
    assert attention_penalty(records(False), torch.tensor([[2, -1]]), mask, latent).item() == (
        pytest.approx(1.0)
    )


def test_word_positions_find_each_words_first_token():
    ids = torch.tensor([[0, 5, 7, 9, 5], [0, 9, 1, 1, 1]])
    assert word_positions(ids, [5, 9]).tolist() == [[1, 3], [-1, 1]]


def test_edlora_on_a_base_model_without_cross_attention_exits_2(
    concept, tiny_pipeline_dir, tmp_path, capsys
):
    base = tmp_path / "nocross"
    shutil.copytree(tiny_pipeline_dir, base)
    unet_cfg = UNet2DConditionModel.load_config(base / "unet")
    shutil.rmtree(base / "unet")
    unet = UNet2DConditionModel(
        sample_size=unet_cfg["sample_size"], in_channels=4, out_channels=4,
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2D", cross_attention_dim=unet_cfg["cross_attention_dim"],
    )  # fmt: skip
    unet.save_pretrained(base / "unet")
    out = tmp_path / "run"
    code = cli._run(cli.train_main, ["--concept", str(concept), "--base-model", str(base),
                                     "--output-dir", str(out), *FAST, "--set", "edlora=true"])  # fmt: skip
    assert code == 2 and not out.exists()
    assert "edlora=true needs a UNet with cross-attention" in capsys.readouterr().err


def test_captions_and_prompts_read_both_words(concept, tiny_pipeline_dir):
    _, c = config.resolve(str(concept), {}, [])
    assert c.text == "<Vt1> <Vt2>"
    pipe = load_pipe(tiny_pipeline_dir)
    layers = 12  # layer tokens of two digits must not be read as one digit and a rest
    pipe.tokenizer.add_tokens(c.words)
    pipe.text_encoder.resize_token_embeddings(len(pipe.tokenizer))
    edlora.add_layerwise_tokens(pipe.tokenizer, pipe.text_encoder, c.words, layers)
    words = edlora.LayerWords({w: edlora.layer_tokens(w, layers) for w in c.words}, layers)
    bound = words.bind(c.prompts()[1], 11)
    assert bound == "a pencil sketch of <Vt1>@11 <Vt2>@11"
    ids = tokenize(pipe.tokenizer, [bound])[0].tolist()
    want = pipe.tokenizer.convert_tokens_to_ids(["<Vt1>@11", "<Vt2>@11"])
    assert [i for i in ids if i in want] == want  # each one token, in order
    # a word inside another is never rewritten
    nested = edlora.LayerWords({"sks": ["sks@0"], "sksdog": ["sksdog@0"]}, 1)
    assert nested.bind("a sks and a sksdog", 0) == "a sks@0 and a sksdog@0"


def test_a_batch_of_prompts_is_encoded_as_each_alone(tiny_pipeline_dir):
    pipe = load_pipe(tiny_pipeline_dir)
    words_list = ["<Vp1>", "<Vp2>"]
    add_concept_tokens(pipe.tokenizer, pipe.text_encoder, words_list,
                       init_word=["<rand-0.1>", "dog"], generator=torch.Generator().manual_seed(0))  # fmt: skip
    layers = len(edlora.install_processors(pipe.unet, 77))
    edlora.add_layerwise_tokens(pipe.tokenizer, pipe.text_encoder, words_list, layers)
    weight = pipe.text_encoder.get_input_embeddings().weight
    with torch.no_grad():  # make the layers' rows differ
        for i in range(layers):
            weight[pipe.tokenizer.convert_tokens_to_ids(f"<Vp2>@{i}")] += 0.1 * i
    words = edlora.LayerWords({w: edlora.layer_tokens(w, layers) for w in words_list}, layers)
    prompts = ["a photo of <Vp1> <Vp2>", "a pencil sketch of <Vp2> on grass"]
    with torch.no_grad():
        both = edlora.encode_layerwise(pipe.tokenizer, pipe.text_encoder, prompts, words,
                                       device="cpu")  # fmt: skip
        for b, prompt in enumerate(prompts):
            alone = edlora.encode_layerwise(pipe.tokenizer, pipe.text_encoder, [prompt], words,
                                            device="cpu")  # fmt: skip
            torch.testing.assert_close(both[b : b + 1], alone, atol=1e-5, rtol=1e-5)


def test_the_comparer_draws_an_edlora_run_beside_a_plain_one_as_each_alone(
    edlora_run, concept, tiny_pipeline_dir, tmp_path
):
    from sai_diffusion.compare import Comparer, load_run_info
    from sai_diffusion.models.sampling import SampleSettings, generate, sampling_pipeline

    plain = tmp_path / "plain"
    assert cli.train_main(["--concept", str(concept), "--base-model", str(tiny_pipeline_dir),
                           "--output-dir", str(plain), *FAST, "--max-steps", "1"]) == 0  # fmt: skip
    settings = {"steps": 3, "guidance": 5.0, "resolution": 64, "lora_weight": 0.7}
    prompt = "a pencil sketch of {token}"
    both = Comparer([load_run_info(edlora_run), load_run_info(plain)], device="cpu")
    rows = both.generate(prompt, [1], **settings)
    alone = Comparer([load_run_info(plain)], device="cpu").generate(prompt, [1], **settings)
    assert _pixels(rows["plain"][0]) == _pixels(alone["plain"][0])

    pipe = load_pipe(tiny_pipeline_dir)
    load_run(pipe, edlora_run, weight=0.7)
    pipe = sampling_pipeline(pipe)
    image = generate(pipe, "a pencil sketch of <Vt1> <Vt2>", 1,
                     SampleSettings(steps=3, guidance_scale=5.0, height=64, width=64))  # fmt: skip
    assert _pixels(rows["run"][0]) == _pixels(image)


def _pixels(image) -> bytes:
    return image.tobytes()


def test_sai_compare_draws_one_grid_per_lora_weight_and_weight_0_keeps_the_embeddings(
    edlora_run, tiny_pipeline_dir, tmp_path
):
    from sai_diffusion.compare import Comparer, load_run_info

    out = tmp_path / "grid.png"
    code = cli.compare_main([str(edlora_run), "--prompt", "a pencil sketch of {token}",
                             "--seeds", "1", "--steps", "2", "--resolution", "64",
                             "--lora-weight", "0", "0.7", "1.0", "--out", str(out)])  # fmt: skip
    assert code == 0
    report = out.with_suffix(".html").read_text()
    for weight in ("0", "0.7", "1"):
        assert f"a pencil sketch of {{token}} (LoRA weight {weight})" in report
    from sai_diffusion.models.sampling import SampleSettings, generate, sampling_pipeline

    one = Comparer([load_run_info(edlora_run)], device="cpu")
    rows = one.generate("a pencil sketch of {token}", [1], steps=2, resolution=64,
                        lora_weight=0.0)  # fmt: skip
    settings = SampleSettings(steps=2, guidance_scale=7.5, height=64, width=64)

    images = {}
    for layerwise in (True, False):
        pipe = load_pipe(tiny_pipeline_dir)
        if layerwise:
            load_run(pipe, edlora_run, weight=0.0)
        else:  # the words' own rows only: what a loader ignoring edlora.safetensors gives
            pipe.tokenizer.add_tokens(["<Vt1>", "<Vt2>"])
            pipe.text_encoder.resize_token_embeddings(len(pipe.tokenizer))
            add_run_adapter(pipe, edlora_run, "run")
            pipe.set_adapters(["run"], adapter_weights=[0.0])
        images[layerwise] = generate(sampling_pipeline(pipe), "a pencil sketch of <Vt1> <Vt2>",
                                     1, settings)  # fmt: skip
    # weight 0: no LoRA, the layer-wise embeddings still read
    assert _pixels(rows["run"][0]) == _pixels(images[True]) != _pixels(images[False])


def test_the_files_of_an_edlora_run_give_the_model_it_trained(concept, tiny_pipeline_dir, tmp_path):
    """Training encodes captions and reads them per layer exactly as loading the files for
    sampling does: the UNet's prediction from the files equals the live one."""
    out = tmp_path / "run"
    flags = {"base_model": str(tiny_pipeline_dir), "resolution": 64, "max_steps": 2, "lr": 0.3}
    settings = [s for s in MIX_OF_SHOW if s != "--set"] + ["validation_seeds=[]"]
    cfg, c = config.resolve(str(concept), flags, settings)
    run = recipe.setup(cfg, c, out)
    recipe.train(run)
    caption = run.inputs.images.examples[0].caption
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        live = run.unet(latents, 500, run.text([caption])).sample
    recipe.save_outputs(run)
    pipe = load_pipe(tiny_pipeline_dir)
    words = load_run(pipe, out).layerwise
    with torch.no_grad():
        context = edlora.encode_layerwise(pipe.tokenizer, pipe.text_encoder, [caption], words,
                                          device="cpu")  # fmt: skip
        loaded = pipe.unet(latents, 500, context).sample
    torch.testing.assert_close(loaded, live, atol=1e-5, rtol=1e-5)

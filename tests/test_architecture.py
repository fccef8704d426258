"""The layout's rules, checked on the code (docs/dev/architecture.md): imports point down the
layers, the miniature world stays apart, one module names the run-folder files, the optimizer
needs torch alone, ``--help`` loads no model library, and the picture in the docs is the code's.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("architecture", REPO / "scripts" / "architecture.py")
architecture = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(architecture)

LAYER = {part: i for i, parts in enumerate(architecture.LAYERS) for part in parts}

# Every file and folder name of a run folder (the contract README lists).
RUN_FILE_NAMES = re.compile(
    r"lora\.safetensors|lora_kohya\.safetensors|embeddings\.safetensors|run\.yaml|"
    r"metrics\.jsonl|gsnr\.json|eval\.json|trainable\.safetensors|optimizer\.pt|"
    r"lr_scheduler\.pt|scaler\.pt|state\.json|prompts\.txt|(^|/)(samples|checkpoints|"
    r"tensorboard)(/|$)|^step-$"
)


def test_every_part_is_in_a_layer():
    assert set(LAYER) == set(architecture.PARTS)
    unplaced = [m for m in architecture.module_edges() if architecture.part_of(m) is None]
    assert unplaced == [], f"modules outside every part of the architecture: {unplaced}"


def test_imports_point_down_the_layers():
    """A part imports only parts of lower layers (training and compare never each other)."""
    wrong = []
    for source, targets in architecture.module_edges().items():
        a = architecture.part_of(source)
        for target in targets:
            b = architecture.part_of(target)
            if a == b:
                continue
            if LAYER[b] >= LAYER[a]:
                wrong.append(f"{source} -> {target}")
    assert wrong == []


def test_the_miniature_world_is_imported_only_by_entry_points():
    importers = {
        source
        for source, targets in architecture.module_edges().items()
        if architecture.part_of(source) != "miniature"
        and any(architecture.part_of(t) == "miniature" for t in targets)
    }
    assert importers == {"sai_diffusion.cli"}


def _string_constants(path: Path):
    """Every string literal of a module but its docstrings, with its line."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    for node in ast.walk(tree):
        is_text = isinstance(node, ast.Constant) and isinstance(node.value, str)
        if is_text and id(node) not in docstrings:
            yield node.lineno, node.value


def test_only_files_run_dir_spells_the_run_folder_names():
    owner = REPO / "sai_diffusion" / "files" / "run_dir.py"
    spelled = [
        f"{path.relative_to(REPO)}:{line}: {text!r}"
        for path in architecture.source_files()
        if path != owner
        for line, text in _string_constants(path)
        if RUN_FILE_NAMES.search(text)
    ]
    assert spelled == []
    assert sum(bool(RUN_FILE_NAMES.search(t)) for _, t in _string_constants(owner)) >= 14


def test_the_optimizer_package_needs_torch_alone():
    """sai_diffusion.optim is usable on its own: torch and the standard library, peft only for
    the scaled-* optimizers, ninja (optional) only to build the fused CPU update, triton
    (optional) only for the fused CUDA update."""
    allowed = {"torch", *sys.stdlib_module_names}
    own = {"factory.py": {"peft"}, "fused.py": {"ninja"}, "fused_cuda.py": {"triton"}}
    for path in (REPO / "sai_diffusion" / "optim").glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = {node.module.split(".")[0]}
            else:
                continue
            extra = roots - allowed - own.get(path.name, set())
            assert not extra, f"{path.name} imports {extra}"


def test_help_and_bad_settings_load_no_model_library():
    code = (
        "import sys\n"
        "from sai_diffusion import cli\n"
        "for main in (cli.train_main, cli.sample_main, cli.eval_main, cli.compare_main,\n"
        "             cli.app_main):\n"
        "    try:\n"
        "        main(['--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "try:\n"
        "    cli.train_main(['--optimizer', 'adam'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "assert cli._run(cli.train_main, ['--concept', 'demo', '--set', 'max_step=3']) == 2\n"
        "heavy = ('torch', 'accelerate', 'diffusers', 'transformers', 'peft', 'gradio')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    assert "invalid choice: 'adam'" in proc.stderr
    assert "did you mean 'max_steps'" in proc.stderr


def test_the_picture_in_the_docs_is_drawn_from_the_code():
    doc = REPO / "docs" / "dev" / "architecture.md"
    assert architecture.main(["--check", str(doc)]) == 0, (
        "run: python scripts/architecture.py --write docs/dev/architecture.md"
    )

"""compare.labels: how runs are named in the picker and on the grid; no two read the same."""

from __future__ import annotations

from pathlib import Path

from sai_diffusion.compare.labels import BASE_ROW, distinct, group_runs, row_labels, run_labels
from sai_diffusion.files.run_dir import RunInfo


def _info(path: str, *, optimizer="sgd-sai", lr=0.1, base="/m/cm.safetensors", digest="h1"):
    return RunInfo(
        path=Path(path),
        name=Path(path).name,
        concept=Path(path).parent.name,
        token="<Vpotter>",
        optimizer=optimizer,
        lr=lr,
        steps=1750,
        rank=4,
        alpha=1.0,
        base_model=base,
        base_model_hash=digest,
        resolution=512,
        validation_prompts=["a pencil sketch of <Vpotter>"],
        scores=None,
        has_lora=True,
    )


def test_labels_and_groups_for_the_picker():
    """Labels read like the picker's; equal labels get the run key; bases that share a file
    name but not a hash are told apart."""
    index = {
        "potter/a": _info("/r/potter/a"),
        "potter/b": _info("/r/potter/b"),
        "potter/c": _info("/r/potter/c", optimizer="adamw", lr=1e-4),
        "potter/d": _info("/r/potter/d", base="/other/cm.safetensors", digest="h2"),
    }
    labels = run_labels(index)
    assert labels["potter/c"] == "potter · adamw lr=0.0001 · 1750 steps"
    assert labels["potter/a"] == "potter · sgd-sai lr=0.1 · 1750 steps · potter/a"
    groups = group_runs(index)
    assert groups == {
        "potter · on cm.safetensors (h1)": ["potter/a", "potter/b", "potter/c"],
        "potter · on cm.safetensors (h2)": ["potter/d"],
    }


def test_row_labels_name_the_concept_when_mixed_and_the_run_when_equal():
    runs = [_info("/r/potter/a"), _info("/r/potter/b"), _info("/r/hermione/c", lr=1e-2)]
    labels = row_labels(runs[:2], with_base=True)
    assert labels["a"] == "sgd-sai\nlr 0.1\n1750 steps\na"  # equal to b's: the name is added
    assert labels[BASE_ROW] == "base model\n(no LoRA)"
    mixed = row_labels([runs[0], runs[2]])
    assert mixed == {"a": "potter\nsgd-sai\nlr 0.1\n1750 steps",
                     "c": "hermione\nsgd-sai\nlr 0.01\n1750 steps"}  # fmt: skip
    assert distinct({"x": "same", "y": "same", "z": "own"}, " / ") == {
        "x": "same / x", "y": "same / y", "z": "own"}  # fmt: skip


def test_an_edlora_run_says_so_where_it_is_picked_and_drawn():
    plain, layered = _info("/r/potter/a"), _info("/r/potter/b")
    layered.edlora = True
    labels = run_labels({"potter/a": plain, "potter/b": layered})
    assert labels == {"potter/a": "potter · sgd-sai lr=0.1 · 1750 steps",
                      "potter/b": "potter · sgd-sai lr=0.1 · 1750 steps · ED-LoRA"}  # fmt: skip
    assert row_labels([plain, layered]) == {"a": "sgd-sai\nlr 0.1\n1750 steps",
                                            "b": "sgd-sai\nlr 0.1\n1750 steps\nED-LoRA"}  # fmt: skip

"""CLIP BPE tokenizer files (vocab.json, merges.txt) built offline.

SD 1.5 tokenises prompts with OpenAI CLIP's byte-level BPE. Its merge list ships inside the
`clip-anytorch` wheel as ``clip/bpe_simple_vocab_16e6.txt.gz``; from it we rebuild the
exact vocabulary the way CLIP does, so no model hub is needed:

    ids 0..255      the 256 byte symbols (GPT-2's byte-to-unicode table, in its order)
    ids 256..511    the same symbols with the end-of-word marker ``</w>``
    ids 512..       one token per merge, in merge order (CLIP keeps the first 48,894)
    last two ids    ``<|startoftext|>``, ``<|endoftext|>``

giving 49,408 tokens with ``<|startoftext|>`` = 49406 and ``<|endoftext|>`` = 49407, as in
SD 1.5. Keeping only the first N merges gives a small vocabulary whose ids below 512 + N are
the same as SD 1.5's (each merge only joins symbols made by earlier merges), which is what
tiny test models use.

The gzip file is read without importing ``clip`` (its ``__init__`` pulls in torchvision).
When clip-anytorch is not installed, the merges already written into the shipped
``configs/sd15/tokenizer/merges.txt`` are used: they are the same 48,894 lines.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

from .._resources import sd15_config_dir
from ..errors import UserError
from ..fsutil import write_json

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
FULL_NUM_MERGES = 49152 - 256 - 2  # CLIP's vocabulary size target minus bytes and specials
FULL_VOCAB_SIZE = 2 * 256 + FULL_NUM_MERGES + 2  # 49,408
MERGES_HEADER = "#version: 0.2"
MODEL_MAX_LENGTH = 77  # CLIP's context length; SD pads every prompt to it

_GZ_NAME = "bpe_simple_vocab_16e6.txt.gz"
_INSTALL_HINT = "pip install --no-deps clip-anytorch"


def _bytes_to_unicode() -> list[str]:
    """The 256 printable stand-ins for bytes 0..255, in the order CLIP numbers them."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    symbols = [chr(b) for b in printable]
    # Bytes that are whitespace/control characters get code points 256, 257, ... in byte order.
    extra = 0
    for b in range(256):
        if b not in printable:
            symbols.append(chr(256 + extra))
            extra += 1
    return symbols


def clip_bpe_file() -> Path | None:
    """Path of clip-anytorch's ``bpe_simple_vocab_16e6.txt.gz``, or None when not installed."""
    spec = importlib.util.find_spec("clip")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / _GZ_NAME
        if candidate.is_file():
            return candidate
    return None


def _shipped_merges_file() -> Path | None:
    try:
        candidate = sd15_config_dir() / "tokenizer" / "merges.txt"
    except FileNotFoundError:
        return None
    return candidate if candidate.is_file() else None


def load_merges(num_merges: int | None = None, *, source: str | Path | None = None) -> list[str]:
    """The first ``num_merges`` CLIP merges as ``"left right"`` strings (all 48,894 if None).

    ``source`` may be the clip-anytorch ``.txt.gz`` file or a ``merges.txt``; by default the
    one from clip-anytorch, else the shipped SD 1.5 tokenizer's.

    Raises:
        UserError: no source is available (clip-anytorch missing) or ``num_merges`` is out
            of range.
    """
    if num_merges is not None and not 0 <= num_merges <= FULL_NUM_MERGES:
        raise UserError(f"num_merges must be between 0 and {FULL_NUM_MERGES}, got {num_merges}.")
    if source is None:
        source = clip_bpe_file() or _shipped_merges_file()
    if source is None:
        raise UserError(
            "The CLIP BPE vocabulary was not found: it ships in the clip-anytorch package "
            f"(file clip/{_GZ_NAME}). Install it without its dependencies: `{_INSTALL_HINT}`."
        )
    source = Path(source)
    if not source.is_file():
        raise UserError(f"CLIP merges file {source} does not exist.")
    if source.suffix == ".gz":
        with gzip.open(source) as f:
            raw = f.read()
    else:
        raw = source.read_bytes()
    # Both formats open with one header line ("...#version: 0.2"), then one merge per line.
    lines = raw.decode("utf-8").split("\n")[1 : FULL_NUM_MERGES + 1]
    merges = [" ".join(line.split()) for line in lines if line.strip()]
    wanted = FULL_NUM_MERGES if num_merges is None else num_merges
    if len(merges) < wanted:
        raise UserError(
            f"CLIP merges file {source} holds {len(merges)} merges, {wanted} are needed: "
            f"it is truncated or not CLIP's. Reinstall clip-anytorch: `{_INSTALL_HINT}`."
        )
    return merges[:wanted]


def build_vocab(merges: list[str]) -> dict[str, int]:
    """Token -> id for a (prefix of the) CLIP merge list, numbered as CLIP numbers them."""
    symbols = _bytes_to_unicode()
    tokens = symbols + [s + "</w>" for s in symbols]
    tokens += [merge.replace(" ", "") for merge in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("CLIP merge list produced a duplicate token; the merges file is corrupt.")
    return vocab


def write_tokenizer_files(
    out_dir: str | Path,
    *,
    num_merges: int | None = None,
    source: str | Path | None = None,
    model_max_length: int = MODEL_MAX_LENGTH,
) -> Path:
    """Write a ``CLIPTokenizer`` folder (vocab.json, merges.txt, tokenizer_config.json,
    special_tokens_map.json) into ``out_dir`` and return it.

    ``num_merges=None`` gives SD 1.5's full 49,408-token vocabulary; a smaller number gives
    ``514 + num_merges`` tokens. Load it with ``CLIPTokenizer.from_pretrained(out_dir)``.
    """
    merges = load_merges(num_merges, source=source)
    vocab = build_vocab(merges)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    # With no merges the file is the header line alone: tokenizers rejects an empty merge line.
    (out_dir / "merges.txt").write_text(
        "\n".join([MERGES_HEADER, *merges]) + "\n", encoding="utf-8"
    )
    special = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,  # CLIP has no unknown token: every byte is in the vocabulary
        "pad_token": EOS_TOKEN,  # SD 1.5 pads with <|endoftext|>
    }
    tokenizer_config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        **special,
    }
    write_json(out_dir / "tokenizer_config.json", tokenizer_config, sort_keys=True)
    write_json(out_dir / "special_tokens_map.json", special, sort_keys=True)
    return out_dir

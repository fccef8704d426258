"""Writing files so that a crash never leaves half of one: temp name, fsync, rename."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def naming(path: Path):
    """Give an OSError raised inside the file name ``path`` when it has none (a failed write or
    close on an open file names no file; the user must learn which one filled the disk)."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None or exc.errno is None:
            raise
        raise OSError(exc.errno, exc.strerror, str(path)) from None


def umask() -> int:
    """The process's umask, read without changing it where Linux tells it (/proc), else by
    setting and restoring it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: Path):
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename,
    with the mode a plainly created file gets (0666 less the umask: mkstemp's 0600 would hide
    a LoRA from a ComfyUI service running as another user)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with naming(path):
            yield Path(tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~umask())
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(
    path: Path, data: object, *, indent: int | None = 2, sort_keys: bool = False
) -> None:
    """``data`` as JSON with a final newline, written atomically."""
    atomic_write_text(path, json.dumps(data, indent=indent, sort_keys=sort_keys) + "\n")


def atomic_write_with(path: Path, writer: Callable[[Path], None]) -> None:
    """``writer(tmp_path)`` writes the content; ``path`` appears only once it is complete."""
    with atomic_path(path) as tmp:
        writer(tmp)


@contextmanager
def atomic_dir(path: Path):
    """Yield a temporary folder beside ``path``; on success it is renamed to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        for file in tmp.rglob("*"):  # on disk before the rename makes the folder count
            if file.is_file():
                with open(file, "rb") as f:
                    os.fsync(f.fileno())
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp's 0700, as a plain mkdir would make it
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def generated_block_main(
    argv, *, about: str, block: str, begin: str, end: str, command: str
) -> int:
    """The command line of a Markdown block generated from the code (the import graph, the
    settings reference): print it, ``--write FILE`` it between the ``begin`` and ``end`` marks,
    or ``--check FILE`` (exit 1 when stale, saying ``command``); exit 2 without the marks."""
    import argparse
    import sys

    p = argparse.ArgumentParser(description=about)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--write", type=Path, help="replace the block in this Markdown file")
    group.add_argument("--check", type=Path, help="exit 1 if this file's block is stale")
    args = p.parse_args(argv)
    target = args.write or args.check
    if target is None:
        print(block)
        return 0
    text = target.read_text(encoding="utf-8")
    if begin not in text or end not in text:
        print(f"{target}: no {begin} ... {end} block", file=sys.stderr)
        return 2
    start, stop = text.index(begin) + len(begin), text.index(end)
    updated = text[:start] + "\n" + block + "\n" + text[stop:]
    if args.check:
        if updated != text:
            print(f"{target}: the generated block is stale; run: {command} --write {target}",
                  file=sys.stderr)  # fmt: skip
            return 1
        return 0
    atomic_write_text(target, updated)
    print(f"wrote the generated block into {target}")
    return 0

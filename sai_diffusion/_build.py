"""Build hook: ship ``configs/`` inside the wheel as ``sai_diffusion/_configs``.

setuptools runs it while building (pyproject.toml, ``[tool.setuptools.cmdclass]``); the
library never imports it. configs/ sits at the repository root (fixed layout), outside the
package, so setuptools' package data cannot reach it. ``_resources.configs_dir()`` reads the
checkout's folder when there is one and this copy otherwise.
"""

from __future__ import annotations

from pathlib import Path

from setuptools.command.build_py import build_py

_REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


class BuildPyWithConfigs(build_py):
    def run(self) -> None:
        super().run()
        if not (_REPO_CONFIGS / "sd15" / "model_index.json").is_file():
            raise FileNotFoundError(
                f"{_REPO_CONFIGS} is missing: build from a full checkout (or an sdist made "
                "from one, which carries configs/ through MANIFEST.in)."
            )
        self.copy_tree(str(_REPO_CONFIGS), str(Path(self.build_lib) / "sai_diffusion" / "_configs"))

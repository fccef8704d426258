"""Build hook: ship ``configs/`` and ``app/`` inside the wheel as ``sai_diffusion/_configs``
and ``sai_diffusion/_app``.

``configs/`` carries the weight-free config folders single-file checkpoints load with
(``sd15``, ``sd2``, ``sdxl``); a build without one of them fails rather than ship a wheel that
cannot load that family.

setuptools runs it while building (pyproject.toml, ``[tool.setuptools.cmdclass]``); the
library never imports it. Both folders sit at the repository root (fixed layout), outside the
package, so setuptools' package data cannot reach them. ``_resources.configs_dir()`` and
``app_dir()`` read the checkout's folders when there are some and these copies otherwise.
"""

from __future__ import annotations

from pathlib import Path

from setuptools.command.build_py import build_py

_REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
_REPO_APP = Path(__file__).resolve().parents[1] / "app"
_FAMILY_CONFIGS = ("sd15", "sd2", "sdxl")


class BuildPyWithConfigs(build_py):
    def run(self) -> None:
        super().run()
        missing = [
            name
            for name in _FAMILY_CONFIGS
            if not (_REPO_CONFIGS / name / "model_index.json").is_file()
        ]
        if missing:
            raise FileNotFoundError(
                f"{_REPO_CONFIGS} lacks {', '.join(missing)}: build from a full checkout (or an "
                "sdist made from one, which carries configs/ through MANIFEST.in)."
            )
        self.copy_tree(str(_REPO_CONFIGS), str(Path(self.build_lib) / "sai_diffusion" / "_configs"))
        if not (_REPO_APP / "app.py").is_file():
            raise FileNotFoundError(f"{_REPO_APP}/app.py is missing: build from a full checkout.")
        app = Path(self.build_lib) / "sai_diffusion" / "_app"
        self.mkpath(str(app))
        for source in sorted(_REPO_APP.glob("*.py")):  # no __pycache__
            self.copy_file(str(source), str(app / source.name))

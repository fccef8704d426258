"""Where the files shipped beside the code (``configs/``, ``app/``) are, in a checkout or a
wheel.

Both sit at the repository root, beside ``sai_diffusion/``. A source checkout or an editable
install (``pip install -e .``) reads them there. A built wheel carries copies inside the
package as ``sai_diffusion/_configs`` and ``sai_diffusion/_app`` (``_build.py`` copies them),
so an installed copy finds them without the repository.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def configs_dir() -> Path:
    """The ``configs/`` folder: the checkout's if present, else the wheel's packaged copy.

    Raises:
        FileNotFoundError: neither exists (a broken install).
    """
    for candidate in (_PACKAGE_DIR.parent / "configs", _PACKAGE_DIR / "_configs"):
        if (candidate / "sd15" / "model_index.json").is_file():
            return candidate
    raise FileNotFoundError(
        f"sai-diffusion's configs/ folder was not found beside {_PACKAGE_DIR} nor inside it; "
        "reinstall the package."
    )


def sd15_config_dir() -> Path:
    """The weight-free SD 1.5 diffusers config folder for SD 1.x single-file checkpoints."""
    return configs_dir() / "sd15"


def sd2_config_dir() -> Path:
    """The weight-free SD 2.1 (768-v) diffusers config folder for SD 2.x single files."""
    return configs_dir() / "sd2"


def sdxl_config_dir() -> Path:
    """The weight-free SDXL base 1.0 diffusers config folder for SDXL single files."""
    return configs_dir() / "sdxl"


def miniature_dir() -> Path:
    """The shipped miniature model folder, ``configs/miniature``: the base model named
    ``miniature`` (may not exist in a checkout that has not run ``scripts/pretrain_world.py``)."""
    return configs_dir() / "miniature"


def app_dir() -> Path:
    """The Gradio app's folder (``app/``): the checkout's if present, else the wheel's copy.

    Raises:
        FileNotFoundError: neither exists (a broken install).
    """
    for candidate in (_PACKAGE_DIR.parent / "app", _PACKAGE_DIR / "_app"):
        if (candidate / "app.py").is_file():
            return candidate
    raise FileNotFoundError(
        f"sai-diffusion's app/ folder was not found beside {_PACKAGE_DIR} nor inside it; "
        "reinstall the package."
    )

"""Where the project keeps its data, models and run outputs.

Every location can be moved with an environment variable, so tests and CI can point
them at temporary directories; the defaults sit inside the repository (git-ignored).
"""

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def data_dir() -> Path:
    """The DVC-tracked data folder (ITERABRE_DATA_DIR, default <repo>/data)."""
    return Path(os.environ.get("ITERABRE_DATA_DIR", REPO_ROOT / "data"))


def models_dir() -> Path:
    """Where pulled embedded models live (ITERABRE_MODELS_DIR, default <repo>/models)."""
    return Path(os.environ.get("ITERABRE_MODELS_DIR", REPO_ROOT / "models"))

"""Where the project keeps its data, models and run outputs, and checks of user-given folders.

Every location can be moved with an environment variable, so tests and CI can point
them at temporary directories; the defaults sit inside the repository (git-ignored).
"""

import os
from pathlib import Path

from iterabre.errors import IterabreError

REPO_ROOT = Path(__file__).resolve().parents[1]
SOURCE_FILE = "iterabre_source.json"  # provenance of a model folder iterabre made (pulled or prepared)


def data_dir() -> Path:
    """The DVC-tracked data folder (ITERABRE_DATA_DIR, default <repo>/data)."""
    return Path(os.environ.get("ITERABRE_DATA_DIR", REPO_ROOT / "data"))


def models_dir() -> Path:
    """Where pulled embedded models live (ITERABRE_MODELS_DIR, default <repo>/models)."""
    return Path(os.environ.get("ITERABRE_MODELS_DIR", REPO_ROOT / "models"))


def require_dir_or_absent(path: str | os.PathLike, what: str, fix: str) -> Path:
    """`path` as a Path when it is a folder or can become one; else one line naming the file in the way.

    Output folders are created late (after minutes of compute), so a file sitting where the folder
    or one of its parents should go is refused before the work starts.
    """
    path = Path(path).expanduser()
    for candidate in (path, *path.parents):
        if candidate.exists():
            if not candidate.is_dir():
                where = "is an existing file" if candidate == path else f"lies under the file {candidate}"
                raise IterabreError(f"{what} {path} {where}, not a folder.", fix)
            break
    return path

"""Dataset loaders for iterabre's lm-eval tasks: read the project's parquet files, no hub.

lm-eval calls `custom_dataset(**metadata, **dataset_kwargs)`; the metadata may carry a
`data_dir` (set by `iterabre.evaluation.evaluate`), otherwise `iterabre.paths.data_dir()`
decides. Datasets are built in memory, so nothing is written to the HF datasets cache.
The path helpers are shared with the harness, which checks files before loading a model.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from iterabre.errors import IterabreError
from iterabre.paths import data_dir as default_data_dir


def _root(data_dir: str | Path | None) -> Path:
    """The data folder to read: the explicit one, else ITERABRE_DATA_DIR / <repo>/data."""
    return Path(data_dir) if data_dir else default_data_dir()


def wikitext_path(data_dir=None) -> Path:
    """Parquet file of the WikiText-2 test articles."""
    return _root(data_dir) / "wikitext-2" / "test.parquet"


def blimp_path(phenomenon: str, data_dir=None) -> Path:
    """Parquet file of one BLiMP phenomenon."""
    return _root(data_dir) / "blimp" / f"{phenomenon}.parquet"


def xcopa_path(lang: str, data_dir=None) -> Path:
    """Parquet file of one XCOPA language's test split."""
    return _root(data_dir) / "xcopa" / lang / "test.parquet"


def task_data_path(task: str, data_dir=None) -> Path:
    """The file a leaf task (wikitext, blimp_<phenomenon>, xcopa_<lang>) reads."""
    if task == "wikitext":
        return wikitext_path(data_dir)
    family, _, name = task.partition("_")
    if family == "blimp":
        return blimp_path(name, data_dir)
    if family == "xcopa":
        return xcopa_path(name, data_dir)
    raise IterabreError(f"{task!r} is not a local iterabre task.", "use wikitext, blimp_* or xcopa_*")


def require(path: Path) -> Path:
    """Return `path`, or explain that the DVC data folder has not been restored."""
    if not path.is_file():
        raise IterabreError(f"evaluation data file {path} is missing.",
                            "run `dvc pull` in the repository (or point ITERABRE_DATA_DIR at the data)")
    return path


def _dataset(path: Path, rename: dict[str, str] | None = None):
    """An in-memory `datasets.DatasetDict` with one `test` split read from a parquet file."""
    import datasets
    import pyarrow.parquet as pq

    table = pq.read_table(require(path))
    if rename:
        table = table.rename_columns([rename.get(c, c) for c in table.column_names])
    # Name the dataset by file identity: datasets would otherwise hash every row (~50 ms a file).
    stat = path.stat()
    fingerprint = hashlib.md5(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    dataset = datasets.Dataset(datasets.table.InMemoryTable(table), fingerprint=fingerprint)
    return datasets.DatasetDict({"test": dataset})


def load_wikitext(data_dir=None, **_):
    """WikiText-2 test articles; the text column is renamed `page` as lm-eval's functions expect."""
    return _dataset(wikitext_path(data_dir), rename={"text": "page"})


def load_blimp(phenomenon: str, data_dir=None, **_):
    """The 1,000 minimal pairs of one BLiMP phenomenon."""
    return _dataset(blimp_path(phenomenon, data_dir))


def load_xcopa(lang: str, data_dir=None, **_):
    """The 500 XCOPA test items of one language."""
    return _dataset(xcopa_path(lang, data_dir))


def empty_context(doc) -> str:
    """No prompt: BLiMP sentences and WikiText articles are scored on their own."""
    return ""


def blimp_choices(doc) -> list[str]:
    """[grammatical, ungrammatical]; the target is index 0."""
    return [doc["sentence_good"], doc["sentence_bad"]]

"""Text data: import the raw corpora into a compact DVC-tracked folder, then cut token windows.

`data/` holds parquet files (wikitext-2 documents, BLiMP pairs, XCOPA items) that DVC
versions; `import_data` builds it from the raw files once, `load_documents` reads it, and
`token_windows` + `split_windows` turn documents into disjoint calibration / recovery /
held-out batches of fixed-length token windows.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from iterabre.files import atomic_dir
from iterabre.errors import IterabreError
from iterabre.paths import REPO_ROOT, data_dir, require_dir_or_absent

if TYPE_CHECKING:  # torch is imported lazily so `iterabre data version` starts fast
    import torch

WIKITEXT_SPLITS = ("valid", "test")
BLIMP_COLUMNS = ("sentence_good", "sentence_bad", "UID", "pairID", "field", "linguistics_term")
XCOPA_COLUMNS = ("premise", "choice1", "choice2", "question", "label", "idx")
XCOPA_SPLITS = {"test": "test", "val": "validation"}  # raw file prefix -> split name

DATA_README = """\
# data/

Compact, DVC-tracked copies of the corpora iterabre uses. Restore with `dvc pull`
(the remote is the `dvc-store/` folder committed in this repository); rebuild from the
raw files with `iterabre data import --source ../shared/data`.

| folder | content | source | licence |
| --- | --- | --- | --- |
| `wikitext-2/{valid,test}.parquet` | one row per article (`text`, raw, split on ` = Title = ` headings like lm-eval's `wikitext` task) | WikiText-2 raw, Merity et al. 2016, "Pointer Sentinel Mixture Models" | CC BY-SA 3.0 |
| `blimp/<phenomenon>.parquet` | 67 files of 1,000 minimal pairs (`sentence_good`, `sentence_bad`, `UID`, `pairID`, `field`, `linguistics_term`) | BLiMP, Warstadt et al. 2020, TACL | CC BY 4.0 |
| `xcopa/<lang>/{test,validation}.parquet` | 11 languages (`premise`, `choice1`, `choice2`, `question`, `label`, `idx`) | XCOPA, Ponti et al. 2020, EMNLP | CC BY 4.0 (`xcopa/LICENSE.md`) |

Calibration and recovery text comes from wikitext-2 `valid`; evaluation uses `test`.
"""


# ---------------------------------------------------------------- import (raw -> parquet)

def split_wikitext_documents(raw: str) -> list[str]:
    """Cut raw wikitext into articles at level-1 headings (` = Title = `), keeping raw text."""
    docs, current = [], []
    for line in raw.split("\n"):
        if _is_title(line) and any(x.strip() for x in current):
            docs.append("\n".join(current))
            current = []
        current.append(line)
    if any(x.strip() for x in current):
        docs.append("\n".join(current))
    return docs


def _is_title(line: str) -> bool:
    """True for ` = Title = ` but not for sub-headings like ` = = Section = = `."""
    s = line.strip()
    return s.startswith("= ") and s.endswith(" =") and not s.startswith("= =")


def _write_parquet(rows: dict[str, list], path: Path) -> None:
    """Write columns to parquet deterministically (same input -> same bytes, so DVC md5 is stable)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table(rows)
    # No pandas metadata, fixed codec, no statistics timestamps: parquet has no wall-clock field.
    pq.write_table(table, path, compression="zstd", compression_level=9, write_statistics=False,
                   store_schema=False)


def _read_jsonl(path: Path) -> list[dict]:
    """Read a JSON-lines file into a list of dicts."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _columns(records: list[dict], names: tuple[str, ...], source: Path) -> dict[str, list]:
    """Pick `names` from each record as columns; a missing key is a malformed source file."""
    try:
        return {name: [r[name] for r in records] for name in names}
    except KeyError as e:
        raise IterabreError(f"{source} lacks the field {e} expected in this corpus.",
                            "point --source at the original shared/data folder") from None


def _import_wikitext(src: Path, dst: Path) -> None:
    """wikitext-2/{split}.txt -> wikitext-2/{split}.parquet (one row per article)."""
    for split in WIKITEXT_SPLITS:
        raw = (src / "wikitext-2" / f"{split}.txt").read_text(encoding="utf-8")
        _write_parquet({"text": split_wikitext_documents(raw)}, dst / "wikitext-2" / f"{split}.parquet")


def _import_blimp(src: Path, dst: Path) -> None:
    """blimp/<phenomenon>.jsonl -> blimp/<phenomenon>.parquet."""
    for path in sorted((src / "blimp").glob("*.jsonl")):
        rows = _columns(_read_jsonl(path), BLIMP_COLUMNS, path)
        _write_parquet(rows, dst / "blimp" / f"{path.stem}.parquet")


def _import_xcopa(src: Path, dst: Path) -> None:
    """xcopa/data/<lang>/{test,val}.<lang>.jsonl -> xcopa/<lang>/{test,validation}.parquet."""
    for lang_dir in sorted(p for p in (src / "xcopa" / "data").iterdir() if p.is_dir()):
        for prefix, split in XCOPA_SPLITS.items():
            path = lang_dir / f"{prefix}.{lang_dir.name}.jsonl"
            rows = _columns(_read_jsonl(path), XCOPA_COLUMNS, path)
            _write_parquet(rows, dst / "xcopa" / lang_dir.name / f"{split}.parquet")
    shutil.copyfile(src / "xcopa" / "LICENSE.md", dst / "xcopa" / "LICENSE.md")


def _check_source(src: Path) -> None:
    """Fail early, naming what is missing, before anything is written."""
    fix = "pass --source pointing at the raw shared/data folder (wikitext-2/, blimp/, xcopa/), or run `dvc pull`"
    if not src.is_dir():
        raise IterabreError(f"data source {src} {'is a file, not a folder' if src.exists() else 'does not exist'}.",
                            fix)
    needed = ["wikitext-2/valid.txt", "wikitext-2/test.txt", "blimp/", "xcopa/data/", "xcopa/LICENSE.md"]
    missing = [name for name in needed if not (src / name).exists()]
    if missing:
        raise IterabreError(f"data source {src} is incomplete (missing {', '.join(missing)}).", fix)


def _check_dest(dst: Path) -> None:
    """The destination is replaced as a whole: refuse a file, or a folder that is not an earlier import."""
    fix = "pass --dest a new folder or an earlier import (the repository's data/)"
    require_dir_or_absent(dst, "data destination", fix)
    if dst.is_dir() and any(dst.iterdir()) and not (dst / "wikitext-2").is_dir():
        raise IterabreError(f"data destination {dst} is a folder with other content (no wikitext-2/ from an "
                            "earlier import); importing would replace all of it.", fix)


def import_data(source: str | os.PathLike, dest: str | os.PathLike | None = None) -> Path:
    """Convert the raw corpora in `source` into parquet files in `dest` (atomic: temp dir + rename)."""
    src, dst = Path(source).expanduser().resolve(), Path(dest).expanduser() if dest else data_dir()
    _check_source(src)
    _check_dest(dst)
    with atomic_dir(dst) as tmp:
        _import_wikitext(src, tmp)
        _import_blimp(src, tmp)
        _import_xcopa(src, tmp)
        (tmp / "README.md").write_text(DATA_README, encoding="utf-8")
    return dst


# ---------------------------------------------------------------- reading

def _require(path: Path) -> Path:
    """Return `path`, or explain that the DVC data has not been pulled."""
    if not path.exists():
        raise IterabreError(f"{path} is missing: the data folder has not been restored.",
                            "run `dvc pull` in the repository (or `make setup`)")
    return path


def load_documents(dataset: str = "wikitext", split: str = "valid") -> list[str]:
    """Raw documents of a text corpus (only wikitext-2 articles so far), in file order."""
    import pyarrow.parquet as pq

    if dataset not in ("wikitext", "wikitext-2"):
        raise IterabreError(f"unknown text dataset {dataset!r}.", "use dataset='wikitext'")
    if split not in WIKITEXT_SPLITS:
        raise IterabreError(f"unknown wikitext split {split!r}.", f"use one of {', '.join(WIKITEXT_SPLITS)}")
    path = _require(data_dir() / "wikitext-2" / f"{split}.parquet")
    return pq.read_table(path, columns=["text"]).column("text").to_pylist()


# ---------------------------------------------------------------- token windows

def token_windows(tokenizer, documents: list[str], seq_len: int) -> torch.Tensor:
    """Documents joined with blank lines, tokenized once, cut into LongTensor[W, seq_len]."""
    import torch

    if seq_len < 2:
        raise IterabreError(f"seq_len={seq_len} is too short for next-token training.", "use seq_len >= 2")
    # No BOS/EOS: windows are slices of one stream, so specials would sit at arbitrary spots.
    ids = tokenizer("\n\n".join(documents), add_special_tokens=False)["input_ids"]
    n = len(ids) // seq_len  # the ragged tail is dropped so every window is full
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def split_windows(windows: torch.Tensor, n_calib: int, n_recovery: int, n_heldout: int,
                  seed: int = 0) -> dict[str, torch.Tensor]:
    """Disjoint random subsets {calib, recovery, heldout} of the windows (rows of one permutation).

    The slices are taken in the order calibration, held-out, recovery, so for a given seed the
    calibration and held-out text do not depend on the recovery budget: held-out numbers of jobs
    with different budgets or schedules are measured on the same text and can be compared.
    """
    import torch

    sizes = {"calib": n_calib, "heldout": n_heldout, "recovery": n_recovery}
    if min(sizes.values()) < 0:
        raise IterabreError(f"window counts must be >= 0, got {sizes}.", "pass non-negative counts")
    need, have = sum(sizes.values()), windows.shape[0]
    if need > have:
        raise IterabreError(
            f"asked for {need} windows ({n_calib} calibration + {n_recovery} recovery + {n_heldout} "
            f"held-out) but the corpus gives only {have} at this sequence length.",
            "lower --calibration-tokens/--recovery-tokens or --seq-len")
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(have, generator=gen)  # one permutation -> slices are disjoint
    out, start = {}, 0
    for name, size in sizes.items():
        out[name] = windows[order[start:start + size]]
        start += size
    return out


# ---------------------------------------------------------------- version

def _dvc_file() -> Path:
    """The `data.dvc` file that pins the data folder's content hash."""
    return Path(os.environ.get("ITERABRE_DATA_DVC", REPO_ROOT / "data.dvc"))


def data_version(check_dirty: bool = True) -> dict:
    """{"md5": pinned hash of data/ from data.dvc, "dirty": whether data/ differs from it}."""
    import yaml

    dvc_file = _dvc_file()
    if not dvc_file.exists():
        raise IterabreError(f"{dvc_file} is missing, so the data version is unknown.",
                            "run from a clone of the iterabre repository")
    outs = yaml.safe_load(dvc_file.read_text())["outs"][0]
    _require(dvc_file.parent / outs["path"])
    dirty = _is_dirty(dvc_file) if check_dirty else False
    return {"md5": outs["md5"].removesuffix(".dir"), "dirty": dirty}


def _is_dirty(dvc_file: Path) -> bool:
    """Whether the data folder's content differs from the hash its .dvc file pins.

    DVC computes the directory hash itself (and remembers file hashes by mtime in .dvc/tmp),
    so nothing is re-implemented here. `dvc status` is not used: without a local cache it
    answers "not in cache" even for a modified folder.
    """
    from dvc.repo import Repo

    with Repo(Repo.find_root(str(dvc_file.parent))) as repo:
        (stage,) = repo.stage.collect(str(dvc_file))
        return any(out.get_hash().value != out.hash_info.value for out in stage.outs)

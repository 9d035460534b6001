"""Data import, document splitting, token windows, window splits and the DVC data version."""

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from iterabre import data as data_mod
from iterabre.data import (data_version, import_data, load_documents, split_wikitext_documents, split_windows,
                           token_windows)
from iterabre.errors import IterabreError
from iterabre.paths import REPO_ROOT

RAW = " \n = First = \n \n Alpha text . \n \n = = Sub = = \n \n More alpha . \n \n = Second = \n \n Beta . \n"


def _fake_source(root: Path) -> Path:
    """A miniature shared/data tree: 2 wikitext splits, 2 BLiMP files, 1 XCOPA language."""
    (root / "wikitext-2").mkdir(parents=True)
    for split in ("valid", "test"):
        (root / "wikitext-2" / f"{split}.txt").write_text(RAW)
    (root / "blimp").mkdir()
    for uid in ("passive_1", "adjunct_island"):
        row = {"sentence_good": "A cat sat.", "sentence_bad": "A cat sitted.", "field": "syntax",
               "linguistics_term": "x", "UID": uid, "pairID": "0", "simple_LM_method": True}
        (root / "blimp" / f"{uid}.jsonl").write_text(json.dumps(row) + "\n")
    lang = root / "xcopa" / "data" / "et"
    lang.mkdir(parents=True)
    item = {"premise": "P.", "choice1": "A.", "choice2": "B.", "question": "cause", "label": 1, "idx": 0}
    for prefix in ("test", "val"):
        (lang / f"{prefix}.et.jsonl").write_text(json.dumps(item) + "\n")
    (root / "xcopa" / "LICENSE.md").write_text("CC BY 4.0\n")
    return root


def test_split_wikitext_documents_on_level1_headings_only():
    docs = split_wikitext_documents(RAW)
    assert len(docs) == 2
    assert docs[0].startswith(" \n = First = ") and "= = Sub = =" in docs[0]
    assert docs[1].startswith(" = Second = ")
    assert "\n".join(docs) == RAW  # raw text is kept, nothing dropped or added


def test_import_data_layout_and_byte_determinism(tmp_path):
    src = _fake_source(tmp_path / "raw")
    out_a, out_b = import_data(src, tmp_path / "a"), import_data(src, tmp_path / "b")
    files = sorted(p.relative_to(out_a).as_posix() for p in out_a.rglob("*") if p.is_file())
    assert files == ["README.md", "blimp/adjunct_island.parquet", "blimp/passive_1.parquet",
                     "wikitext-2/test.parquet", "wikitext-2/valid.parquet", "xcopa/LICENSE.md",
                     "xcopa/et/test.parquet", "xcopa/et/validation.parquet"]
    for rel in files:  # same input -> same bytes, so the DVC md5 is stable
        assert (out_a / rel).read_bytes() == (out_b / rel).read_bytes(), rel
    blimp = pq.read_table(out_a / "blimp" / "passive_1.parquet")
    assert blimp.column_names == list(data_mod.BLIMP_COLUMNS)
    xcopa = pq.read_table(out_a / "xcopa" / "et" / "validation.parquet").to_pylist()
    assert xcopa == [{"premise": "P.", "choice1": "A.", "choice2": "B.", "question": "cause", "label": 1, "idx": 0}]
    assert pq.read_table(out_a / "wikitext-2" / "valid.parquet").num_rows == 2


def test_import_data_refuses_incomplete_source_and_keeps_old_output(tmp_path):
    src = _fake_source(tmp_path / "raw")
    out = import_data(src, tmp_path / "out")
    (src / "xcopa" / "LICENSE.md").unlink()
    with pytest.raises(IterabreError, match="LICENSE.md"):
        import_data(src, out)
    assert (out / "xcopa" / "LICENSE.md").exists()


def test_import_data_rejects_malformed_rows(tmp_path):
    src = _fake_source(tmp_path / "raw")
    (src / "blimp" / "passive_1.jsonl").write_text(json.dumps({"sentence_good": "x"}) + "\n")
    with pytest.raises(IterabreError, match="passive_1.jsonl lacks the field"):
        import_data(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_token_windows_cut_the_joined_stream(tokenizer):
    docs = ["abc", "defgh"]
    windows = token_windows(tokenizer, docs, seq_len=3)
    stream = tokenizer("abc\n\ndefgh", add_special_tokens=False)["input_ids"]  # 10 byte tokens
    assert windows.dtype == torch.long and windows.shape == (len(stream) // 3, 3)
    assert windows.flatten().tolist() == stream[: windows.numel()]  # no BOS, tail dropped
    assert tokenizer.bos_token_id not in windows.flatten().tolist()


def test_split_windows_disjoint_and_deterministic():
    windows = torch.arange(40).view(20, 2)
    a = split_windows(windows, 4, 8, 3, seed=1)
    b = split_windows(windows, 4, 8, 3, seed=1)
    c = split_windows(windows, 4, 8, 3, seed=2)
    assert {k: v.shape[0] for k, v in a.items()} == {"calib": 4, "recovery": 8, "heldout": 3}
    rows = [tuple(r.tolist()) for part in a.values() for r in part]
    assert len(set(rows)) == 15  # disjoint: no window used twice
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_split_windows_too_few_says_how_many():
    with pytest.raises(IterabreError, match="only 5 at this sequence length"):
        split_windows(torch.zeros(5, 4, dtype=torch.long), 2, 2, 2, seed=0)


def test_load_documents_real_wikitext():
    valid, test = load_documents("wikitext", "valid"), load_documents("wikitext", "test")
    # lm-eval's document-level wikitext-2 has 60 validation and 62 test articles.
    assert (len(valid), len(test)) == (60, 62)
    assert "Homarus gammarus" in valid[0]
    with pytest.raises(IterabreError, match="unknown wikitext split"):
        load_documents("wikitext", "train")


def test_missing_data_folder_says_dvc_pull(tmp_path, monkeypatch):
    monkeypatch.setenv("ITERABRE_DATA_DIR", str(tmp_path / "nothing"))
    with pytest.raises(IterabreError, match="dvc pull"):
        load_documents()


def test_data_version_real_data_dvc_is_clean():
    pinned = yaml.safe_load((REPO_ROOT / "data.dvc").read_text())["outs"][0]["md5"]
    version = data_version()
    assert version == {"md5": pinned.removesuffix(".dir"), "dirty": False}


def test_data_version_detects_a_changed_file(tmp_path, monkeypatch):
    from dvc.repo import Repo

    Repo.init(str(tmp_path), no_scm=True).close()  # a DVC project of its own, like the repository
    shutil.copytree(REPO_ROOT / "data", tmp_path / "data")
    shutil.copy(REPO_ROOT / "data.dvc", tmp_path / "data.dvc")
    monkeypatch.setenv("ITERABRE_DATA_DVC", str(tmp_path / "data.dvc"))
    assert data_version()["dirty"] is False
    readme = tmp_path / "data" / "README.md"
    readme.write_text(readme.read_text().replace("#", "!", 1))  # same size, other content
    assert data_version()["dirty"] is True
    shutil.rmtree(tmp_path / "data")
    with pytest.raises(IterabreError, match="dvc pull"):
        data_version()

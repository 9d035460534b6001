"""Broken inputs map to one `error: ...` line naming the file and the fix, before any weights load.

A few cases run the installed `iterabre` command in a subprocess (the user's view: exit code,
one stderr line, no traceback, no output folder); the rest call the library checks directly.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from iterabre import models
from iterabre.data import import_data
from iterabre.errors import IterabreError
from iterabre.evaluation.run import check_output
from iterabre.models import check_local_model, check_model_folder, load_model
from iterabre.paths import require_dir_or_absent
from iterabre.tiny import byte_tokenizer, tiny_model

CLI = Path(sys.executable).with_name("iterabre")  # the console script of this venv


@pytest.fixture(scope="module")
def intact_dir(tmp_path_factory) -> Path:
    """A 2-block tiny Llama + byte tokenizer, saved once; tests break copies of it."""
    path = tmp_path_factory.mktemp("intact") / "model"
    tiny_model("llama", 2).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def model_dir(intact_dir, tmp_path) -> Path:
    """A private copy of the intact model folder, to break."""
    return Path(shutil.copytree(intact_dir, tmp_path / "model"))


def _truncate(file: Path, keep: float = 0.5) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep)])


def _overwrite(file: Path, offset: int, garbage: bytes) -> None:
    data = bytearray(file.read_bytes())
    data[offset:offset + len(garbage)] = garbage
    file.write_bytes(bytes(data))


def _run_cli(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """The real command line, offline, with private Prefect and MLflow stores."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PREFECT_HOME": str(tmp_path / "prefect"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    return subprocess.run([str(CLI), *args], capture_output=True, text=True, env=env, timeout=300)


def _assert_one_error_line(proc: subprocess.CompletedProcess, *names: str) -> str:
    """Exit code 2, exactly one non-empty stderr line `error: ...` naming `names`, no traceback."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    for name in names:
        assert name in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------- the CLI, end to end

@pytest.mark.parametrize("breakage,named", [
    (lambda d: _truncate(d / "model.safetensors"), "model.safetensors is truncated"),
    (lambda d: (d / "config.json").write_text("{not json"), "config.json is not valid JSON"),
])
def test_evaluate_broken_model_one_line(model_dir, tmp_path, breakage, named):
    breakage(model_dir)
    out = tmp_path / "out"
    proc = _run_cli(["evaluate", "--model", str(model_dir), "--tasks", "wikitext", "--limit", "2",
                     "--output", str(out), "--device", "cpu"], tmp_path)
    _assert_one_error_line(proc, str(model_dir), named, "Fix: ")
    assert not out.exists()


def test_evaluate_output_is_a_file(intact_dir, tmp_path):
    out = tmp_path / "results.txt"
    out.write_text("keep me")
    proc = _run_cli(["evaluate", "--model", str(intact_dir), "--tasks", "wikitext", "--limit", "2",
                     "--output", str(out), "--device", "cpu"], tmp_path)
    _assert_one_error_line(proc, f"--output {out} is an existing file")
    assert out.read_text() == "keep me"


# `config.validate` checks the model files and the output path before Prefect or MLflow start.

def test_compress_garbage_safetensors_one_line(model_dir, tmp_path):
    _overwrite(model_dir / "model.safetensors", 0, b"\xde\xad\xbe\xef" * 4)
    out = tmp_path / "out"
    proc = _run_cli(["compress", "--model", str(model_dir), "--target-layers", "1", "--output", str(out),
                     "--eval-tasks", "", "--device", "cpu"], tmp_path)
    _assert_one_error_line(proc, "model.safetensors is not a safetensors file")
    assert not out.exists()


def test_compress_output_is_a_file(intact_dir, tmp_path):
    out = tmp_path / "out"
    out.write_text("keep me")
    proc = _run_cli(["compress", "--model", str(intact_dir), "--target-layers", "1", "--output", str(out),
                     "--eval-tasks", "", "--device", "cpu"], tmp_path)
    _assert_one_error_line(proc, f"--output {out} is an existing file")
    assert out.read_text() == "keep me"


def test_data_import_missing_source_one_line(tmp_path):
    proc = _run_cli(["data", "import", "--source", str(tmp_path / "nowhere"), "--dest", str(tmp_path / "d")],
                    tmp_path)
    _assert_one_error_line(proc, f"data source {tmp_path / 'nowhere'} does not exist")
    assert not (tmp_path / "d").exists()


# ---------------------------------------------------------------- safetensors files (header only)

def test_truncated_weights_are_refused_before_loading(model_dir, monkeypatch):
    _truncate(model_dir / "model.safetensors")

    def never(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(models, "_load_weights", never)
    with pytest.raises(IterabreError, match=r"model\.safetensors is truncated: it has \d+ bytes but its header "
                                            r"describes \d+\. Fix: copy or download"):
        load_model(str(model_dir))


@pytest.mark.parametrize("breakage,message", [
    (lambda f: _overwrite(f, 0, b"garbage!garbage!"), r"not a safetensors file \(its first 8 bytes announce an "
                                                      r"impossible \d+-byte header\)"),
    (lambda f: _overwrite(f, 8, b"#!garbage"), r"not a safetensors file \(its header is not the expected JSON\)"),
    (lambda f: _truncate(f, 0.99), "is truncated: it has"),  # only the data section is short
    (lambda f: f.write_bytes(f.read_bytes()[:5]), "fewer than the 8 of a header length"),
    (lambda f: _truncate(f, 0.001), r"it has \d+ bytes but its header alone needs \d+"),
    (lambda f: f.write_bytes(f.read_bytes() + b"\0" * 16), "16 bytes more than its header describes"),
])
def test_damaged_safetensors(model_dir, breakage, message):
    breakage(model_dir / "model.safetensors")
    with pytest.raises(IterabreError, match=rf"{model_dir / 'model.safetensors'} .*{message}"):
        check_model_folder(model_dir)


def test_intact_folder_passes_and_loads(intact_dir):
    check_model_folder(intact_dir)
    check_local_model(str(intact_dir))
    model, _ = load_model(str(intact_dir))
    assert model.config.num_hidden_layers == 2


# ---------------------------------------------------------------- sharded checkpoints

@pytest.fixture
def sharded_dir(tmp_path) -> Path:
    """The tiny model saved in several shards with a model.safetensors.index.json."""
    path = tmp_path / "sharded"
    tiny_model("llama", 2).save_pretrained(path, max_shard_size="20KB")
    byte_tokenizer().save_pretrained(path)
    assert len(list(path.glob("model-*.safetensors"))) > 1
    return path


def test_sharded_folder_passes(sharded_dir):
    check_model_folder(sharded_dir)


def test_index_names_a_missing_shard(sharded_dir):
    shard = sorted(sharded_dir.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(IterabreError, match=rf"model\.safetensors\.index\.json names shard files that are "
                                            rf"missing: {shard.name}\. Fix: copy the missing shards"):
        check_model_folder(sharded_dir)


@pytest.mark.parametrize("content,message", [
    ("{not json", r"index\.json is not valid JSON"),
    (json.dumps({"metadata": {}}), r"index\.json has no weight_map"),
])
def test_broken_shard_index(sharded_dir, content, message):
    (sharded_dir / "model.safetensors.index.json").write_text(content)
    with pytest.raises(IterabreError, match=message):
        check_model_folder(sharded_dir)


def test_truncated_shard_is_named(sharded_dir):
    shard = sorted(sharded_dir.glob("model-*.safetensors"))[0]
    _truncate(shard)
    with pytest.raises(IterabreError, match=rf"{shard.name} is truncated"):
        check_model_folder(sharded_dir)


# ---------------------------------------------------------------- config.json and tokenizer

@pytest.mark.parametrize("content,message", [
    ("{not json", r"config\.json is not valid JSON \(JSONDecodeError: Expecting property name"),
    ("[1, 2]", r"config\.json holds a JSON list, not the object of a model config"),
    (b"\xff\xfe{", r"config\.json is not valid JSON \(UnicodeDecodeError"),
])
def test_broken_config_json(model_dir, content, message):
    write = (model_dir / "config.json").write_bytes if isinstance(content, bytes) else \
        (model_dir / "config.json").write_text
    write(content)
    with pytest.raises(IterabreError, match=message):
        check_model_folder(model_dir)


def test_garbled_tokenizer_json_is_named(model_dir):
    _overwrite(model_dir / "tokenizer.json", 0, b"<html>")
    with pytest.raises(IterabreError, match=r"tokenizer\.json is not valid JSON"):
        check_model_folder(model_dir)


def test_missing_tokenizer_names_the_folder(model_dir):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model_dir / name).unlink()
    with pytest.raises(IterabreError, match=rf"{model_dir} has no usable tokenizer: the folder has no "
                                            r"tokenizer files .*Fix: save the tokenizer"):
        load_model(str(model_dir))


def test_unloadable_tokenizer_lists_its_files(model_dir):
    (model_dir / "tokenizer.json").write_text(json.dumps({"model": {"type": "NoSuchModel"}}))
    with pytest.raises(IterabreError, match=r"no usable tokenizer: tokenizer\.json, tokenizer_config\.json "
                                            r"did not load"):
        load_model(str(model_dir))


# ---------------------------------------------------------------- model paths of the wrong kind

def test_model_path_of_the_wrong_kind(model_dir, tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / "fake.gguf").write_bytes(b"PK\x03\x04 not gguf")
    (tmp_path / "empty").mkdir()
    cases = {"notes.txt": "is a file but not a .gguf model", "fake.gguf": "is not a GGUF file",
             "empty": "has no config.json", "missing": "does not exist"}
    for name, message in cases.items():
        with pytest.raises(IterabreError, match=message):
            check_local_model(str(tmp_path / name))
    check_local_model("smollm2-135m")  # embedded names and hub ids are not checked here
    check_local_model("some-org/some-model")


def test_weights_missing_entirely(model_dir):
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(IterabreError, match=r"has no weight files \(\*\.safetensors\)"):
        check_model_folder(model_dir)


# ---------------------------------------------------------------- output and data folders

def test_require_dir_or_absent(tmp_path):
    (tmp_path / "file").write_text("x")
    assert require_dir_or_absent(tmp_path / "new" / "deeper", "--output", "fix") == tmp_path / "new" / "deeper"
    assert require_dir_or_absent(tmp_path, "--output", "fix") == tmp_path
    with pytest.raises(IterabreError, match=r"--output .*/file is an existing file, not a folder\. Fix: fix"):
        require_dir_or_absent(tmp_path / "file", "--output", "fix")
    with pytest.raises(IterabreError, match=r"lies under the file .*/file, not a folder"):
        require_dir_or_absent(tmp_path / "file" / "sub", "--output", "fix")


def test_evaluate_output_checks(tmp_path):
    (tmp_path / "taken.json").mkdir()
    assert check_output(tmp_path / "new") == tmp_path / "new" / "results.json"
    assert check_output(tmp_path / "r.json") == tmp_path / "r.json"
    with pytest.raises(IterabreError, match="is an existing folder, not a .json file"):
        check_output(tmp_path / "taken.json")


def test_data_import_source_and_dest_of_the_wrong_kind(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "raw").mkdir()
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"meow")
    with pytest.raises(IterabreError, match=r"data source .*/file is a file, not a folder"):
        import_data(tmp_path / "file", tmp_path / "out")
    with pytest.raises(IterabreError, match=r"incomplete \(missing wikitext-2/valid\.txt, wikitext-2/test\.txt, "
                                            r"blimp/, xcopa/data/, xcopa/LICENSE\.md\)"):
        import_data(tmp_path / "raw", tmp_path / "out")
    for folder in ("wikitext-2", "blimp", "xcopa/data"):
        (tmp_path / "raw" / folder).mkdir(parents=True)
    for file in ("wikitext-2/valid.txt", "wikitext-2/test.txt", "xcopa/LICENSE.md"):
        (tmp_path / "raw" / file).write_text("")
    with pytest.raises(IterabreError, match=r"data destination .*/file is an existing file"):
        import_data(tmp_path / "raw", tmp_path / "file")
    with pytest.raises(IterabreError, match=r"photos is a folder with other content"):
        import_data(tmp_path / "raw", tmp_path / "photos")
    assert (tmp_path / "photos" / "cat.jpg").exists() and not (tmp_path / "out").exists()

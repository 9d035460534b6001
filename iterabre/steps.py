"""Path-in, path-out steps of a compression job: the units the Prefect flow caches.

Each function does one library call on models and data that live on disk and returns
paths or small JSON-able values, so an orchestrator can key a cache on content hashes
instead of in-memory objects. Nothing here knows about Prefect or MLflow; the loop
itself lives once, in `flows/compress.py`.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from iterabre.config import CompressConfig, RecoveryConfig, select_rules
from iterabre.errors import IterabreError
from iterabre.files import atomic_dir, save_torch
from iterabre.paths import SOURCE_FILE
from iterabre.planning import recon_windows, recovery_ranges, split_layout



# ---------------------------------------------------------------- model and data steps

def _load(model_dir: str | os.PathLike, device: str = "cpu", dtype=None):
    """(model, tokenizer) from a prepared local safetensors folder (dtype None: float32)."""
    from iterabre.models import load_model

    return load_model(str(model_dir), device=device, dtype=dtype)


def prepare_base(model: str, revision: str | None, work_dir: str | os.PathLike, allow_remote_code: bool = False,
                 allow_pickle: bool = False) -> Path:
    """Load `model` (embedded / folder / gguf / hub) and save it as `work_dir/base` (safetensors)."""
    from iterabre.models import load_model, save_model

    loaded, tokenizer = load_model(model, revision, device="cpu", allow_remote_code=allow_remote_code,
                                   allow_pickle=allow_pickle)
    source = {"model": model, "revision": revision}
    return save_model(loaded, tokenizer, Path(work_dir) / "base", extra={SOURCE_FILE: source})


def num_layers(model_dir: str | os.PathLike) -> int:
    """Decoder block count of a saved model, read from its config."""
    from transformers import AutoConfig

    # `num_hidden_layers` is aliased by every family's attribute_map (GPT-2: n_layer).
    count = getattr(AutoConfig.from_pretrained(str(model_dir)), "num_hidden_layers", None)
    if count is None:
        raise IterabreError(f"{model_dir} has no layer count in its config.", "use a decoder-only HF model")
    return int(count)


def _self_generated(cfg: CompressConfig, model_dir: Path, n: int):
    """Self-generated text: SelfGenData of n windows [n, seq_len] sampled from the base model (and its FLOPs)."""
    from iterabre.devices import resolve_device
    from iterabre.models import working_dtype
    from iterabre.selfgen import self_generated_calibration

    device = resolve_device(cfg.device)
    model, tokenizer = _load(model_dir, device, working_dtype(cfg.dtype, device))  # the planner's generate phase
    return self_generated_calibration(model, tokenizer, n, cfg.seq_len, cfg.seed)


def prepare_data(cfg: CompressConfig, model_dir: str | os.PathLike, work_dir: str | os.PathLike,
                 budgets: list[int]) -> Path:
    """Disjoint calibration / recovery / held-out token windows, saved as one .pt file.

    All three come from wikitext-2 *valid*; evaluation (lm-eval `wikitext`) reads wikitext-2 *test*,
    so no text used to score or heal a model is ever scored as held-out evaluation text. With
    `calibration=self-generated` the scoring windows (and block-recon's, "recon") are sampled from
    the base model instead, in one seeded run, so the two sets are different text.
    """
    from transformers import AutoTokenizer

    from iterabre.data import load_documents, split_windows, token_windows

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    windows = token_windows(tokenizer, load_documents("wikitext", "valid"), cfg.seq_len)  # [W, T]
    n_calib = math.ceil(cfg.calibration_tokens / cfg.seq_len)
    ranges = recovery_ranges(budgets, cfg.seq_len)
    n_recovery = ranges[-1][1] if ranges else 0
    split = split_windows(windows, n_calib, n_recovery, n_calib, cfg.seed)  # held-out as big as calib
    generation_flops, n_recon = 0, recon_windows(cfg)
    if cfg.calibration == "self-generated":
        gen = _self_generated(cfg, Path(model_dir), n_calib + n_recon)
        split["calib"], generation_flops = gen.input_ids[:n_calib].cpu(), gen.flops  # [n_calib, T]
        if n_recon:
            split["recon"] = gen.input_ids[n_calib:].cpu()  # [n_recon, T]
    layout = split_layout(cfg, n_calib, n_recovery, int(windows.shape[0]))
    payload = {**split, "recovery_ranges": [list(r) for r in ranges],
               "meta": {"seq_len": cfg.seq_len, "seed": cfg.seed, "calibration": cfg.calibration,
                        "windows_available": int(windows.shape[0]), "split": layout,
                        "generation_flops": int(generation_flops)}}
    return save_torch(payload, Path(work_dir) / "data.pt")


def load_data(data_path: str | os.PathLike) -> dict:
    """The windows file written by `prepare_data` (tensors + plain lists only)."""
    return torch.load(data_path, weights_only=True)


def data_meta(data_path: str | os.PathLike) -> dict:
    """What `prepare_data` stored about a windows file: its `split_layout` ("split") and the FLOPs of
    generating its text ("generation_flops", 0 for wikitext)."""
    return load_data(data_path)["meta"]


def _mask(ids: torch.Tensor) -> torch.Tensor:
    """Windows are full slices of one token stream, so every position is real: all ones."""
    return torch.ones_like(ids)


def score(model_dir: str | os.PathLike, data_path: str | os.PathLike, scorer: str, k: int,
          device: str, dtype: str = "float32", select_from: str = CompressConfig.select_from) -> dict:
    """The k blocks to remove next and why: {"remove": original indices, "scores": {orig: importance},
    "order": remaining original indices, "flops"}; higher score = more important.

    The angular scorer scores runs of k consecutive blocks, keyed by the run's first block, the
    others single blocks. `select` scores with every rule of `select_from`, takes each one's k
    blocks and removes the set whose removal as a whole moves the final hidden states least
    (adds "candidates", "distances", "chosen"; "scores" are the first rule's). The model is
    streamed from its folder one block at a time (`streamed_scores`, `set_distances`), so it
    need not fit the device, in `dtype` ('auto': the job's working dtype, models.working_dtype).
    """
    from iterabre.devices import as_dtype, resolve_device
    from iterabre.flops import count_flops
    from iterabre.models import working_dtype
    from iterabre.planning import plan_removal
    from iterabre.scorers import select_removal, set_distances, streamed_scores

    device = resolve_device(device)
    ids = load_data(data_path)["calib"]  # [N, T]
    torch_dtype = as_dtype(working_dtype(dtype, device))
    rules = select_rules(select_from) if scorer == "select" else [scorer]
    with count_flops() as counted:  # "flops": from the shapes of every block matmul / attention call that ran
        scored, picks = {}, {}
        for rule in rules:
            scored[rule] = streamed_scores(model_dir, ids, _mask(ids), scorer=rule, n=k if rule == "angular" else 1,
                                           device=device, dtype=torch_dtype)
            picks[rule] = plan_removal(scored[rule], k, rule, scored[rule].order)
        distances = set_distances(model_dir, ids, _mask(ids), picks, device=device, dtype=torch_dtype) \
            if scorer == "select" else {}
    chosen = select_removal(distances) if distances else scorer
    first = scored[rules[0]]
    out = {"remove": picks[chosen], "scores": {int(i): float(v) for i, v in first.items()}, "order": list(first.order),
           "flops": counted.total}
    if distances:
        out.update(candidates=picks, distances=distances, chosen=chosen)
    return out


def prune(model_dir: str | os.PathLike, remove: list[int], out_dir: str | os.PathLike) -> Path:
    """Copy of the model at `model_dir` without the blocks `remove` (original indices)."""
    from iterabre.models import save_model
    from iterabre.surgery import remove_blocks

    model, tokenizer = _load(model_dir)
    return save_model(remove_blocks(model, list(remove)), tokenizer, out_dir)


def recover(student_dir: str | os.PathLike, teacher_dir: str | os.PathLike, data_path: str | os.PathLike,
            recovery_cfg: dict, removed: list[int], window_range: tuple[int, int],
            out_dir: str | os.PathLike, device: str, progress=None,
            extra_range: tuple[int, int] | None = None, dtype: str = "auto", num_processes: int = 1,
            fsdp: bool = False) -> dict:
    """Heal the pruned student towards the teacher on its slice of the recovery windows; save it.

    `extra_range` adds more recovery windows (from the carry pool, for tokens an earlier step left).
    `dtype` is the working dtype of both models ('auto': bfloat16 on CUDA, float32 on CPU). With
    `num_processes` > 1 the same `recover_on` runs in that many processes under torchrun (DDP, or
    FSDP2 with `fsdp`; iterabre.distributed) and this returns rank 0's record.
    """
    args = dict(student_dir=str(student_dir), teacher_dir=str(teacher_dir), data_path=str(data_path),
                recovery_cfg=dict(recovery_cfg), removed=list(removed), window_range=list(window_range),
                out_dir=str(out_dir), device=device, extra_range=list(extra_range) if extra_range else None,
                dtype=dtype)
    if num_processes > 1:
        from iterabre.distributed import launch

        return launch(args, num_processes, fsdp, progress)
    from iterabre.distributed import SINGLE

    return recover_on(SINGLE, progress=progress, **args)


def recover_on(dist, student_dir: str, teacher_dir: str, data_path: str, recovery_cfg: dict, removed: list[int],
               window_range: list[int], out_dir: str, device: str, extra_range: list[int] | None = None,
               dtype: str = "auto", progress=None) -> dict:
    """What each process of `recover` runs (`dist`: its place among them); rank 0 alone measures and saves."""
    from iterabre.models import save_model, working_dtype
    from iterabre.reconstruct import relative_hidden_error
    from iterabre.recovery import recover as run_recovery

    place, dtype = dist.place(device), working_dtype(dtype, device)
    student, tokenizer = _load(student_dir, place, dtype)
    teacher, _ = _load(teacher_dir, place, dtype)
    data = load_data(data_path)
    ids = data["recovery"][window_range[0]:window_range[1]]  # [n, T] this step's share
    if extra_range is not None:
        ids = torch.cat([ids, data["recovery"][extra_range[0]:extra_range[1]]])  # [n + m, T]
    held, recon = data["heldout"], data.get("recon")  # recon: block-recon's self-generated text, if any
    lead = dist.rank == 0
    error_before = relative_hidden_error(student, teacher, held, _mask(held)) if lead else None
    result = run_recovery(student, teacher, ids, _mask(ids), RecoveryConfig(**recovery_cfg), list(removed),
                          progress=progress, device=place, heldout_ids=held, heldout_mask=_mask(held), dist=dist,
                          recon_ids=recon)
    if not lead:  # only rank 0's student is sure to hold the result (FSDP gathers it there)
        return {}
    # Every method reports the same quality yardstick: how far the final hidden states are
    # from the teacher's on held-out text (issue: compare none / reconstruct / kd by it).
    record = result.to_dict()
    record["heldout_rel_error_before"] = error_before
    record["heldout_rel_error_after"] = relative_hidden_error(student, teacher, held, _mask(held))
    save_model(student, tokenizer, out_dir)
    return json.loads(json.dumps(record))  # tuples -> lists: what a JSON round trip gives


def evaluate(model_dir: str | os.PathLike, tasks: str, limit: float | None, device: str,
             seed: int = 0, parallelize: bool = False, dtype: str = "float32") -> dict:
    """lm-eval metrics {task: {metric: value}} of a saved model; {} when no task is asked for.

    `parallelize`: the model is split over every visible GPU (see harness.evaluate_parallel).
    `dtype` as for `score`.
    """
    if not tasks.strip():
        return {}
    from iterabre.devices import resolve_device
    from iterabre.evaluation import evaluate as run_eval
    from iterabre.evaluation.harness import evaluate_parallel
    from iterabre.models import working_dtype

    device = resolve_device(device)
    dtype = working_dtype(dtype, device)
    if parallelize:
        return evaluate_parallel(model_dir, tasks, limit=limit, seed=seed, dtype=dtype)
    model, tokenizer = _load(model_dir, device, dtype)
    return run_eval(model, tokenizer, tasks, limit=limit, device=device, seed=seed)


def publish(model_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Copy a finished checkpoint to `out_dir` (e.g. DIR/final) atomically."""
    import shutil

    with atomic_dir(out_dir) as tmp:
        shutil.copytree(model_dir, tmp, dirs_exist_ok=True)
    return Path(out_dir)

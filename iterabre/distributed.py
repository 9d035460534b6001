"""Recovery across processes: torch.distributed started by torchrun, DDP or FSDP2 (`fully_shard`).

Two halves. `launch` is what the recover step calls when num_processes > 1: it starts

    torchrun --standalone --nproc_per_node N -m iterabre.distributed JOB.json

with the settings of configs/torchrun.yaml, echoes the processes' output, hands rank 0's
progress lines to the caller's callback, and returns rank 0's result record (the same dict a
one-process recovery returns). `main` is what every process runs: it joins the process group
and calls the same `steps.recover_on` as a one-process recovery, with a `Group` instead of
`SINGLE`.

The training loop (iterabre.recovery) talks to its processes only through that context: which
rows of a micro-batch are this process's, how the student and the teacher are wrapped (DDP: a
whole copy per process; FSDP2: `fully_shard` on every decoder block and the root), how a number
is summed over processes, and how rank 0's plain model gets the trained weights back. `SINGLE`
answers all of that for one process, so 1 and N processes run the same code.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import warnings
from collections import deque
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from iterabre.errors import IterabreError

LAUNCH_CONFIG_ENV = "ITERABRE_TORCHRUN_CONFIG"  # another launch file than the repository's
LAUNCH_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "torchrun.yaml"
PROGRESS = "@iterabre-progress "  # prefix of rank 0's progress lines on stdout
TAIL_LINES = 30  # output lines quoted when the processes fail without a result


# ---------------------------------------------------------------- the loop's view of its processes

@dataclass(frozen=True)
class Single:
    """One process: every rank-aware hook of the training loop is the identity."""

    rank: int = 0
    world: int = 1
    fsdp: bool = False  # FSDP2 shards; False: DDP (a whole copy per process) or one process

    def place(self, device: str) -> str:
        """Where this process loads the plain (unwrapped) models."""
        return device

    def compute_device(self, device: str) -> torch.device:
        """Where this process computes (peak memory is measured there)."""
        return torch.device(device)

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """This process's rows of a micro-batch: all of them."""
        return idx

    def all_sum(self, value: float) -> float:
        """`value` summed over the processes."""
        return value

    def all_mean(self, value: float) -> float:
        """`value` averaged over the processes (identical on every rank afterwards)."""
        return self.all_sum(value) / self.world

    def all_gather(self, obj) -> list:
        """[obj of rank 0, obj of rank 1, ...] on every rank."""
        return [obj]

    def wrap(self, model: nn.Module, train: bool, compute: torch.dtype | None) -> nn.Module:
        """The module to call in the loop: the model itself."""
        return model

    def full(self, param: torch.Tensor) -> torch.Tensor:
        """The whole tensor of a (possibly sharded) parameter."""
        return param

    def unwrap(self, wrapped: nn.Module, model: nn.Module) -> None:
        """Bring the trained weights of `wrapped` into rank 0's plain `model` (here: already there)."""


SINGLE = Single()


@dataclass(frozen=True)
class Group(Single):
    """This process in a torch.distributed group started by torchrun (DDP, or FSDP2 when `fsdp`)."""

    local_rank: int = 0
    device: torch.device = torch.device("cpu")  # compute device: cuda:<local rank>, or cpu
    mesh: object = field(default=None, repr=False)  # 1-D DeviceMesh over all ranks (FSDP only)

    @classmethod
    def join(cls, device: str, fsdp: bool, backend: str, timeout_minutes: float) -> "Group":
        """Join the group torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*)."""
        import torch.distributed as dist

        local = int(os.environ["LOCAL_RANK"])
        compute = torch.device("cuda", local) if device.startswith("cuda") else torch.device("cpu")
        if compute.type == "cuda":
            torch.cuda.set_device(compute)
        dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes))
        mesh = None
        if fsdp:
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh(compute.type, (dist.get_world_size(),))
        return cls(rank=dist.get_rank(), world=dist.get_world_size(), fsdp=fsdp, local_rank=local, device=compute,
                   mesh=mesh)

    def place(self, device: str) -> str:
        # FSDP: the plain models stay in host memory and only the shards go to the device; the
        # plain copy is where the trained weights come back to on rank 0 (`unwrap`).
        return "cpu" if self.fsdp else str(self.device)

    def compute_device(self, device: str) -> torch.device:
        return self.device

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        # Strided: shares differ by at most one row (chunks could leave a process empty, e.g. 5
        # rows over 4 processes as 2, 2, 1, 0); the loop weights each share by its tokens.
        return idx[self.rank::self.world]

    def all_sum(self, value: float) -> float:
        import torch.distributed as dist

        total = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return float(total)

    def all_gather(self, obj) -> list:
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def wrap(self, model: nn.Module, train: bool, compute: torch.dtype | None) -> nn.Module:
        if self.fsdp:
            return self._shard(model, compute)
        if not train:  # DDP: the frozen teacher runs whole in every process
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        # Buffers (rotary tables) are equal everywhere and never change: no broadcast per forward.
        return DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False)

    def _shard(self, model: nn.Module, compute: torch.dtype | None) -> nn.Module:
        """A sharded copy of `model` (FSDP2 on each decoder block, then the root), loaded from it."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        from iterabre.surgery import decoder_blocks

        # Gather in the compute dtype (bf16), reduce gradients in fp32; the shards keep their own
        # dtype (fp32 masters of trained weights, bf16 frozen ones). None: no casting at all.
        policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32 if compute else None)
        shell = meta_copy(model)
        for block in decoder_blocks(shell):
            fully_shard(block, mesh=self.mesh, mp_policy=policy)
        fully_shard(shell, mesh=self.mesh, mp_policy=policy)  # the rest: embeddings, final norm, head
        with _quiet_state_dict():  # assigns each rank's shards to the meta parameters
            set_model_state_dict(shell, model.state_dict(), options=StateDictOptions(full_state_dict=True))
        return shell

    def full(self, param: torch.Tensor) -> torch.Tensor:
        from torch.distributed.tensor import DTensor

        return param.full_tensor() if isinstance(param, DTensor) else param

    def unwrap(self, wrapped: nn.Module, model: nn.Module) -> None:
        if not self.fsdp:  # DDP trained `model` itself, in every process
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # Every rank takes part in the gather; only rank 0 receives the full tensors (on the CPU).
        with _quiet_state_dict():
            full = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rank == 0:
            model.load_state_dict(full)


@contextlib.contextmanager
def _quiet_state_dict():
    """torch 2.13's state-dict helpers warn twice per call, per process, about an internal deprecation."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*_get_pg_default_device.*")
        warnings.filterwarnings("ignore", message="Multiple backends are registered.*")
        yield


def meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy of `model` whose parameters are empty meta tensors (tied ones stay tied).

    Buffers are copied for real: the non-persistent ones (rotary inv_freq) are in no state dict,
    so the copy must bring them itself. They are small.
    """
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in model.parameters()}
    return copy.deepcopy(model, memo)


def weights_digest(dist: Single, params: list[torch.Tensor]) -> str:
    """A short fingerprint of the weights as this process sees them (sharded ones gathered).

    Per tensor its float32 sum and norm: equal weights give equal digests, and one pass over
    the weights is cheap next to a training step.
    """
    stats = []
    with torch.no_grad():
        for p in params:
            t = dist.full(p).detach().float()
            stats.append(torch.stack([t.sum(), t.norm()]).cpu())
    blob = torch.cat(stats).numpy().tobytes() if stats else b""
    return hashlib.sha256(blob).hexdigest()[:16]


# ---------------------------------------------------------------- launch settings (configs/torchrun.yaml)

@dataclass
class LaunchSettings:
    """What configs/torchrun.yaml holds."""

    torchrun: dict = field(default_factory=lambda: {"standalone": True, "max_restarts": 0})
    env: dict = field(default_factory=dict)
    backend: str = "auto"
    timeout_minutes: float = 30.0
    path: str = "(defaults)"


def launch_settings(path: str | os.PathLike | None = None) -> LaunchSettings:
    """The launch file ($ITERABRE_TORCHRUN_CONFIG, else configs/torchrun.yaml; defaults if neither exists)."""
    import yaml

    path = Path(path or os.environ.get(LAUNCH_CONFIG_ENV) or LAUNCH_CONFIG)
    if not path.is_file():
        if os.environ.get(LAUNCH_CONFIG_ENV):
            raise IterabreError(f"{LAUNCH_CONFIG_ENV}={path} is not a file.",
                                f"point it at a copy of {LAUNCH_CONFIG.name}, or unset it")
        return LaunchSettings()
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise IterabreError(f"{path} is not valid YAML ({str(e).splitlines()[0]}).", "fix the file") from None
    known = {"torchrun", "env", "backend", "timeout_minutes"}
    if not isinstance(raw, dict) or set(raw) - known:
        raise IterabreError(f"{path} has unknown keys {sorted(set(raw) - known) if isinstance(raw, dict) else raw}.",
                            f"use only {', '.join(sorted(known))}")
    if "nproc_per_node" in (raw.get("torchrun") or {}):
        raise IterabreError(f"{path} sets torchrun nproc_per_node.", "remove it: it comes from --num-processes")
    return LaunchSettings(torchrun=dict(raw.get("torchrun") or {}), env=dict(raw.get("env") or {}),
                          backend=str(raw.get("backend", "auto")),
                          timeout_minutes=float(raw.get("timeout_minutes", 30.0)), path=str(path))


def backend_for(settings: LaunchSettings, device: str) -> str:
    """The process-group backend: the file's, or nccl on CUDA and gloo on the CPU."""
    if settings.backend != "auto":
        return settings.backend
    return "nccl" if device.startswith("cuda") else "gloo"


def torchrun_command(settings: LaunchSettings, nproc: int, job_file: str | os.PathLike) -> list[str]:
    """`python -m torch.distributed.run [options] --nproc_per_node N -m iterabre.distributed JOB`."""
    options = []
    for name, value in settings.torchrun.items():
        if value is None or value is False:
            continue
        flag = "--" + str(name).replace("_", "-")
        options += [flag] if value is True else [flag, str(value)]
    # This interpreter, so the processes see the same packages as the caller.
    return [sys.executable, "-m", "torch.distributed.run", *options, "--nproc-per-node", str(nproc),
            "-m", "iterabre.distributed", str(job_file)]


def launch_env(settings: LaunchSettings, nproc: int) -> dict:
    """The processes' environment: ours, the file's `env` (OMP_NUM_THREADS: auto = cores / N), unbuffered output."""
    env = dict(os.environ)
    for name, value in settings.env.items():
        if name == "OMP_NUM_THREADS" and str(value) == "auto":
            value = max(1, len(os.sched_getaffinity(0)) // nproc)
        env[str(name)] = str(value)
    env.update(PYTHONUNBUFFERED="1", ITERABRE_NO_PROGRESS="1")  # lines as they come; no tqdm bars
    return env


# ---------------------------------------------------------------- the caller's side

def launch(args: dict, nproc: int, fsdp: bool, progress: Callable[[dict], None] | None = None) -> dict:
    """Run `steps.recover_on(**args)` in `nproc` processes under torchrun; rank 0's result record.

    Output lines are echoed as they come (print: a Prefect task with log_prints logs them); rank
    0's progress lines go to `progress`. A user error in a process is raised here as the same
    IterabreError; any other failure as a RuntimeError quoting it (so a CUDA out-of-memory in a
    process still reads "out of memory" to the flow's retry rule).
    """
    settings = launch_settings()
    with tempfile.TemporaryDirectory(prefix="iterabre-torchrun-") as tmp:
        result = Path(tmp) / "result.json"
        job = {"args": args, "result": str(result), "fsdp": fsdp,
               "backend": backend_for(settings, args["device"]), "timeout_minutes": settings.timeout_minutes}
        job_file = Path(tmp) / "job.json"
        job_file.write_text(json.dumps(job), encoding="utf-8")
        proc = subprocess.Popen(torchrun_command(settings, nproc, job_file), env=launch_env(settings, nproc),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)  # its own group, so a stop reaches every process
        try:
            tail = _relay(proc.stdout, progress)
            code = proc.wait()
        except BaseException:  # Ctrl-C / SIGTERM of the task: stop torchrun and its processes too
            _stop(proc)
            raise
        return _outcome(result, code, tail, nproc)


def _relay(lines, progress: Callable[[dict], None] | None) -> deque:
    """Echo the processes' output line by line, progress lines to `progress`; the last lines."""
    tail = deque(maxlen=TAIL_LINES)
    for line in lines:
        # Another process's unfinished line (a progress bar ends in \r, not \n) may precede it.
        line, marked, payload = line.partition(PROGRESS)
        if marked and progress is not None:
            progress(json.loads(payload))
        if line.strip():
            print(line, end="" if line.endswith("\n") else "\n", flush=True)
            tail.append(line.rstrip("\n"))
    return tail


def _stop(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM torchrun's process group (torchrun passes it on to its processes), SIGKILL if it lingers."""
    import signal

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def _outcome(result: Path, code: int, tail: deque, nproc: int) -> dict:
    """Rank 0's record, or the first process's error raised here."""
    if code == 0 and result.is_file():
        return json.loads(result.read_text(encoding="utf-8"))["record"]
    for rank in range(nproc):
        failed = _error_file(result, rank)
        if failed.is_file():
            error = json.loads(failed.read_text(encoding="utf-8"))
            if error["type"] == "IterabreError":
                raise IterabreError(error["problem"], error["fix"])
            raise RuntimeError(f"recovery process {rank} of {nproc} failed: {error['type']}: {error['problem']}")
    raise RuntimeError(f"torchrun exited with code {code} and no result; its last lines:\n" + "\n".join(tail))


def _error_file(result: Path, rank: int) -> Path:
    return result.with_name(f"error-rank{rank}.json")


# ---------------------------------------------------------------- each process's side

def _print_progress(info: dict) -> None:
    """Rank 0's progress callback: one line for the launcher to pick out of the output."""
    print(PROGRESS + json.dumps(info), flush=True)


def _write_error(result: Path, rank: int, error: BaseException) -> None:
    """What went wrong in this process, for the launcher to raise."""
    from iterabre.files import write_json

    if isinstance(error, IterabreError):
        problem, fix = error.problem, error.fix
    else:
        problem, fix = (str(error).strip().splitlines() or [""])[0], ""
    write_json({"type": type(error).__name__, "problem": problem, "fix": fix}, _error_file(result, rank))


def main(argv: list[str] | None = None) -> None:
    """Entry point of every process torchrun starts: join the group, run this rank's recovery."""
    import torch.distributed as dist

    from iterabre import steps
    from iterabre.files import write_json

    job = json.loads(Path((argv or sys.argv[1:])[0]).read_text(encoding="utf-8"))
    result = Path(job["result"])
    group = Group.join(job["args"]["device"], job["fsdp"], job["backend"], job["timeout_minutes"])
    try:
        progress = _print_progress if group.rank == 0 else None
        record = steps.recover_on(group, progress=progress, **job["args"])
        if group.rank == 0:
            write_json({"record": record}, result)
    except Exception as e:
        _write_error(result, group.rank, e)
        raise
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

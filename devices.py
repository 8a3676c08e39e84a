"""Where a run executes and how it draws random numbers: the device, the DDP ranks, and the random state it seeds,
saves and resumes per rank and per GPU.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them everything is one process.

    python -c "import devices; print(devices.select_device('auto'))"
"""

from __future__ import annotations

import os
import random
import sys
from typing import Any

import numpy as np
import torch

from utils import UserError


# ---------------------------------------------------------------------------------------------------
# Devices.
def select_device(name: str) -> torch.device:
    """`auto` picks CUDA when available, else the CPU; otherwise the named device, checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device '{name}' is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA GPU is visible here; use --device cpu (or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(
            f"--device {name}: only {torch.cuda.device_count()} GPU(s) are visible (cuda:0 .. "
            f"cuda:{torch.cuda.device_count() - 1}); pick one of them, or --device cuda for all"
        )
    return device


def uses_every_gpu(device_flag: str, device: torch.device) -> bool:
    """DataParallel over every visible GPU for `--device cuda` or `auto`; an index (`cuda:1`) means that GPU."""
    return device.type == "cuda" and device_flag in ("auto", "cuda") and torch.cuda.device_count() > 1


# ---------------------------------------------------------------------------------------------------
# Distributed.
def distributed_env() -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) when launched by torchrun, else None."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))


def init_distributed(device_name: str, timeout_min: float = 30.0) -> tuple[int, int, torch.device]:
    """(rank, world_size, device) of this process: a process group (NCCL on GPUs, gloo on CPUs) with one device
    per process under torchrun; (0, 1, the named device) otherwise. The timeout ends collective calls that a
    failed rank would otherwise leave waiting forever."""
    env = distributed_env()
    if env is None:
        return 0, 1, select_device(device_name)
    rank, world, local_rank = env
    import datetime

    import torch.distributed as dist

    use_cuda = torch.cuda.is_available() and device_name != "cpu"
    if use_cuda:
        # A launcher that binds one GPU per process (SLURM, CUDA_VISIBLE_DEVICES per rank) shows each process one
        # GPU while LOCAL_RANK counts on: the process's GPU is LOCAL_RANK modulo the ones it sees.
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if use_cuda else "gloo",
            timeout=datetime.timedelta(minutes=timeout_min),
            **({"device_id": device} if use_cuda else {}),
        )
    return rank, world, device


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    """This process's rank under torchrun (0 in one process): only rank 0 writes files."""
    return torch.distributed.get_rank() if is_distributed() else 0


def world_size() -> int:
    """The number of processes under torchrun (1 in one process)."""
    return torch.distributed.get_world_size() if is_distributed() else 1


def broadcast_object(value: Any) -> Any:
    """Rank 0's `value` on every rank (a no-op in one process)."""
    if not is_distributed():
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(value: Any) -> list[Any]:
    """[value of rank 0, value of rank 1, ...] on every rank ([value] in one process)."""
    if not is_distributed():
        return [value]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, value)
    return out


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is True on any (so all ranks stop at the same step)."""
    if not is_distributed():
        return flag
    backend_cuda = torch.distributed.get_backend() == "nccl"
    t = torch.tensor([int(flag)], device=torch.device("cuda", torch.cuda.current_device()) if backend_cuda else "cpu")
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def average_buffers(module: torch.nn.Module) -> None:
    """Every floating-point buffer (BatchNorm statistics) averaged over the ranks (a no-op in one process)."""
    if not is_distributed():
        return
    world = torch.distributed.get_world_size()
    for buffer in module.buffers():
        if buffer.is_floating_point():
            torch.distributed.all_reduce(buffer, op=torch.distributed.ReduceOp.SUM)
            buffer.div_(world)


def cleanup_distributed() -> None:
    if is_distributed():
        torch.distributed.destroy_process_group()


# ---------------------------------------------------------------------------------------------------
# Random state: seeded once, reseeded per rank, saved in every checkpoint.
def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every GPU) so a run is repeatable on the same machine."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


RANK_SEED_STRIDE = 1_000_003


def seed_for_rank(rank: int) -> None:
    """Under DDP, after the model is built (or resumed): every generator of this process continues from a seed of
    its own, so the ranks' k-th images get different flips, crops, jitter, mixup draws and dropout masks. The
    base is drawn from the generator state all ranks share, so a resumed run gets new draws too; the sampler's
    permutation has its own generator (seed, epoch) and stays shared."""
    base = int(torch.randint(0, 2**31, (1,)).item())
    seed_everything((base + RANK_SEED_STRIDE * rank) % 2**32)


def seed_worker(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: give NumPy and `random` the per-worker, per-epoch seed torch chose."""
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


def rng_state() -> dict[str, Any]:
    """Every random generator's state, in types a weights_only checkpoint can hold."""
    np_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {**np_state, "state": {"key": np_state["state"]["key"].tolist(), "pos": np_state["state"]["pos"]}},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np_state = state["numpy"]
    np.random.set_state(
        {
            **np_state,
            "state": {"key": np.array(np_state["state"]["key"], dtype=np.uint32), "pos": np_state["state"]["pos"]},
        }
    )
    torch.set_rng_state(state["torch"])
    saved, present = list(state["cuda"] or []), torch.cuda.device_count() if torch.cuda.is_available() else 0
    for index, cuda_state in enumerate(saved[:present]):
        torch.cuda.set_rng_state(cuda_state, index)
    if saved and len(saved) != present:
        print(
            f"warning: the run saved the random state of {len(saved)} GPU(s) and {present} are visible now: the "
            f"first {min(len(saved), present)} are restored, so GPU-side random draws (dropout) differ from an "
            "uninterrupted run",
            file=sys.stderr,
        )


def set_deterministic(enabled: bool) -> None:
    """--deterministic: cuDNN and cuBLAS kernels that give the same result each time (atomics-based ones are
    not), so a resumed GPU run matches an uninterrupted one; an op without a deterministic kernel warns."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what cuBLAS needs to be deterministic
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = enabled, False
    torch.use_deterministic_algorithms(enabled, warn_only=True)

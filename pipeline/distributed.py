"""One build, several processes: the few torch.distributed helpers the runner and the training stages use.

A build joins a process group only when torchrun (or `edgesmith build --nproc N`, which calls torchrun) started
it, i.e. when WORLD_SIZE > 1 is in the environment. Otherwise every helper here is a cheap no-op that never imports
torch.distributed, so single-process code paths stay as they were. Backend: nccl on CUDA (one GPU per process,
cuda:LOCAL_RANK), gloo on CPU.

The split of work keeps a global batch exactly what it is in one process: every process draws the same seeded
permutation, takes its contiguous share of each global batch (`local_chunks`), and scales its mean loss so the
gradient DDP averages equals the gradient of the mean loss over the whole global batch.
"""

from __future__ import annotations

import math
import os
import signal
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator, Sequence

from .errors import DistributedError

# Test-only fault injection, e.g. EDGESMITH_TEST_FAULT=distill:1 makes rank 1 raise at the distill stage's first
# training step (used by tests/test_distributed.py to check that one rank's failure fails the whole build).
FAULT_ENV = "EDGESMITH_TEST_FAULT"
DEFAULT_TIMEOUT_MIN = 120.0


@dataclass(frozen=True)
class World:
    """This process's place in the launch (torchrun's environment variables)."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1
    local_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def world() -> World:
    env = os.environ
    if int(env.get("WORLD_SIZE", "1") or 1) <= 1:
        return World()
    size = int(env["WORLD_SIZE"])
    return World(int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), size, int(env.get("LOCAL_WORLD_SIZE", size)))


def is_main() -> bool:
    return world().main


def active() -> bool:
    """True inside a build's process group (several processes); False in a plain single-process build."""
    if not world().distributed:
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def device_name(resolved: str) -> str:
    """The device of this process: 'cuda' becomes cuda:LOCAL_RANK when several processes share a node."""
    w = world()
    return f"cuda:{w.local_rank}" if resolved == "cuda" and w.distributed else resolved


@contextmanager
def session(device: str, timeout_min: float | None = None) -> Iterator[World]:
    """Join the process group for the length of a build (no-op in a single process, or when already joined)."""
    w = world()
    if not w.distributed:
        yield w
        return
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        yield w
        return
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(gpu_of(w.local_rank, torch.cuda.device_count()))
    timeout = timedelta(minutes=timeout_min or float(os.environ.get("EDGESMITH_DIST_TIMEOUT_MIN", DEFAULT_TIMEOUT_MIN)))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout,
                            device_id=torch.device("cuda", w.local_rank) if cuda else None)
    # torchrun stops the surviving processes with SIGTERM when one fails: turn it into SystemExit so a
    # staging folder is removed on the way out instead of being left for the next build to sweep.
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        yield w
    except BaseException:
        raise                      # no destroy on failure: it can block on peers that are gone
    else:
        dist.destroy_process_group()
    finally:
        signal.signal(signal.SIGTERM, previous)


def gpu_of(local_rank: int, gpus: int) -> int:
    """The GPU of a process on a node with `gpus` GPUs: the one its local rank names (one GPU per process)."""
    if local_rank >= gpus:
        raise DistributedError(
            f"Process local rank {local_rank} needs a GPU of its own, but this node has {gpus} GPU(s): on CUDA every "
            "process of a node takes the GPU its local rank names.",
            f"Start at most {gpus} process(es) per node (--nproc, torchrun --nproc-per-node), or build on the CPU "
            "(build.device: cpu).")
    return local_rank


def _exit_on_sigterm(signum, _frame):
    raise SystemExit(128 + signum)


def _comm_device():
    """Where collective tensors must live: the process's GPU for nccl, the CPU for gloo."""
    import torch
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def barrier() -> None:
    if active():
        import torch.distributed as dist

        dist.barrier()


def broadcast_object(obj: Any = None, src: int = 0) -> Any:
    """The object of rank `src` on every process (picklable objects only)."""
    if not active():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    if not active():
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world().size
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum_(tensor):
    """Sum a tensor over all processes, in place (float64 stays float64); returns it."""
    if not active():
        return tensor
    import torch.distributed as dist

    device = _comm_device()
    moved = tensor.to(device)
    dist.all_reduce(moved, op=dist.ReduceOp.SUM)
    if moved is not tensor:
        tensor.copy_(moved)
    return tensor


def all_reduce_floats(values: dict[str, float]) -> dict[str, float]:
    """Sum a dict of Python numbers over all processes (same keys on every process), in float64."""
    if not active() or not values:
        return dict(values)
    import torch

    keys = sorted(values)
    summed = all_reduce_sum_(torch.tensor([float(values[k]) for k in keys], dtype=torch.float64))
    return dict(zip(keys, summed.tolist()))


def owns(number: int) -> bool:
    """Whether this process handles work item `number` when items are dealt out in turn (always, alone)."""
    w = world()
    return not active() or number % w.size == w.rank


def row_range(n: int) -> slice:
    """This process's contiguous share of n rows (shares differ by at most one row)."""
    w = world()
    return _range_of(w.rank, n, w.size)


def all_gather_rows(local, n: int, chunk_bytes: int = 64 << 20):
    """Concatenate every process's `row_range(n)` rows (on the CPU, in rank order): the full n-row tensor.
    Gathered in pieces of about `chunk_bytes` per process, so a large teacher cache never sits on a GPU whole."""
    if not active():
        return local
    import torch
    import torch.distributed as dist

    w, device = world(), _comm_device()
    sizes = [len(range(n)[_range_of(r, n, w.size)]) for r in range(w.size)]   # rank r holds sizes[r] rows
    longest = max(sizes)
    row_bytes = max(math.prod(local.shape[1:]) * local.element_size(), 1)
    step = max(1, chunk_bytes // row_bytes)
    gathered: list[list] = [[] for _ in range(w.size)]
    for start in range(0, longest, step):
        piece = torch.zeros((min(step, longest - start), *local.shape[1:]), dtype=local.dtype, device=device)
        mine = local[start:start + len(piece)]
        piece[: len(mine)] = mine.to(device)
        parts = [torch.empty_like(piece) for _ in range(w.size)]
        dist.all_gather(parts, piece)
        for rank, part in enumerate(parts):
            gathered[rank].append(part.cpu())
    return torch.cat([torch.cat(g)[:s] for g, s in zip(gathered, sizes)])


def _range_of(rank: int, n: int, size: int) -> slice:
    per, extra = divmod(n, size)
    start = rank * per + min(rank, extra)
    return slice(start, start + per + (rank < extra))


def local_chunks(idx, micro_batch: int | None = None) -> list[tuple[Any, float]]:
    """This process's part of one global batch `idx`, as micro-batches with the factor each one's MEAN loss is
    multiplied by: n_chunk * world_size / len(idx). DDP averages gradients over the processes, so the update equals
    the one-process gradient of the mean loss over the whole global batch, whatever the number of processes and
    micro-batches. One process without a micro-batch limit: [(idx, 1.0)], the plain training step.
    A process whose share is empty (a last global batch smaller than the number of processes) still runs one
    image with factor 0, so that it takes part in the gradient all-reduce."""
    w = world()
    share = idx[_range_of(w.rank, len(idx), w.size)] if w.distributed else idx
    if len(share) == 0:
        return [(idx[:1], 0.0)]
    size = micro_batch or len(share)
    chunks = [share[i:i + size] for i in range(0, len(share), size)]
    if len(chunks) == 1 and not w.distributed:
        return [(share, 1.0)]
    return [(c, len(c) * w.size / len(idx)) for c in chunks]


def sync_unless_last(model, last: bool):
    """DDP's no_sync() for every micro-batch but the last, so gradients are all-reduced once per global batch."""
    return nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()


def wrap_ddp(module, device, find_unused_parameters: bool = False):
    """DistributedDataParallel over `module` (every trainable part of one training step); the module itself
    when not distributed. Parameters are broadcast from rank 0 here, buffers (BatchNorm statistics) before each
    forward pass. `find_unused_parameters`: some steps leave parameters without a gradient (DDP then looks for
    them after each forward pass instead of waiting for their gradients)."""
    if not active():
        return module
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    cuda = device.type == "cuda"
    # A model kept on the CPU (the QAT loop) under nccl all-reduces through a gloo group: nccl needs GPU tensors.
    group = None if cuda or dist.get_backend() == "gloo" else _cpu_group()
    return DistributedDataParallel(module, device_ids=[device.index] if cuda else None, process_group=group,
                                   find_unused_parameters=find_unused_parameters)


_CPU_GROUP: list = []


def _cpu_group():
    import torch.distributed as dist

    if not _CPU_GROUP:
        _CPU_GROUP.append(dist.new_group(backend="gloo"))   # collective: every process gets here together
    return _CPU_GROUP[0]


def broadcast_buffers(module) -> None:
    """Give every process rank 0's buffers (BatchNorm running statistics, running means) before an evaluation."""
    if not active():
        return
    import torch.distributed as dist

    device = _comm_device()
    for buffer in module.buffers():
        moved = buffer.data.to(device)
        dist.broadcast(moved, src=0)
        if moved is not buffer.data:
            buffer.data.copy_(moved)


def check_shared_folder(folder) -> None:
    """Every process must see rank 0's cache folder (for several nodes: a shared filesystem)."""
    if not active():
        return
    import secrets
    import socket
    from pathlib import Path

    marker = Path(folder) / f".world-{broadcast_object(secrets.token_hex(8) if is_main() else None)}"
    if is_main():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("rank 0\n")
    barrier()
    seen = marker.exists()
    barrier()
    if is_main():
        marker.unlink(missing_ok=True)
    if not seen:
        raise DistributedError(
            f"Process rank {world().rank} on {socket.gethostname()} cannot see the build cache {folder} that rank 0 "
            "writes to.", "Put build.output on a filesystem that every node mounts at the same path (e.g. NFS).")


def fault_point(where: str) -> None:
    """Test-only hook: raise on the rank named by EDGESMITH_TEST_FAULT=<where>:<rank>."""
    spec = os.environ.get(FAULT_ENV)
    if spec and spec == f"{where}:{world().rank}":
        raise DistributedError(f"Test fault injected on rank {world().rank} at {where} ({FAULT_ENV}={spec}).",
                               f"Unset {FAULT_ENV}: it exists only for the distributed tests.")


def is_peer_loss(exc: BaseException) -> bool:
    """Whether an exception only says that another process went away (its own error is the one to report)."""
    if "torch.distributed" not in sys.modules:
        return False
    import torch.distributed as dist

    if isinstance(exc, dist.DistError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(s in text for s in ("Connection closed by peer", "Connection reset",
                                                                      "Broken pipe", "gloo", "NCCL"))


def record_failure(exc: BaseException) -> None:
    """Write the exception to torchrun's error file (TORCHELASTIC_ERROR_FILE), which the launcher reports."""
    if not world().distributed or not os.environ.get("TORCHELASTIC_ERROR_FILE"):
        return
    from torch.distributed.elastic.multiprocessing.errors import get_error_handler

    get_error_handler().record_exception(exc)


def launch(nproc: int, argv: Sequence[str]) -> tuple[int, int, str] | None:
    """Run `python -m pipeline.cli *argv` in `nproc` processes on this machine with torchrun (standalone
    rendezvous on a free local port). None when all succeed, else root_failure(): the failure to report."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc}", "--max-restarts=0",
                                         "--module", "pipeline.cli", *argv])
    try:
        run(args)
    except ChildFailedError as exc:
        return root_failure(exc)
    return None


def root_failure(exc) -> tuple[int, int, str]:
    """(rank, exit code, message) of the failure to report: the earliest one that wrote an error file (a process
    stopped because a peer failed writes none), else the earliest."""
    recorded = {r: f for r, f in exc.failures.items() if f.error_file and os.path.isfile(f.error_file)}
    pool = recorded or exc.failures
    rank = min(pool, key=lambda r: (pool[r].timestamp, r))
    failure = pool[rank]
    message = failure.message["message"] if isinstance(failure.message, dict) else str(failure.message)
    return rank, failure.exitcode, message

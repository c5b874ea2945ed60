"""The three collectives vocabulary-parallel cross-entropy needs, over MPI or torch.distributed.

The sharded composition talks to one small interface, ``Communicator``: an in-place all-reduce
(MAX or SUM) of a small float32/float64 NumPy array, and an all-gather of a few integers. One
adapter per engine implements it; each engine is imported only when a group of its kind is used:

    MPICommunicator     an mpi4py communicator (MPI.COMM_WORLD or any sub-communicator)
    TorchCommunicator   a torch.distributed process group (Gloo on CPU, NCCL on GPU)

Every adapter counts the payload bytes this rank hands to collectives (``bytes_sent``), which is
what the benchmark reports; what crosses the wire per rank depends on the engine's algorithm
(a ring all-reduce sends 2 (R - 1) / R times the payload).
"""

from __future__ import annotations

import sys
import weakref
from typing import Any, Sequence

import numpy as np


class Communicator:
    """What the sharded cross-entropy needs of a distributed engine.

    Attributes:
        rank: this process's index in the group, in [0, size).
        size: the number of processes in the group.
        group: the engine's own group object (the key under which a shard layout is cached).
        bytes_sent: payload bytes this rank has handed to collectives so far.
        collectives: collectives this rank has taken part in so far.
        verified_layout: this rank's shard layout once the group has checked the tiling.
    """

    rank: int
    size: int
    group: Any

    def __init__(self) -> None:
        self.bytes_sent = 0
        self.collectives = 0
        self.verified_layout = None

    def _count(self, nbytes: int) -> None:
        self.bytes_sent += int(nbytes)
        self.collectives += 1

    def allreduce_max(self, buffer: np.ndarray) -> np.ndarray:
        """Element-wise maximum over the group, in place; returns ``buffer``."""
        raise NotImplementedError

    def allreduce_sum(self, buffer: np.ndarray) -> np.ndarray:
        """Element-wise sum over the group, in place; returns ``buffer``."""
        raise NotImplementedError

    def allgather_ints(self, values: Sequence[int]) -> np.ndarray:
        """int64 (size, len(values)): row r holds rank r's values."""
        raise NotImplementedError

    def allreduce_sum_on_device(self, array: Any) -> bool:
        """Element-wise sum over the group of a device (CuPy) array, in place, where the array
        lies; False when this engine cannot, and the caller reduces a host copy instead."""
        return False


class MPICommunicator(Communicator):
    """An mpi4py communicator: buffer-based ``Allreduce``/``Allgather`` on NumPy arrays."""

    def __init__(self, comm: Any):
        super().__init__()
        from mpi4py import MPI

        self._mpi = MPI
        self.group = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()

    def _allreduce(self, buffer: np.ndarray, op: Any) -> np.ndarray:
        self._count(buffer.nbytes)
        self.group.Allreduce(self._mpi.IN_PLACE, buffer, op=op)
        return buffer

    def allreduce_max(self, buffer: np.ndarray) -> np.ndarray:
        return self._allreduce(buffer, self._mpi.MAX)

    def allreduce_sum(self, buffer: np.ndarray) -> np.ndarray:
        return self._allreduce(buffer, self._mpi.SUM)

    def allgather_ints(self, values: Sequence[int]) -> np.ndarray:
        mine = np.asarray(values, dtype=np.int64)
        gathered = np.empty((self.size, mine.shape[0]), dtype=np.int64)
        self._count(mine.nbytes)
        self.group.Allgather(mine, gathered)
        return gathered


class TorchCommunicator(Communicator):
    """A torch.distributed process group.

    Gloo reduces CPU tensors, so the NumPy buffer is shared with a tensor (no copy). NCCL reduces
    CUDA tensors only: the buffer is staged to the current CUDA device and back (O(rows) bytes).
    """

    def __init__(self, group: Any = None):
        super().__init__()
        import torch
        import torch.distributed as dist

        self._torch = torch
        self._dist = dist
        # Held weakly: a process group kept alive by this adapter past destroy_process_group()
        # would be destroyed at interpreter exit, where Gloo's destructor can abort the process.
        self._group_ref = weakref.ref(dist.group.WORLD if group is None else group)
        self.rank = dist.get_rank(self.group)
        self.size = dist.get_world_size(self.group)
        backend = str(dist.get_backend(self.group)).lower()
        # NCCL reduces CUDA memory only: host buffers are staged to the current CUDA device of
        # each call (not of the first call: a training script may set it after this adapter).
        self._nccl = "nccl" in backend

    @property
    def group(self) -> Any:
        """The process group, while it exists."""
        group = self._group_ref()
        if group is None:
            raise RuntimeError("fastxent: this torch.distributed process group no longer exists")
        return group

    def _allreduce(self, buffer: np.ndarray, op: Any) -> np.ndarray:
        self._count(buffer.nbytes)
        tensor = self._torch.from_numpy(buffer)
        if not self._nccl:
            self._dist.all_reduce(tensor, op=op, group=self.group)
        else:
            staged = tensor.to(self._staging_device())
            self._dist.all_reduce(staged, op=op, group=self.group)
            tensor.copy_(staged.cpu())
        return buffer

    def allreduce_max(self, buffer: np.ndarray) -> np.ndarray:
        return self._allreduce(buffer, self._dist.ReduceOp.MAX)

    def allreduce_sum(self, buffer: np.ndarray) -> np.ndarray:
        return self._allreduce(buffer, self._dist.ReduceOp.SUM)

    def _staging_device(self) -> Any:
        return self._torch.device("cuda", self._torch.cuda.current_device())

    def allreduce_sum_on_device(self, array: Any) -> bool:
        """NCCL sums a CUDA array where it lies (no host copies), ordered after the work of
        CuPy's current stream; Gloo sums arrays in host memory (the GPU emulator's). The array
        is shared with a tensor through DLPack."""
        torch = self._torch
        try:
            tensor = torch.from_dlpack(array)
        except (BufferError, RuntimeError, TypeError, ValueError):
            return False
        on_cuda = tensor.device.type == "cuda"
        if on_cuda != self._nccl:
            return False
        self._count(tensor.numel() * tensor.element_size())
        if not on_cuda:
            self._dist.all_reduce(tensor, op=self._dist.ReduceOp.SUM, group=self.group)
            return True
        import cupy

        # The collective waits for what CuPy's stream has queued (the dX GEMMs), and what is
        # queued on that stream afterwards waits for the collective.
        producer = torch.cuda.ExternalStream(cupy.cuda.get_current_stream().ptr, device=tensor.device)
        with torch.cuda.device(tensor.device), torch.cuda.stream(producer):
            self._dist.all_reduce(tensor, op=self._dist.ReduceOp.SUM, group=self.group)
        return True

    def allgather_ints(self, values: Sequence[int]) -> np.ndarray:
        device = self._staging_device() if self._nccl else None
        mine = self._torch.tensor(list(values), dtype=self._torch.int64, device=device)
        gathered = [self._torch.empty_like(mine) for _ in range(self.size)]
        self._count(mine.numel() * 8)
        self._dist.all_gather(gathered, mine, group=self.group)
        return np.stack([part.cpu().numpy() for part in gathered])


# One adapter per group object, so byte counters and the verified layout stay with the group.
# A torch group's entry goes when the group does (the adapter holds it weakly).
_ADAPTERS: dict = {}


def _torch_default_group_ready() -> bool:
    """Whether torch.distributed has a default group, without importing torch if it is not loaded."""
    dist = sys.modules.get("torch.distributed")
    return dist is not None and dist.is_available() and dist.is_initialized()


def communicator_for(group: Any = None) -> Communicator:
    """The adapter for ``group``: an mpi4py communicator, a torch.distributed process group,
    a ``Communicator``, or None (torch's default group when initialised, else MPI.COMM_WORLD)."""
    if isinstance(group, Communicator):
        return group
    if group is None:
        if _torch_default_group_ready():
            import torch.distributed as dist

            group = dist.group.WORLD
        else:
            try:
                from mpi4py import MPI
            except ImportError as error:
                raise ImportError(
                    "group=None uses torch.distributed's default group when it is initialised, "
                    "else MPI.COMM_WORLD, which needs mpi4py: `pip install fastxent[distributed]` "
                    "(mpi4py with the mpich wheel), or pass a torch.distributed process group"
                ) from error
            group = MPI.COMM_WORLD
    # Keyed by identity: an MPI entry holds its communicator, and a torch entry is removed when
    # its group dies, so an id is never reused while cached.
    cached = _ADAPTERS.get(id(group))
    if cached is not None and cached.group is group:
        return cached
    engine = type(group).__module__.split(".")[0]
    if engine == "mpi4py":
        adapter: Communicator = MPICommunicator(group)
    elif engine == "torch":
        adapter = TorchCommunicator(group)
    else:
        raise TypeError(
            "group must be an mpi4py communicator, a torch.distributed process group or None; "
            f"got {type(group).__module__}.{type(group).__qualname__}"
        )
    _ADAPTERS[id(group)] = adapter
    if engine == "torch":
        weakref.finalize(group, _ADAPTERS.pop, id(group), None)
    return adapter

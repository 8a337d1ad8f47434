"""How the ranks of a run are split: data parallel (dp) x sequence parallel (sp), and the DeviceMesh for it.

The mesh has two named dimensions, ``("dp", "sp")``, with sp innermost, so the ranks of one sequence-parallel
group are neighbours (on one node when sp <= GPUs per node, where their all-to-alls are cheapest). Ranks of
one SP group work on the same videos, so the data sampler splits the dataset over ``dp`` only.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

SEQUENCE_PARALLEL_TYPES = ("dsp", "ulysses")


@dataclass(frozen=True)
class ParallelDims:
    """Sizes of the parallel dimensions; ``world_size == dp * sp``.

    Build it from the process count with :meth:`for_world`, which names the flags in its errors.
    """

    dp: int
    sp: int = 1
    sp_type: str = "dsp"

    def __post_init__(self) -> None:
        if self.dp < 1:
            raise ValueError(f"data-parallel size must be >= 1, got {self.dp}")
        if self.sp < 1:
            raise ValueError(f"--sequence_parallel_size must be >= 1, got {self.sp}")
        if self.sp_type not in SEQUENCE_PARALLEL_TYPES:
            raise ValueError(
                f"--sequence_parallel_type must be one of {SEQUENCE_PARALLEL_TYPES}, got {self.sp_type!r}"
            )

    @classmethod
    def for_world(cls, world_size: int, sp: int = 1, sp_type: str = "dsp") -> "ParallelDims":
        """dp = world_size / sp; an error names the flag when the process count does not divide."""
        if sp < 1:
            raise ValueError(f"--sequence_parallel_size must be >= 1, got {sp}")
        if world_size % sp:
            raise ValueError(
                f"--sequence_parallel_size {sp} does not divide the number of processes {world_size} "
                f"(world size = data parallel x sequence parallel)"
            )
        return cls(dp=world_size // sp, sp=sp, sp_type=sp_type)

    @property
    def world_size(self) -> int:
        return self.dp * self.sp

    @property
    def sp_enabled(self) -> bool:
        return self.sp > 1

    def build_mesh(self, device_type: str) -> DeviceMesh:
        """A 2-D DeviceMesh ``("dp", "sp")`` over the initialised default process group."""
        return init_device_mesh(device_type, (self.dp, self.sp), mesh_dim_names=("dp", "sp"))

    def data_parallel_mesh(self, mesh: DeviceMesh) -> DeviceMesh:
        """The 1-D mesh that FSDP/DDP synchronise gradients over.

        Every rank holds the same weights whatever its SP coordinate, and every rank's backward produces
        gradient for them, so weights are sharded and gradients reduced over all dp x sp ranks (torchtitan
        does the same for context parallelism). With sp == 1 this is simply ``mesh["dp"]``.
        """
        if not self.sp_enabled:
            return mesh["dp"]
        return mesh["dp", "sp"]._flatten("dp_sp")

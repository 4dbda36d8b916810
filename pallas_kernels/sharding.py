"""A kernel call run once per shard of a mesh: batch and head dimensions split over mesh axes, under jax.shard_map.

A pallas_call is opaque to XLA's partitioner, which would gather sharded inputs onto every device and run the
whole kernel on each; under shard_map every device runs the kernel on its own rows and heads. All kernels here
are independent across batch rows and heads. Under GQA query head n reads kv head n // group, and splitting both
head axes into the same number of contiguous shards keeps each query head with its kv head.
"""

import dataclasses

import jax
from jax.sharding import AbstractMesh, Mesh, PartitionSpec

from errors import InputError

MeshAxes = str | tuple[str, ...] | None


@dataclasses.dataclass(frozen=True)
class KernelSharding:
    """Mesh axes the batch and the head dimensions are split over (None: not split); mesh=None takes the mesh
    set with `jax.set_mesh`."""

    batch: MeshAxes = None
    heads: MeshAxes = None
    mesh: Mesh | AbstractMesh | None = None

    def run(self, fn, inputs, out_roles, *, caller):
        """fn(*arrays) per shard. `inputs` maps each argument's name to (array, roles); `out_roles` is the roles of
        fn's one output, or a tuple of them for a tuple of outputs. Roles: a letter per dimension, "b" batch,
        "h" heads, "." not split."""
        mesh = self.mesh if self.mesh is not None else jax.sharding.get_abstract_mesh()
        axes = {"b": self.batch, "h": self.heads, ".": None}
        for role in ("b", "h"):
            for axis in _as_tuple(axes[role]):
                if axis not in mesh.axis_names:
                    raise InputError(
                        f"{caller}: sharding axis {axis!r} is not in the mesh axes {tuple(mesh.axis_names)}; pass "
                        "KernelSharding(mesh=...) or call under jax.set_mesh"
                    )
        for name, (array, roles) in inputs.items():
            for dim, role in enumerate(roles):
                shards = _num_shards(mesh, axes[role])
                if array.shape[dim] % shards:
                    raise InputError(
                        f"{caller}: {name} shape {tuple(array.shape)} dim {dim} is not divisible by the {shards} "
                        f"shards of mesh axes {axes[role]!r}"
                    )
        spec = lambda roles: PartitionSpec(*(axes[r] for r in roles))  # noqa: E731
        # check_vma=False: a pallas_call's out_shape carries no per-mesh-axis variance, which the check requires.
        return jax.shard_map(
            fn, mesh=self.mesh, check_vma=False,
            in_specs=tuple(spec(roles) for _, roles in inputs.values()),
            out_specs=spec(out_roles) if isinstance(out_roles, str) else tuple(spec(roles) for roles in out_roles),
        )(*(array for array, _ in inputs.values()))


def _as_tuple(axes: MeshAxes) -> tuple[str, ...]:
    return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def _num_shards(mesh, axes: MeshAxes) -> int:
    shards = 1
    for axis in _as_tuple(axes):
        shards *= mesh.shape[axis]
    return shards

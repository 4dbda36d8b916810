"""The device mesh (data, fsdp, tensor) and the logical-name shardings on it."""

import math

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging as absl_logging
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from errors import InputError
from pallas_kernels.sharding import KernelSharding

AXES = ("data", "fsdp", "tensor")
# The default table from the logical names that models annotate to the mesh axes; a config may replace it.
LOGICAL_AXIS_RULES = (
    ("act_batch", ("data", "fsdp")),
    ("act_len", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("cache_batch", ("data", "fsdp")),
    ("cache_heads", "tensor"),
    ("cache_len", None),
    ("cache_kv", None),
)


def mesh_shape(mesh_config: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
    """{axis: size} of config.mesh over num_devices devices, the one -1 resolved; a mismatch is one line."""
    sizes = [mesh_config[axis] for axis in AXES]
    shown = ", ".join(f"{axis}={size}" for axis, size in zip(AXES, sizes))
    if sizes.count(-1) > 1 or not all(isinstance(size, int) and (size > 0 or size == -1) for size in sizes):
        raise InputError(f"config.mesh ({shown}): sizes must be positive integers, with at most one -1")
    known = math.prod(size for size in sizes if size != -1)
    if -1 in sizes:
        if num_devices % known:
            raise InputError(f"config.mesh ({shown}): {num_devices} devices do not divide by the fixed sizes")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise InputError(f"config.mesh ({shown}): data*fsdp*tensor = {math.prod(sizes)} but {num_devices} devices "
                         "are present")
    return dict(zip(AXES, sizes))


def make_mesh(mesh_config: ml_collections.ConfigDict, devices=None) -> jax.sharding.Mesh:
    """A mesh over all devices (of every process); one axis size may be -1 to take what is left."""
    devices = jax.devices() if devices is None else devices
    sizes = list(mesh_shape(mesh_config, len(devices)).values())
    # Auto axes: the compiler propagates shardings from the logical annotations (GSPMD), as MaxText does.
    return jax.make_mesh(sizes, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def axis_rules(config: ml_collections.ConfigDict) -> tuple:
    """`config.logical_axis_rules` as nested tuples (hashable; command-line overrides may give lists)."""
    return tuple(tuple(rule) for rule in config.logical_axis_rules)


def make_mesh_for_present_devices(mesh_config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
    """`config.mesh` if it fits the devices present, else all of them data-parallel: evaluation of a pod run
    on one GPU keeps the pod's config."""
    try:
        return make_mesh(mesh_config)
    except InputError:
        absl_logging.info("config.mesh %s does not fit the %d devices present; evaluating data-parallel",
                          mesh_config.to_dict(), jax.device_count())
        return make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)))


def logical_shardings(logical_tree, mesh, rules):
    """NamedShardings for a tree of logical PartitionSpecs (or of values boxed with logical names)."""
    specs = nn.get_partition_spec(logical_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh, rules) -> NamedSharding:
    """How every array of a batch is laid out: its rows over the data-parallel axes, its other axes whole."""
    return NamedSharding(mesh, nn.logical_to_mesh_axes(("act_batch",), rules))


def global_batch(local_BT: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """Assembles the global batch from each process's rows (one process: the whole batch)."""
    return jax.make_array_from_process_local_data(sharding, local_BT)


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def strip_logical_names(tree):
    """The values inside logically-named boxes, without adding sharding constraints (safe outside jit)."""
    is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)
    return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if is_box(x) else x, tree, is_leaf=is_box)


def sharded_abstract(init_fn, *args, mesh, rules):
    """The shapes `init_fn(*args)` would return, each carrying the sharding its logical names map to, and
    those shardings; nothing is computed or allocated."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        abstract_boxed = jax.eval_shape(init_fn, *args)
    shardings = logical_shardings(abstract_boxed, mesh, rules)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            strip_logical_names(abstract_boxed), shardings)
    return abstract, shardings


def sharded_abstract_params(model, mesh, rules):
    """`sharded_abstract` of a models/ module's parameters: (abstract params, their NamedShardings)."""
    init_params = lambda rng: model.init(rng, *model.example_inputs())["params"]
    return sharded_abstract(init_params, jax.random.key(0), mesh=mesh, rules=rules)


def kernel_sharding(batch: str, heads: str, x_BH) -> KernelSharding | None:
    """How a Pallas kernel call (opaque to XLA's partitioner) on x (batch and heads its first two sizes) splits over
    the mesh of the enclosing trace: each dimension over the mesh axes its logical name maps to by the current
    rules, where they divide it (a batch of 1 at initialisation stays whole); None outside a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None

    def dividing(axes, size):
        return axes if size % math.prod(mesh.shape[axis] for axis in jax.tree.leaves(axes)) == 0 else None

    batch_axes, heads_axes = nn.logical_to_mesh_axes((batch, heads))
    return KernelSharding(batch=dividing(batch_axes, x_BH[0]), heads=dividing(heads_axes, x_BH[1]))

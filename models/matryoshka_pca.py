"""PCA initialisation of MatryoshkaKV's bases (models/matryoshka_kv.py) from calibration text.

The frozen, uncompressed model prefills calibration batches into its own KV cache, which holds exactly the
post-RoPE keys and the values the compressed layer would project, per layer and KV head; their first and second
moments are summed in float64. Then per head: mean mu, covariance E[x x^T] - mu mu^T, eigenvectors by descending
eigenvalue as U (the first r columns span the r-dimensional subspace keeping most variance), oriented for the
Cayley map (det +1, away from the eigenvalue -1) and inverted to the free parameter X:

  stats = matryoshka_pca.Moments.zeros(model.config)
  for tokens_BT in batches:
      stats = stats + matryoshka_pca.moments(model, params, tokens_BT)
  subtree = matryoshka_pca.pca_params(stats)               # {layer_i: {attention: {matryoshka_kv: {...}}}}
  params = matryoshka_pca.merged(params, subtree)          # for Model(Config(..., kv_rank=r))
  matryoshka_pca.save(path, subtree, stats); matryoshka_pca.load(path)

tools/matryoshka_pca.py runs this on config.data's train split and writes WORKDIR/matryoshka_kv.npz.
"""

import dataclasses
import os
import zipfile

import jax
import jax.numpy as jnp
import numpy as np

from errors import InputError
from models import matryoshka_kv

SUBTREE = matryoshka_kv.SUBTREE
_PARAMS = ("key_skew", "key_mean", "value_skew", "value_mean")


def base_model(model):
    """The same model without MatryoshkaKV: the frozen model whose keys and values are measured."""
    config = dataclasses.replace(model.config, kv_rank=0, kv_key_ranks=(), kv_value_ranks=(), kv_bases="")
    return type(model)(config)


def base_params(params):
    """params without any MatryoshkaKV subtree."""
    return {name: base_params(value) if isinstance(value, dict) else value
            for name, value in params.items() if name != SUBTREE}


@dataclasses.dataclass(frozen=True)
class Moments:
    """Sums over calibration tokens per softmax layer (None for the others): count, and for keys and values
    sum x [K, H] and sum x x^T [K, H, H], in float64."""

    count: int
    key_sum: tuple
    key_outer: tuple
    value_sum: tuple
    value_outer: tuple

    @classmethod
    def zeros(cls, config) -> "Moments":
        K, H = config.num_kv_heads, config.head_dim
        softmax = [config.mixer(i) == "softmax" for i in range(config.num_layers)]
        first = tuple(np.zeros((K, H)) if s else None for s in softmax)
        second = tuple(np.zeros((K, H, H)) if s else None for s in softmax)
        return cls(0, first, second, first, second)

    def __add__(self, other: "Moments") -> "Moments":
        add = lambda a, b: tuple(None if x is None else x + y for x, y in zip(a, b))  # noqa: E731
        return Moments(self.count + other.count, add(self.key_sum, other.key_sum),
                       add(self.key_outer, other.key_outer), add(self.value_sum, other.value_sum),
                       add(self.value_outer, other.value_outer))


def _cache_moments(model, params, tokens_BT, lengths_B):
    """Device-side sums of one batch: prefill into a cache as long as the batch, read the written entries."""
    B, T = tokens_BT.shape
    base = base_model(model)
    _, cache = base.apply({"params": base_params(params)}, tokens_BT, base.init_cache(B, T), lengths_B)
    valid_BS = (jnp.arange(T)[None, :] < lengths_B[:, None]).astype(jnp.float32)
    sums = []
    for layer in cache.layers:
        if not hasattr(layer, "k_BKSH"):  # a lightning layer: no keys and values to compress
            sums.append(None)
            continue
        per_layer = []
        for x_BKSH in (layer.k_BKSH, layer.v_BKSH):
            x_BKSH = x_BKSH.astype(jnp.float32) * valid_BS[:, None, :, None]
            per_layer.append((jnp.einsum("bksh->kh", x_BKSH),
                              jnp.einsum("bksh,bksi->khi", x_BKSH, x_BKSH, precision=jax.lax.Precision.HIGHEST)))
        sums.append(per_layer)
    return sums, lengths_B.sum()


_cache_moments_jit = jax.jit(_cache_moments, static_argnums=0)


def moments(model, params, tokens_BT, lengths_B=None) -> Moments:
    """The moments of one calibration batch [B, T] (row b's first lengths_B[b] tokens; default all) under the
    uncompressed version of `model` (its MatryoshkaKV parameters, if any, are ignored)."""
    tokens_BT = jnp.asarray(tokens_BT, jnp.int32)
    B, T = tokens_BT.shape
    lengths_B = jnp.full((B,), T, jnp.int32) if lengths_B is None else jnp.asarray(lengths_B, jnp.int32)
    sums, count = jax.device_get(_cache_moments_jit(model, params, tokens_BT, lengths_B))
    as64 = lambda which, part: tuple(None if s is None else np.asarray(s[which][part], np.float64)  # noqa: E731
                                     for s in sums)
    return Moments(int(count), as64(0, 0), as64(0, 1), as64(1, 0), as64(1, 1))


def principal_axes(count: int, sum_KH, outer_KHH):
    """(mean [K, H], basis [K, H, H] with columns by descending variance, eigenvalues [K, H] descending)."""
    mean_KH = sum_KH / count
    covariance_KHH = outer_KHH / count - np.einsum("kh,ki->khi", mean_KH, mean_KH)
    covariance_KHH = 0.5 * (covariance_KHH + np.swapaxes(covariance_KHH, -1, -2))
    eigenvalues_KH, vectors_KHH = np.linalg.eigh(covariance_KHH)  # ascending
    return mean_KH, vectors_KHH[..., ::-1], eigenvalues_KH[..., ::-1]


def pca_params(stats: Moments) -> dict:
    """The MatryoshkaKV parameters of every softmax layer, {layer_i: {attention: {matryoshka_kv: {...}}}}."""
    if stats.count == 0:
        raise InputError("matryoshka_pca: the calibration batches held 0 tokens; PCA needs at least one token of "
                         "calibration text (a corpus with non-empty documents)")
    tree = {}
    for i, key_sum in enumerate(stats.key_sum):
        if key_sum is None:
            continue
        if not all(np.isfinite(x).all() for x in (key_sum, stats.key_outer[i], stats.value_sum[i],
                                                  stats.value_outer[i])):
            raise InputError(f"matryoshka_pca: layer {i}'s calibration keys or values are not finite (tokens past "
                             "config.model.vocab_size, or a diverged checkpoint); PCA needs finite ones")
        subtree = {}
        for kind, sum_KH, outer_KHH in (("key", key_sum, stats.key_outer[i]),
                                        ("value", stats.value_sum[i], stats.value_outer[i])):
            mean_KH, basis_KHH, _ = principal_axes(stats.count, sum_KH, outer_KHH)
            x_KHH = matryoshka_kv.inverse_cayley(matryoshka_kv.orient_basis(basis_KHH))
            subtree[f"{kind}_skew"] = jnp.asarray(x_KHH, jnp.float32)
            subtree[f"{kind}_mean"] = jnp.asarray(mean_KH, jnp.float32)
        tree[f"layer_{i}"] = {"attention": {SUBTREE: subtree}}
    return tree


def merged(params, subtree) -> dict:
    """params with each layer's MatryoshkaKV parameters set from `subtree` (replacing any already there)."""
    params = dict(params)
    for layer, branch in subtree.items():
        attention = dict(params[layer]["attention"], **{SUBTREE: branch["attention"][SUBTREE]})
        params[layer] = dict(params[layer], attention=attention)
    return params


def save(path: str, subtree, stats: Moments | None = None) -> None:
    """The parameters as an .npz of '/'-joined names (and, given the moments, each head's eigenvalues as
    layer_i/attention/matryoshka_kv/{key,value}_eigenvalues and the token count: what a rate search reads)."""
    arrays = {f"{layer}/attention/{SUBTREE}/{name}": np.asarray(branch["attention"][SUBTREE][name])
              for layer, branch in subtree.items() for name in _PARAMS}
    if stats is not None:
        arrays["calibration_tokens"] = np.asarray(stats.count)
        for i, key_sum in enumerate(stats.key_sum):
            if key_sum is not None:
                for kind, s, o in (("key", key_sum, stats.key_outer[i]),
                                   ("value", stats.value_sum[i], stats.value_outer[i])):
                    arrays[f"layer_{i}/attention/{SUBTREE}/{kind}_eigenvalues"] = principal_axes(stats.count, s, o)[2]
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def load(path: str, expected=None, key: str = "config.model.kv_bases") -> dict:
    """The parameter subtree `save` wrote (eigenvalues and counts left out). With `expected` (a subtree of arrays
    or shapes, {layer_i: {attention: {matryoshka_kv: {...}}}}) the file must hold exactly its names and shapes; a
    missing, unreadable or mismatched file is a one-line InputError naming `key` and the path."""
    where = f"{key}={path!r}"
    what = "a MatryoshkaKV file (tools/matryoshka_pca.py's matryoshka_kv.npz)"
    if not os.path.isfile(path):
        raise InputError(f"{where} is not a file; expected {what}")
    try:
        tree = _read(path)
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise InputError(f"{where} is not {what}: {type(error).__name__}") from None
    if expected is None:
        return tree
    saved = {f"{layer}/{name}": tuple(x.shape) for layer, branch in tree.items()
             for name, x in branch["attention"][SUBTREE].items()}
    wanted = {f"{layer}/{name}": tuple(np.shape(x)) for layer, branch in expected.items()
              for name, x in branch["attention"][SUBTREE].items()}
    for name in sorted(set(saved) | set(wanted)):
        if name not in saved:
            raise InputError(f"{where} does not match config.model: it has no {name}; expected {what} measured "
                             "on this model")
        if name not in wanted:
            raise InputError(f"{where} does not match config.model: its {name} has no place in the model (a "
                             "softmax layer's MatryoshkaKV parameters expected)")
        if saved[name] != wanted[name]:
            raise InputError(f"{where} does not match config.model: {name} has shape {saved[name]} in the file, "
                             f"{wanted[name]} in the model")
    return tree


def _read(path: str) -> dict:
    tree = {}
    with np.load(path) as arrays:
        for name in arrays.files:
            parts = name.split("/")
            if len(parts) == 4 and parts[3] in _PARAMS:
                branch = tree.setdefault(parts[0], {"attention": {SUBTREE: {}}})["attention"][SUBTREE]
                branch[parts[3]] = jnp.asarray(arrays[name], jnp.float32)
    return tree

"""MatryoshkaKV (Lin et al., arXiv 2410.14731): each KV head's keys and values cached in the first r columns of
a trainable orthogonal basis, so the cache holds r <= head_dim numbers per head and token instead of head_dim.

Per layer and KV head there is an orthogonal U (head_dim x head_dim) and a mean for keys and for values. Keys are
projected after RoPE (the rotation depends on the position, so a basis fixed before it would not stay fixed):

  cached keys    K~ = (K - mu_k) U_k[:, :r]        queries   Q~ = Q U_k[:, :r]
  cached values  V~ = (V - mu_v) U_v[:, :r]        output    softmax(Q~ K~^T / sqrt(head_dim)) V~ U_v[:, :r]^T + mu_v

The query dropped the key mean: Q mu_k^T is the same for every key of a query, so the softmax never sees it. The
softmax weights sum to one, so adding mu_v after the weighted sum equals adding it to every value. At r = head_dim
the layer is the uncompressed one. The columns are nested ("Matryoshka"): one U serves every r, and each head may
keep its own rank; storage is padded to one width (kv_rank) and the columns past a head's rank are zeroed by a
mask, which zeroes their contribution to both the logits and the output.

U is parameterised by the Cayley transform U = (I - A/2)^-1 (I + A/2) of the skew-symmetric A = X - X^T, so a
gradient step on the free X keeps U orthogonal; X = 0 is U = I. The Cayley map reaches only rotations (det +1),
hence `orient_basis` before `inverse_cayley` for a PCA basis (models/matryoshka_pca.py).

Parameters (the `matryoshka_kv` subtree of a softmax attention layer, present only when config.model.kv_rank > 0,
so checkpoints and the Hugging Face and GGUF loaders of uncompressed models are untouched):
  key_skew, value_skew   [kv_heads, head_dim, head_dim]  X of the Cayley map
  key_mean, value_mean   [kv_heads, head_dim]            mu

Decoding runs the decode form instead (decode_form, once per set of parameters: the decode engine's place_params):
key_basis and value_basis [kv_heads, head_dim, kv_rank], the Cayley map evaluated and each head's columns past its
rank zeroed, so no step of the decode loop solves a linear system; and U_v^T and mu_v folded into the attention's
output projection (out_kernel [num_heads, kv_rank, embed], out_bias [embed]), so `expand` disappears.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from errors import InputError, checks

SUBTREE = "matryoshka_kv"  # the parameter subtree of each softmax attention layer
RANKS = "matryoshka_ranks"  # the variable collection of traced per-head ranks (MatryoshkaKV._ranks)


def checked_ranks(cfg, name: str) -> tuple:
    """config.model.kv_rank checked against head_dim, and config.model.<name> (kv_key_ranks or kv_value_ranks)
    against it, as a tuple; one-line InputErrors naming the key, the value and what is allowed."""
    if not checks.is_int(cfg.kv_rank) or not 0 <= cfg.kv_rank <= cfg.head_dim:
        raise InputError(f"config.model.kv_rank={cfg.kv_rank!r} must be an integer in [0, {cfg.head_dim}] "
                         f"(0: no compression; at most config.model.head_dim={cfg.head_dim})")
    ranks, count = getattr(cfg, name), cfg.num_layers * cfg.num_kv_heads
    allowed = (f"{count} integers (num_layers * num_kv_heads, layer-major) in [1, config.model.kv_rank="
               f"{cfg.kv_rank}], or () for kv_rank everywhere")
    if not isinstance(ranks, (tuple, list)):
        raise InputError(f"config.model.{name}={ranks!r} must be {allowed}")
    ranks = tuple(ranks)
    if ranks and not cfg.kv_rank:
        raise InputError(f"config.model.{name}={ranks!r} needs config.model.kv_rank > 0 (the cached width)")
    if ranks and (len(ranks) != count or not all(checks.is_int(r) and 1 <= r <= cfg.kv_rank for r in ranks)):
        raise InputError(f"config.model.{name}={ranks!r} must be {allowed}")
    return ranks


def cayley(x_KHH):
    """The orthogonal (I - A/2)^-1 (I + A/2), A = X - X^T, for each matrix of a stack [..., H, H] (float32)."""
    x_KHH = x_KHH.astype(jnp.float32)
    a_KHH = x_KHH - jnp.swapaxes(x_KHH, -1, -2)
    eye_KHH = jnp.broadcast_to(jnp.eye(x_KHH.shape[-1], dtype=jnp.float32), a_KHH.shape)
    return _solve_without_pivoting(eye_KHH - 0.5 * a_KHH, eye_KHH + 0.5 * a_KHH)


def _solve_without_pivoting(m_KHH, b_KHH):
    """m^-1 b by Gauss-Jordan elimination in plain jnp, for m whose symmetric part is positive definite, as
    I - A/2 with A skew-symmetric (its symmetric part is I): every pivot is then positive and elimination needs no
    row exchanges. Not jnp.linalg.solve: XLA:CPU runs the layers' batched LAPACK getrf calls concurrently, and each
    waits for the same intra-op thread pool, which deadlocks a 2-core machine mid-training (jaxlib 0.10)."""
    H = m_KHH.shape[-1]

    def eliminate(i, augmented_KHW):
        pivot_row_KW = augmented_KHW[..., i, :] / augmented_KHW[..., i, i][..., None]
        augmented_KHW = augmented_KHW - augmented_KHW[..., :, i][..., :, None] * pivot_row_KW[..., None, :]
        return augmented_KHW.at[..., i, :].set(pivot_row_KW)

    augmented_KHW = jax.lax.fori_loop(0, H, eliminate, jnp.concatenate([m_KHH, b_KHH], axis=-1))
    return augmented_KHW[..., H:]


def inverse_cayley(u_KHH) -> np.ndarray:
    """An X with cayley(X) = U for rotations U [..., H, H] (float64 numpy): from U (I - A/2) = I + A/2,
    A = 2 (U + I)^-1 (U - I) (the two factors commute), skew-symmetric; X = A / 2 gives X - X^T = A.
    U must have no eigenvalue -1 (near one A blows up): orient_basis keeps PCA bases away from that."""
    u_KHH = np.asarray(u_KHH, np.float64)
    eye_HH = np.eye(u_KHH.shape[-1])
    a_KHH = 2.0 * np.linalg.solve(u_KHH + eye_HH, u_KHH - eye_HH)
    a_KHH = 0.5 * (a_KHH - np.swapaxes(a_KHH, -1, -2))  # exactly skew-symmetric despite rounding
    return 0.5 * a_KHH


def orient_basis(u_KHH, max_flips: int | None = None) -> np.ndarray:
    """Orthonormal bases [..., H, H] (columns) with column signs the Cayley map reaches well. A column's sign
    changes nothing for PCA, whose subspaces are what count, but it decides det U and how near U comes to the
    eigenvalue -1, where the inverse map diverges (an eigenvalue at angle pi - 1e-3 gives |X| ~ 600 and a float32
    Cayley map off by 1e-4). Diagonal entries are made >= 0, a basis with det -1 gets its first column negated,
    then pairs of columns (which keep det +1) are negated while that grows |det(U + I)| = prod |1 + lambda|."""
    u_KHH = np.array(u_KHH, np.float64)
    signs_KH = np.where(np.diagonal(u_KHH, axis1=-2, axis2=-1) < 0, -1.0, 1.0)
    u_KHH = u_KHH * signs_KH[..., None, :]
    u_KHH[..., :, 0] *= np.sign(np.linalg.det(u_KHH))[..., None]
    flat_KHH = u_KHH.reshape(-1, *u_KHH.shape[-2:])
    for u_HH in flat_KHH:
        _flip_pairs_away_from_minus_one(u_HH, 2 * u_HH.shape[0] if max_flips is None else max_flips)
    return flat_KHH.reshape(u_KHH.shape)


def _flip_pairs_away_from_minus_one(u_HH, max_flips: int):
    """Greedily negates column pairs (j, k) of u_HH in place. Negating both is the rank-2 update U + I - 2 [u_j,
    u_k] [e_j, e_k]^T, so with W = (U + I)^-1 U det(U + I) scales by (1 - 2 W_jj)(1 - 2 W_kk) - 4 W_jk W_kj:
    every pair is scored from one solve."""
    eye_HH = np.eye(u_HH.shape[0])
    for _ in range(max_flips):
        w_HH = np.linalg.solve(u_HH + eye_HH, u_HH)
        d_H = 1.0 - 2.0 * np.diagonal(w_HH)
        gain_HH = np.abs(np.outer(d_H, d_H) - 4.0 * w_HH * w_HH.T)
        np.fill_diagonal(gain_HH, 0.0)
        j, k = np.unravel_index(np.argmax(gain_HH), gain_HH.shape)
        if gain_HH[j, k] <= 1.0 + 1e-9:
            return
        u_HH[:, [j, k]] *= -1.0


def column_mask(ranks_K, width: int):
    """[K, width] True for the columns a head keeps (those below its rank). ranks_K may be traced."""
    return jnp.arange(width)[None, :] < jnp.asarray(ranks_K)[:, None]


def ranks_collection(layers, key_ranks_LK, value_ranks_LK) -> dict:
    """The RANKS collection giving softmax layers `layers` (their indices) the key and value ranks [L, K] (int32,
    may be traced) in place of their static ones."""
    return {f"layer_{i}": {"attention": {SUBTREE: {"key_ranks": key_ranks_LK[j], "value_ranks": value_ranks_LK[j]}}}
            for j, i in enumerate(layers)}


class MatryoshkaKV(nn.Module):
    """One attention layer's key and value bases: `compress` maps post-RoPE q, k, v to kv_rank columns, `expand`
    maps attention's output back to head_dim. Attention between the two is unchanged (models/attention.py)."""

    num_kv_heads: int
    head_dim: int
    kv_rank: int  # cached columns per head (the padded width)
    key_ranks: tuple  # per KV head, each <= kv_rank
    value_ranks: tuple
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        K, H, R = self.num_kv_heads, self.head_dim, self.kv_rank

        def param(name, init, shape, axes):
            return self.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)

        self.key_mean = param("key_mean", nn.initializers.zeros, (K, H), ("kv_heads", "kv"))
        self.value_mean = param("value_mean", nn.initializers.zeros, (K, H), ("kv_heads", "kv"))
        # The basis's column axis has no logical name: the same name twice in one parameter cannot be sharded.
        if self.is_decode_form():
            self.key_basis = param("key_basis", nn.initializers.zeros, (K, H, R), ("kv_heads", "kv", None))
            self.value_basis = param("value_basis", nn.initializers.zeros, (K, H, R), ("kv_heads", "kv", None))
        else:  # zeros: U = I and mu = 0, the uncompressed layer at kv_rank = head_dim
            self.key_skew = param("key_skew", nn.initializers.zeros, (K, H, H), ("kv_heads", "kv", None))
            self.value_skew = param("value_skew", nn.initializers.zeros, (K, H, H), ("kv_heads", "kv", None))

    def is_decode_form(self) -> bool:
        """Whether the parameters are decode_form's (fixed bases) rather than the trainable skew matrices."""
        return self.has_variable("params", "key_basis")

    def bases(self):
        """U_k[:, :kv_rank] and U_v[:, :kv_rank], [K, H, R] float32 (the columns past each head's rank are zero in
        the decode form and masked by `compress` in both)."""
        if self.is_decode_form():
            return self.key_basis, self.value_basis
        R = self.kv_rank
        return cayley(self.key_skew)[..., :R], cayley(self.value_skew)[..., :R]

    def _ranks(self, kind: str):
        """The static per-head ranks, or [K] int32 arrays given in the RANKS collection: a forward without a cache
        at ranks that change without recompiling (the rate search, models/matryoshka_rates.py). A cache keeps the
        static ranks (its decode kernel masks by them), so only the static ones serve decoding."""
        if self.has_variable(RANKS, f"{kind}_ranks"):
            return self.get_variable(RANKS, f"{kind}_ranks")
        return getattr(self, f"{kind}_ranks")

    def compress(self, q_BTNH, k_BTKH, v_BTKH):
        """(queries [B, T, N, R], keys and values [B, T, K, R]) in each head's basis, keys and values masked to
        its rank. The queries are scaled by sqrt(R / H): attention scales logits by the width it sees, R^-0.5,
        and the uncompressed layer's H^-0.5 is what the model was trained with."""
        B, T, N, H = q_BTNH.shape
        K, R = self.num_kv_heads, self.kv_rank
        u_k_KHR, u_v_KHR = self.bases()
        key_mask_KR = column_mask(self._ranks("key"), R)
        value_mask_KR = column_mask(self._ranks("value"), R)
        k_BTKR = jnp.einsum("btkh,khr->btkr", k_BTKH - self.key_mean.astype(k_BTKH.dtype)[None, None],
                            u_k_KHR.astype(self.dtype))
        v_BTKR = jnp.einsum("btkh,khr->btkr", v_BTKH - self.value_mean.astype(v_BTKH.dtype)[None, None],
                            u_v_KHR.astype(self.dtype))
        k_BTKR = jnp.where(key_mask_KR[None, None], k_BTKR, 0).astype(k_BTKH.dtype)
        v_BTKR = jnp.where(value_mask_KR[None, None], v_BTKR, 0).astype(v_BTKH.dtype)
        # Query heads n = k * G + g read KV head k (models/attention.py's grouping).
        q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
        q_BTKGR = jnp.einsum("btkgh,khr->btkgr", q_BTKGH, (u_k_KHR * (R / H) ** 0.5).astype(self.dtype))
        return q_BTKGR.reshape(B, T, N, R).astype(q_BTNH.dtype), k_BTKR, v_BTKR

    def expand(self, o_BTNR):
        """Attention's output per query head back in head_dim coordinates: o U_v[:, :R]^T + mu_v (the training
        form; the decode form has it folded into the output projection)."""
        B, T, N, R = o_BTNR.shape
        K, H = self.num_kv_heads, self.head_dim
        _, u_v_KHR = self.bases()
        o_BTKGR = o_BTNR.reshape(B, T, K, N // K, R)
        o_BTKGH = jnp.einsum("btkgr,khr->btkgh", o_BTKGR, u_v_KHR.astype(self.dtype))
        o_BTKGH = o_BTKGH + self.value_mean.astype(self.dtype)[None, None, :, None]
        return o_BTKGH.reshape(B, T, N, H).astype(o_BTNR.dtype)


def decode_form(subtree: dict, out_kernel_NHD, key_ranks, value_ranks, kv_rank: int) -> tuple[dict, dict]:
    """One layer's training-form MatryoshkaKV parameters (key_skew, value_skew, key_mean, value_mean) and output
    projection [N, H, D] -> (the decode form's subtree, {out_kernel [N, R, D], out_bias [D]}): U[:, :R] with each
    head's columns past its rank zeroed, and W'_n = U_v[:, :R]^T W_n, b = sum_n mu_v W_n for query head n of KV head
    n // (N / K) (attention's output is o W' + b = (o U_v^T + mu_v) W)."""
    N, H, D = out_kernel_NHD.shape
    K = subtree["value_skew"].shape[0]
    key_basis_KHR = cayley(subtree["key_skew"])[..., :kv_rank] * column_mask(key_ranks, kv_rank)[:, None, :]
    value_basis_KHR = cayley(subtree["value_skew"])[..., :kv_rank] * column_mask(value_ranks, kv_rank)[:, None, :]
    kernel_KGHD = out_kernel_NHD.astype(jnp.float32).reshape(K, N // K, H, D)
    folded_NRD = jnp.einsum("khr,kghd->kgrd", value_basis_KHR, kernel_KGHD).reshape(N, kv_rank, D)
    bias_D = jnp.einsum("kh,kghd->d", subtree["value_mean"].astype(jnp.float32), kernel_KGHD)
    fixed = {"key_basis": key_basis_KHR, "key_mean": subtree["key_mean"], "value_basis": value_basis_KHR,
             "value_mean": subtree["value_mean"]}
    return fixed, {"out_kernel": folded_NRD, "out_bias": bias_D}

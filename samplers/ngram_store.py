"""N-gram counts for Superposed Decoding, built on the host and looked up inside the jitted decode step.

The reference implementation (RAIVNLab/SuperposedDecoding, `superposed/ngrams/`) keeps one Python dict per order,
`{context: {next_token: count}}`, counted within documents, and answers
`count(context, token) / sum(count(context, .))`, or -1 when the context was never seen. This module keeps the same
counts as one sorted array, so the sampler can ask about the M candidate tokens of every draft with a binary search
on the accelerator instead of Python loops.

Layout: one row per distinct (context, next token) over all orders, sorted by key_R3 = (context_hi, context_lo, token):
  key_R3     uint32 (R, 3)  two 32-bit hashes of the context (together a 64-bit key; they include the context
                            length, so contexts of different orders never share a key), and the next token
  counts_R2  int32 (R, 2)   count(context, token), and count(context, .) = the sum of the first over the context's rows
Rows of one context are contiguous, so a single lower-bound search for (context, token) finds both counts. The last
row is a sentinel (all-ones key, zero counts) that sorts after every real row, so a search never runs off the end.
  bucket_start_P1 int32 (2^bits + 1)  first row of each bucket of context_hi's top `bits` bits (a radix index):
                            hashes spread rows evenly, so a search reads one bucket start and then binary-searches a
                            few rows (~8 on average) instead of ~24 random rows of the whole table.

Hashes: the two halves come from two different 32-bit mixers (a MurmurHash3 round and an xxHash32-style round),
written once over uint32 arithmetic and run by numpy on the host and by jnp on the device, so they agree bit for bit on
any machine without jax_enable_x64. Contexts are fed most recent token first, so the (n-1)-token context's hash state
extends the (n-2)-token one by one older token. Collision risk, taking the pair as a 64-bit hash: with U distinct
contexts (all orders), the chance that any two share a key is about U^2 / 2^65 (~7e-5 at U = 5e7), and an unseen
context aliases a stored one with probability about U / 2^64 per lookup. A collision merges two contexts' counts;
tokens are stored exactly, never hashed.
"""

import os
import time
from collections.abc import Iterable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from errors import InputError

BUILD_COMMAND = "python tools/build_ngrams.py --config=CONFIG --workdir=WORKDIR"
DEFAULT_ORDERS = (2, 3, 4, 5, 6)
# The reference's `i_weights` for bigram..6-gram; unnormalised (sum 0.5), kept as is.
REFERENCE_WEIGHTS = (0.01, 0.04, 0.15, 0.18, 0.12)
# Bumped whenever the hash or the layout changes, so stale files are rejected instead of silently missing.
FORMAT_VERSION = 2
_ROWS_PER_BUCKET = 8  # average bucket size the radix index aims for
_MAX_BUCKET_BITS = 22  # at most 4M buckets, a 16 MB index

_INT32_MAX = np.iinfo(np.int32).max
_UINT32_MAX = np.iinfo(np.uint32).max


@flax.struct.dataclass
class NgramStore:
    """Counts of every n-gram of `orders` in one sorted table; see the module docstring for the layout.

    `build_ngram_store` and `load_ngram_store` return numpy arrays; call `jax.device_put(store)` once before the decode
    loop so a jitted step does not copy the table to the device on every call.
    """

    key_R3: jax.Array  # uint32 (context_hi, context_lo, token), rows sorted lexicographically
    counts_R2: jax.Array  # int32 (count(context, token), count(context, .))
    bucket_start_P1: jax.Array  # int32 first row of each context_hi bucket, and R at the end
    orders: tuple[int, ...] = flax.struct.field(pytree_node=False)
    bucket_bits: int = flax.struct.field(pytree_node=False)
    bucket_steps: int = flax.struct.field(pytree_node=False)  # binary-search steps that cover the largest bucket
    rows_per_order: tuple[int, ...] = flax.struct.field(pytree_node=False)  # without the sentinel
    num_tokens: int = flax.struct.field(pytree_node=False)
    vocab_size: int = flax.struct.field(pytree_node=False)


# ---------------------------------------------------------------------------------------------------------------------
# Hashing: the same uint32 code for numpy (build) and jnp (lookup); `xp` is the array module.

def _rotl(x, r: int, xp):
    return (x << xp.uint32(r)) | (x >> xp.uint32(32 - r))


def _fmix32(h, xp):
    """MurmurHash3's finaliser: every input bit affects every output bit."""
    h = h ^ (h >> xp.uint32(16))
    h = h * xp.uint32(0x85EBCA6B)
    h = h ^ (h >> xp.uint32(13))
    h = h * xp.uint32(0xC2B2AE35)
    return h ^ (h >> xp.uint32(16))


def _initial_state(shape, xp):
    return xp.full(shape, 0x9747B28C, xp.uint32), xp.full(shape, 0x165667B1, xp.uint32)


def _absorb(state_hi, state_lo, token, xp):
    """Feeds one (older) context token into both hash states; token is uint32."""
    k = _rotl(token * xp.uint32(0xCC9E2D51), 15, xp) * xp.uint32(0x1B873593)
    state_hi = _rotl(state_hi ^ k, 13, xp) * xp.uint32(5) + xp.uint32(0xE6546B64)
    state_lo = _rotl(state_lo + token * xp.uint32(0x85EBCA77), 13, xp) * xp.uint32(0x9E3779B1)
    return state_hi, state_lo


def _finalize(state_hi, state_lo, context_len: int, xp):
    return _fmix32(state_hi ^ xp.uint32(context_len), xp), _fmix32(state_lo ^ xp.uint32(context_len), xp)


def hash_context(context: Sequence[int]) -> tuple[int, int]:
    """(hi, lo) key of one context, oldest token first; the host-side definition the tables are built with."""
    # numpy warns on scalar uint32 overflow; the wrap-around is the point.
    with np.errstate(over="ignore"):
        state = _initial_state((), np)
        for tok in reversed(context):
            state = _absorb(*state, np.uint32(tok), np)
        hi, lo = _finalize(*state, len(context), np)
    return int(hi), int(lo)


# ---------------------------------------------------------------------------------------------------------------------
# Build, save, load (host).

def _check_orders(orders) -> tuple[int, ...]:
    orders = tuple(int(n) for n in orders)
    if not orders or list(orders) != sorted(set(orders)) or orders[0] < 2:
        raise InputError(f"n-gram orders must be distinct increasing integers >= 2, e.g. (2, 3, 4, 5, 6); got {orders}")
    return orders


def _count_order(hi_N, lo_N, token_N, vocab_size: int):
    """(key64_R, token_R, counts_R2): unique (context, token) rows of one order, sorted by (key64, token)."""
    key_N = (hi_N.astype(np.uint64) << np.uint64(32)) | lo_N.astype(np.uint64)
    context_keys_U, context_id_N, context_count_U = np.unique(key_N, return_inverse=True, return_counts=True)
    # Dense context rank * vocab + token sorts exactly as (key64, token), in one int64 sort.
    pair_R, count_R = np.unique(context_id_N.astype(np.int64) * vocab_size + token_N, return_counts=True)
    context_id_R = pair_R // vocab_size
    if context_count_U.size and context_count_U.max() > _INT32_MAX:
        raise ValueError("an n-gram context occurs more than 2^31 times; int32 counts would overflow")
    counts_R2 = np.stack([count_R, context_count_U[context_id_R]], axis=1).astype(np.int32)
    return context_keys_U[context_id_R], (pair_R % vocab_size).astype(np.uint32), counts_R2


def build_ngram_store(token_sequences: Iterable[np.ndarray], orders: Sequence[int] = DEFAULT_ORDERS,
                      vocab_size: int | None = None) -> NgramStore:
    """Counts every n-gram of `orders` inside each document (token-id array); n-grams never cross documents.

    Windows are counted as the reference's `make_corpus.py` does: for each token after a document's first, one
    (context, token) per order whose context fits in the document. vocab_size is metadata (the tokenizer's); it
    defaults to the largest token id + 1.
    """
    orders = _check_orders(orders)
    docs = [np.asarray(d).reshape(-1) for d in token_sequences]
    tokens_N = np.concatenate(docs).astype(np.int64) if docs else np.zeros(0, np.int64)
    if tokens_N.size and (tokens_N.min() < 0 or tokens_N.max() >= _INT32_MAX):
        raise InputError(f"token ids must be in [0, 2^31 - 1) to build n-grams; got range "
                         f"[{tokens_N.min()}, {tokens_N.max()}]")
    max_id = int(tokens_N.max()) + 1 if tokens_N.size else 1
    if vocab_size is None:
        vocab_size = max_id
    elif vocab_size < max_id:
        raise InputError(f"vocab_size {vocab_size} is smaller than the largest token id + 1 ({max_id})")
    lengths = np.array([d.size for d in docs], np.int64)
    # Position of each token inside its document: the window ending at e with k context tokens is valid iff pos >= k.
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    pos_in_doc_N = np.arange(tokens_N.size, dtype=np.int64) - starts
    tokens_u32_N = tokens_N.astype(np.uint32)

    # state_*[e] hashes the k tokens before e (most recent first), grown by one older token per step.
    state_hi, state_lo = _initial_state(tokens_N.shape, np)
    keys, tokens, counts, rows_per_order = [], [], [], []
    for k in range(1, orders[-1]):
        # Windows reaching past the array start read wrapped-around tokens; they have pos < k and are dropped below.
        state_hi, state_lo = _absorb(state_hi, state_lo, np.roll(tokens_u32_N, k), np)
        if k + 1 not in orders:
            continue
        valid_N = pos_in_doc_N >= k
        hi, lo = _finalize(state_hi[valid_N], state_lo[valid_N], k, np)
        key_R, token_R, counts_R2 = _count_order(hi, lo, tokens_N[valid_N], max_id)
        keys.append(key_R), tokens.append(token_R), counts.append(counts_R2), rows_per_order.append(key_R.size)
    # The sentinel (all-ones key, token UINT32_MAX) sorts after every real row; its zero counts mean "unseen".
    keys.append(np.full(1, np.iinfo(np.uint64).max, np.uint64))
    tokens.append(np.full(1, _UINT32_MAX, np.uint32))
    counts.append(np.zeros((1, 2), np.int32))
    key_R = np.concatenate(keys)
    # Each context's rows lie in one order's run, already sorted by token, so a stable sort on the context key alone
    # gives (context, token) order; timsort merges the per-order runs cheaply.
    perm_R = np.argsort(key_R, kind="stable")
    key_R3 = np.stack([(key_R >> np.uint64(32)).astype(np.uint32), (key_R & np.uint64(_UINT32_MAX)).astype(np.uint32),
                       np.concatenate(tokens)], axis=1)[perm_R]
    return _with_index(key_R3, np.concatenate(counts)[perm_R], orders=orders, rows_per_order=tuple(rows_per_order),
                       num_tokens=int(tokens_N.size), vocab_size=int(vocab_size))


def _with_index(key_R3: np.ndarray, counts_R2: np.ndarray, **metadata) -> NgramStore:
    """The store with its radix index over the top bits of context_hi."""
    num_rows = key_R3.shape[0]
    bits = int(np.clip(np.ceil(np.log2(max(num_rows / _ROWS_PER_BUCKET, 2))), 1, _MAX_BUCKET_BITS))
    bucket_R = key_R3[:, 0] >> np.uint32(32 - bits)
    bucket_start_P1 = np.searchsorted(bucket_R, np.arange(2 ** bits + 1), side="left").astype(np.int32)
    largest_bucket = int(np.diff(bucket_start_P1).max())
    return NgramStore(key_R3=key_R3, counts_R2=counts_R2, bucket_start_P1=bucket_start_P1, bucket_bits=bits,
                      bucket_steps=largest_bucket.bit_length(), **metadata)


def save_ngram_store(store: NgramStore, path: str) -> None:
    """Writes one .npz file (uncompressed: hashes do not compress, and loading stays a plain read)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    # Write then rename, so a crash never leaves a truncated store where a reader would look.
    with open(tmp, "wb") as f:
        np.savez(f, format_version=FORMAT_VERSION, key_R3=np.asarray(store.key_R3),
                 counts_R2=np.asarray(store.counts_R2), orders=np.array(store.orders),
                 rows_per_order=np.array(store.rows_per_order), num_tokens=store.num_tokens,
                 vocab_size=store.vocab_size)
    os.replace(tmp, path)


def load_ngram_store(path: str) -> NgramStore:
    """Reads a store written by `save_ngram_store`, as numpy arrays (see `NgramStore` about device_put)."""
    if not os.path.exists(path):
        raise InputError(f"no n-gram store at {path}; build it with: {BUILD_COMMAND}")
    with np.load(path) as data:
        if "format_version" not in data or int(data["format_version"]) != FORMAT_VERSION:
            raise InputError(f"{path} is not an n-gram store of format version {FORMAT_VERSION}; rebuild it with: "
                             f"{BUILD_COMMAND}")
        return _with_index(data["key_R3"], data["counts_R2"], orders=tuple(int(n) for n in data["orders"]),
                           rows_per_order=tuple(int(r) for r in data["rows_per_order"]),
                           num_tokens=int(data["num_tokens"]), vocab_size=int(data["vocab_size"]))


def build_and_save(token_sequences: Iterable[np.ndarray], path: str, orders: Sequence[int] = DEFAULT_ORDERS,
                   vocab_size: int | None = None) -> dict:
    """Builds and saves a store; returns what a build command reports (seconds, bytes on disk, rows per order)."""
    start = time.perf_counter()
    store = build_ngram_store(token_sequences, orders, vocab_size)
    build_seconds = time.perf_counter() - start
    save_ngram_store(store, path)
    return dict(path=path, build_seconds=build_seconds, file_bytes=os.path.getsize(path),
                num_tokens=store.num_tokens, rows_per_order=dict(zip(store.orders, store.rows_per_order)))


# ---------------------------------------------------------------------------------------------------------------------
# Lookup (device, jit-able).

def _lower_bound(store: NgramStore, key_R3: jax.Array, query_Q3: jax.Array) -> jax.Array:
    """First row whose key is >= the query (lexicographic on uint32 columns); < R thanks to the sentinel row.

    The radix index gives the query's bucket [start, end); a branchless binary search over power-of-two strides
    finds the lower bound inside it, or end (the next bucket's first row, also the global answer) if none."""
    bucket_start_P1 = jnp.asarray(store.bucket_start_P1)
    bucket_Q = (query_Q3[:, 0] >> jnp.uint32(32 - store.bucket_bits)).astype(jnp.int32)
    pos_Q, end_Q = bucket_start_P1[bucket_Q], bucket_start_P1[bucket_Q + 1]
    for i in reversed(range(store.bucket_steps)):  # a few steps: unrolled, no loop overhead
        probe_Q = pos_Q + (1 << i) - 1
        less_Q = _lexicographic_less(key_R3[jnp.minimum(probe_Q, key_R3.shape[0] - 1)], query_Q3)
        pos_Q = jnp.where((probe_Q < end_Q) & less_Q, pos_Q + (1 << i), pos_Q)
    return pos_Q


def _lexicographic_less(a_Q3, b_Q3):
    (a0, a1, a2), (b0, b1, b2) = a_Q3.T, b_Q3.T
    return (a0 < b0) | ((a0 == b0) & ((a1 < b1) | ((a1 == b1) & (a2 < b2))))


def _lookup(store: NgramStore, query_Q3: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(count(context, token), count(context, .)) per (context_hi, context_lo, token) query; 0 where unseen."""
    # asarray: outside jit the store may still hold numpy arrays, which cannot be indexed by traced positions.
    key_R3, counts_R2 = jnp.asarray(store.key_R3), jnp.asarray(store.counts_R2)
    pos_Q = _lower_bound(store, key_R3, query_Q3)
    row_Q3, counts_Q2 = key_R3[pos_Q], counts_R2[pos_Q]
    prev_Q = jnp.maximum(pos_Q - 1, 0)
    prev_row_Q3, prev_counts_Q2 = key_R3[prev_Q], counts_R2[prev_Q]
    same_context_Q = jnp.all(row_Q3[:, :2] == query_Q3[:, :2], axis=1)
    count_Q = jnp.where(same_context_Q & (row_Q3[:, 2] == query_Q3[:, 2]), counts_Q2[:, 0], 0)
    # A context's rows are contiguous, and the lower bound lands inside them or just after their last one.
    prev_same_context_Q = jnp.all(prev_row_Q3[:, :2] == query_Q3[:, :2], axis=1)
    context_count_Q = jnp.where(same_context_Q, counts_Q2[:, 1],
                                jnp.where(prev_same_context_Q, prev_counts_Q2[:, 1], 0))
    return count_Q, context_count_Q


def _context_hashes(store: NgramStore, history_BDT, history_len_BD):
    """[B, D, orders, 2] the key of each order's context: the history's last n - 1 tokens."""
    B, D, T = history_BDT.shape
    # Gather the last max_context tokens once; column j holds the (j + 1)-th most recent token.
    offsets_K = jnp.arange(1, store.orders[-1])
    idx_BDK = jnp.clip(history_len_BD[..., None] - offsets_K[None, None], 0, T - 1)
    recent_BDK = jnp.take_along_axis(history_BDT, idx_BDK, axis=-1).astype(jnp.uint32)
    state = _initial_state((B, D), jnp)
    context_hashes = []
    for k in range(1, store.orders[-1]):
        state = _absorb(*state, recent_BDK[..., k - 1], jnp)
        if k + 1 in store.orders:
            context_hashes.append(jnp.stack(_finalize(*state, k, jnp), axis=-1))
    return jnp.stack(context_hashes, axis=2)


def top_continuations(store: NgramStore, history_BDT: jax.Array, history_len_BD: jax.Array, k: int,
                      rows: int = 32) -> tuple[jax.Array, jax.Array]:
    """The k most frequent next tokens after each history's longest context the store has seen, and their counts
    (0: none), int32 (B, D, k). Among the context's first `rows` stored continuations (rows are sorted by token, not
    count): exact for the long contexts that have few continuations, an approximation for short ones."""
    B, D, _ = history_BDT.shape
    key_R3, counts_R2 = jnp.asarray(store.key_R3), jnp.asarray(store.counts_R2)
    context_BDO2 = _context_hashes(store, history_BDT, history_len_BD)
    query_Q3 = jnp.concatenate([context_BDO2, jnp.zeros(context_BDO2.shape[:-1] + (1,), jnp.uint32)], -1)
    first_Q = _lower_bound(store, key_R3, query_Q3.reshape(-1, 3))
    rows_QW = jnp.minimum(first_Q[:, None] + jnp.arange(rows)[None], key_R3.shape[0] - 1)
    same_QW = jnp.all(key_R3[rows_QW][..., :2] == query_Q3.reshape(-1, 3)[:, None, :2], axis=-1)
    num_orders = len(store.orders)
    counts_BDOW = jnp.where(same_QW, counts_R2[rows_QW][..., 0], 0).reshape(B, D, num_orders, rows)
    long_enough_BDO = history_len_BD[..., None] >= jnp.asarray(store.orders)[None, None] - 1
    counts_BDOW = jnp.where(long_enough_BDO[..., None], counts_BDOW, 0)
    seen_BDO = jnp.any(counts_BDOW > 0, axis=-1)
    # The longest seen order: the last True along the orders axis (orders are increasing).
    order_BD = num_orders - 1 - jnp.argmax(seen_BDO[..., ::-1], axis=-1)
    counts_BDW = jnp.take_along_axis(counts_BDOW, order_BD[..., None, None], axis=2)[:, :, 0]
    tokens_BDW = key_R3[rows_QW][..., 2].reshape(B, D, num_orders, rows)
    tokens_BDW = jnp.take_along_axis(tokens_BDW, order_BD[..., None, None], axis=2)[:, :, 0]
    top_counts_BDk, top_BDk = jax.lax.top_k(counts_BDW, k)
    return jnp.take_along_axis(tokens_BDW, top_BDk, axis=-1).astype(jnp.int32), top_counts_BDk


def ngram_counts(store: NgramStore, history_BDT: jax.Array, history_len_BD: jax.Array,
                 candidates_BDM: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per order, count(context, candidate) and count(context, .), each int32 of shape (B, D, M, len(orders)).

    history_BDT is left-aligned: draft (b, d) is history_BDT[b, d, :history_len_BD[b, d]] (prompt and generated
    tokens, as the reference's `alive_seq[..., :cur_pos]`); the context of order n is its last n - 1 tokens. An
    order whose context is longer than the history counts 0, as the reference skips `cur_pos - i < 0`.
    """
    B, D, T = history_BDT.shape
    M = candidates_BDM.shape[-1]
    num_orders = len(store.orders)
    context_BDO2 = _context_hashes(store, history_BDT, history_len_BD)
    # All orders share one table (the hash includes the context length), so one search answers B*D*M*O queries.
    query_BDMO3 = jnp.concatenate([
        jnp.broadcast_to(context_BDO2[:, :, None], (B, D, M, num_orders, 2)),
        jnp.broadcast_to(candidates_BDM.astype(jnp.uint32)[..., None, None], (B, D, M, num_orders, 1)),
    ], axis=-1)
    count_Q, context_count_Q = _lookup(store, query_BDMO3.reshape(-1, 3))
    long_enough_BD1O = (history_len_BD[..., None] >= jnp.asarray(store.orders)[None, None] - 1)[:, :, None, :]
    count_BDMO = jnp.where(long_enough_BD1O, count_Q.reshape(B, D, M, num_orders), 0)
    context_count_BDMO = jnp.where(long_enough_BD1O, context_count_Q.reshape(B, D, M, num_orders), 0)
    return count_BDMO, context_count_BDMO


def ngram_log_probs(store: NgramStore, history_BDT: jax.Array, history_len_BD: jax.Array,
                    candidates_BDM: jax.Array, weights: Sequence[float] = REFERENCE_WEIGHTS
                    ) -> tuple[jax.Array, jax.Array]:
    """The reference's interpolated n-gram log-probability of each candidate, and whether it is > -inf.

    logp = log(sum over orders n whose context was seen of weights[n] * count(context, v) / count(context, .)),
    weights not renormalised (`Superpose.ngram_probs`); -inf, and supported False, where that sum is 0. The sampler
    mixes it as (1 - alpha) log p_LM + alpha logp, falling back to (1 - alpha) log p_LM - penalty for a draft
    whose candidates are all unsupported. History layout as in `ngram_counts`. Returns float32 and bool (B, D, M).
    """
    if len(weights) != len(store.orders):
        raise ValueError(f"{len(weights)} interpolation weights for {len(store.orders)} n-gram orders {store.orders}")
    count_BDMO, context_count_BDMO = ngram_counts(store, history_BDT, history_len_BD, candidates_BDM)
    # Unseen contexts add nothing (the reference's prob() == -1); max(., 1) only avoids 0 / 0 there.
    prob_BDMO = count_BDMO.astype(jnp.float32) / jnp.maximum(context_count_BDMO, 1).astype(jnp.float32)
    p_BDM = jnp.sum(prob_BDMO * jnp.asarray(weights, jnp.float32)[None, None, None], axis=-1)
    supported_BDM = p_BDM > 0
    logp_BDM = jnp.where(supported_BDM, jnp.log(jnp.where(supported_BDM, p_BDM, 1.0)), -jnp.inf)
    return logp_BDM, supported_BDM

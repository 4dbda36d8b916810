"""MatryoshkaKV: the Cayley basis, the compressed attention layer and its cache, PCA initialisation."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import validation
from errors import InputError
from models import matryoshka_kv, matryoshka_pca, rope
from models.llama import Config, Model
from models.low_rank_kv_cache import LowRankKVCache
from pallas_kernels.decode_attention import BlockSizes
from pallas_kernels.low_rank_decode_attention import (
    check_rank,
    low_rank_decode_attention,
    low_rank_decode_attention_pallas,
)
from pallas_kernels.sharding import KernelSharding
from samplers import ngram_store
from samplers.draft_model import DraftModel
from samplers.engine import Sampler, SamplerConfig
from samplers.jacobi import Jacobi, JacobiConfig
from samplers.plain import PlainSampling
from samplers.sampling import SamplingConfig
from samplers.speculative import Speculative, SpeculativeConfig
from samplers.superposed import Superposed, SuperposedConfig
from tools import matryoshka_pca as matryoshka_pca_tool

TINY = dict(vocab_size=97, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
            softmax_implementation="reference")
H = TINY["head_dim"]


def tokens(batch=2, length=12, seed=0):
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, TINY["vocab_size"])


@functools.cache
def random_params(vocab_size=TINY["vocab_size"]):
    """Random parameters of the base model, drawn in numpy: compiling model.init takes ~7 s on a busy CPU."""
    model = Model(Config(**{**TINY, "vocab_size": vocab_size}))
    shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(1), tokens())["params"])
    rng = np.random.default_rng(1)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.ones(x.shape) if path[-1].key == "scale" else
        jnp.asarray(0.2 * rng.standard_normal(x.shape), jnp.float32), shapes)


def base_params():
    return jax.tree.map(lambda x: x, random_params())


def forward(model, params, tokens_BT):
    return jax.jit(model.apply)({"params": params}, tokens_BT)


def with_random_bases(params, seed=0, scale=0.3):
    """The base model's parameters plus a MatryoshkaKV subtree of random bases and means in every layer."""
    rng = np.random.default_rng(seed)
    K = TINY["num_kv_heads"]
    params = jax.tree.map(lambda x: x, params)
    for i in range(TINY["num_layers"]):
        params[f"layer_{i}"]["attention"]["matryoshka_kv"] = {
            "key_skew": jnp.asarray(scale * rng.standard_normal((K, H, H)), jnp.float32),
            "key_mean": jnp.asarray(scale * rng.standard_normal((K, H)), jnp.float32),
            "value_skew": jnp.asarray(scale * rng.standard_normal((K, H, H)), jnp.float32),
            "value_mean": jnp.asarray(scale * rng.standard_normal((K, H)), jnp.float32),
        }
    return params


def compressed(**fields):
    return Model(Config(**{**TINY, **fields}))


def test_cayley_map_is_orthogonal_with_det_one():
    x_KHH = jax.random.normal(jax.random.key(0), (3, 16, 16))
    u_KHH = matryoshka_kv.cayley(x_KHH)
    np.testing.assert_allclose(jnp.einsum("kij,kil->kjl", u_KHH, u_KHH), np.broadcast_to(np.eye(16), (3, 16, 16)),
                               atol=1e-5)
    np.testing.assert_allclose(np.linalg.det(np.asarray(u_KHH, np.float64)), 1.0, atol=1e-5)
    np.testing.assert_array_equal(matryoshka_kv.cayley(jnp.zeros((2, 4, 4))), np.broadcast_to(np.eye(4), (2, 4, 4)))


def test_inverse_cayley_reproduces_an_oriented_pca_basis():
    rng = np.random.default_rng(0)
    data_KNH = rng.standard_normal((4, 200, 16)) @ rng.standard_normal((4, 16, 16))
    _, eigvecs_KHH = np.linalg.eigh(np.einsum("kni,knj->kij", data_KNH, data_KNH))
    basis_KHH = matryoshka_kv.orient_basis(eigvecs_KHH[..., ::-1])
    np.testing.assert_allclose(np.linalg.det(basis_KHH), 1.0, atol=1e-9)
    # Same subspaces: each column is the eigenvector up to sign.
    np.testing.assert_allclose(np.abs(basis_KHH), np.abs(eigvecs_KHH[..., ::-1]), atol=1e-12)
    x_KHH = matryoshka_kv.inverse_cayley(basis_KHH)
    np.testing.assert_allclose(matryoshka_kv.cayley(jnp.asarray(x_KHH, jnp.float32)), basis_KHH, atol=1e-5)


def test_a_det_minus_one_basis_gets_its_first_column_negated():
    basis_HH = np.diag([1.0, 1.0, -1.0, 1.0])[:, [1, 0, 2, 3]]  # a reflection: det -1
    oriented_HH = matryoshka_kv.orient_basis(basis_HH)
    assert np.linalg.det(oriented_HH) == pytest.approx(1.0)
    np.testing.assert_array_equal(np.abs(oriented_HH), np.abs(basis_HH))


def test_full_rank_equals_the_base_model():
    params = base_params()
    tokens_BT = tokens()
    base_BTV, _ = forward(Model(Config(**TINY)), params, tokens_BT)
    full_BTV, _ = forward(compressed(kv_rank=H), with_random_bases(params), tokens_BT)
    np.testing.assert_allclose(full_BTV, base_BTV, atol=1e-5)


def test_the_subtree_is_absent_when_disabled_and_present_when_enabled():
    params = base_params()
    assert all("matryoshka_kv" not in params[f"layer_{i}"]["attention"] for i in range(2))
    enabled = nn.meta.unbox(jax.eval_shape(compressed(kv_rank=4).init, jax.random.key(1), tokens())["params"])
    subtree = enabled["layer_0"]["attention"]["matryoshka_kv"]
    assert {name: x.shape for name, x in subtree.items()} == {
        "key_skew": (2, H, H), "key_mean": (2, H), "value_skew": (2, H, H), "value_mean": (2, H)}
    # The rest is the base model's tree.
    enabled["layer_0"]["attention"].pop("matryoshka_kv")
    enabled["layer_1"]["attention"].pop("matryoshka_kv")
    assert jax.tree.structure(enabled) == jax.tree.structure(params)


def test_truncated_bases_give_a_lower_rank_model_that_degrades_gracefully():
    params = with_random_bases(base_params())
    tokens_BT = tokens()
    base_BTV, _ = forward(Model(Config(**TINY)), params, tokens_BT)
    errors = []
    for rank in (H, H - 2, H // 2, 1):
        logits_BTV, _ = forward(compressed(kv_rank=rank), params, tokens_BT)
        assert np.isfinite(logits_BTV).all()
        errors.append(float(jnp.abs(logits_BTV - base_BTV).max()))
    assert errors[0] < 1e-5 < errors[1] <= errors[2] <= errors[3]
    # Per-head ranks: one head kept whole, the other truncated, lands between.
    ranks = (H, H // 2) * 2
    mixed_BTV, _ = forward(compressed(kv_rank=H, kv_key_ranks=ranks, kv_value_ranks=ranks), params, tokens_BT)
    assert errors[0] < float(jnp.abs(mixed_BTV - base_BTV).max()) <= errors[2]


@pytest.mark.parametrize("fields", [dict(kv_rank=5), dict(kv_rank=6, kv_key_ranks=(6, 3, 2, 6),
                                                          kv_value_ranks=(1, 6, 4, 4)),
                                    dict(kv_rank=4, softmax_implementation="pallas")],
                         ids=["uniform", "per-head", "pallas"])
def test_cached_decode_with_the_compressed_cache_equals_the_full_forward(fields):
    model = compressed(**fields)
    params = with_random_bases(base_params())
    tokens_BT = tokens(length=10)
    full_BTV, _ = forward(model, params, tokens_BT)

    lengths_B = jnp.array([3, 6])
    prompts_BT = jnp.where(jnp.arange(10)[None] < lengths_B[:, None], tokens_BT, 0)
    cache = model.init_cache(2, 12)
    assert all(isinstance(layer, LowRankKVCache) for layer in cache.layers)
    assert cache.layers[0].columns.k_BKSH.shape == (2, 2, 12, fields["kv_rank"])
    logits_BTV, cache = jax.jit(model.apply)({"params": params}, prompts_BT, cache, lengths_B)
    for b, length in enumerate(lengths_B):
        np.testing.assert_allclose(logits_BTV[b, :length], full_BTV[b, :length], atol=2e-5)
    decode = jax.jit(lambda p, t, c: model.apply({"params": p}, t, c))
    if fields.get("softmax_implementation") == "pallas":  # the compressed-cache kernel runs the decode steps
        assert "low_rank_decode_attention_partials" in str(jax.make_jaxpr(decode)(params, tokens_BT[:, :1], cache))
    for _ in range(4):
        positions_B = np.asarray(cache.lengths_B)
        step_B1V, cache = decode(params, jnp.take_along_axis(tokens_BT, cache.lengths_B[:, None], axis=1), cache)
        for b, position in enumerate(positions_B):
            np.testing.assert_allclose(step_B1V[b, 0], full_BTV[b, position], atol=2e-5)


def test_compressed_cache_reports_its_size():
    cache = compressed(kv_rank=6, kv_key_ranks=(6, 3, 2, 6), kv_value_ranks=(1, 6, 4, 4)).init_cache(2, 12)
    layer = cache.layers[0]
    assert layer.nbytes == 2 * 2 * 2 * 12 * 6 * 4  # K and V, batch 2, 2 heads, 12 slots, 6 columns, float32
    assert layer.uncompressed_nbytes == 2 * 2 * 2 * 12 * H * 4
    assert layer.ranked_nbytes == 2 * 12 * (6 + 3 + 1 + 6) * 4
    assert cache.layers[1].key_ranks == (2, 6) and cache.layers[1].value_ranks == (4, 4)
    axes = cache.logical_axes()
    assert jax.tree.structure(axes) == jax.tree.structure(cache)


@pytest.mark.parametrize("fields, message", [
    (dict(kv_rank=9), "config.model.kv_rank=9 must be an integer in [0, 8] (0: no compression; at most "
                      "config.model.head_dim=8)"),
    (dict(kv_rank=-1), "config.model.kv_rank=-1 must be an integer in [0, 8]"),
    (dict(kv_rank=4, kv_key_ranks=(4, 5, 1, 1)), "config.model.kv_key_ranks=(4, 5, 1, 1) must be 4 integers "
                                                 "(num_layers * num_kv_heads, layer-major) in [1, "
                                                 "config.model.kv_rank=4]"),
    (dict(kv_rank=4, kv_value_ranks=(4, 4)), "config.model.kv_value_ranks=(4, 4) must be 4 integers"),
    (dict(kv_value_ranks=(4, 4, 4, 4)), "config.model.kv_value_ranks=(4, 4, 4, 4) needs config.model.kv_rank > 0"),
])
def test_bad_ranks_are_one_line(fields, message):
    with pytest.raises(InputError) as error:
        Config(**{**TINY, **fields})
    assert message in str(error.value) and "\n" not in str(error.value)


# PCA initialisation.

def numpy_layer0_keys_values(params, tokens_BT):
    """Layer 0's post-RoPE keys and values [B, T, K, H], in float64 numpy from the parameters."""
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    x_BTD = p["embedding"][np.asarray(tokens_BT)]
    h_BTD = x_BTD / np.sqrt(np.mean(x_BTD**2, axis=-1, keepdims=True) + 1e-5) * p["layer_0"]["attention_norm"]["scale"]
    k_BTKH = np.einsum("btd,dkh->btkh", h_BTD, p["layer_0"]["attention"]["key_kernel"])
    v_BTKH = np.einsum("btd,dkh->btkh", h_BTD, p["layer_0"]["attention"]["value_kernel"])
    angles_TF = np.arange(tokens_BT.shape[1])[:, None] * rope.inverse_frequencies(H, 10_000.0)[None].astype(np.float64)
    cos, sin = np.cos(angles_TF)[None, :, None], np.sin(angles_TF)[None, :, None]
    k1, k2 = k_BTKH[..., :H // 2], k_BTKH[..., H // 2:]
    return np.concatenate([k1 * cos - k2 * sin, k2 * cos + k1 * sin], axis=-1), v_BTKH


def test_pca_moments_equal_a_numpy_computation():
    params = base_params()
    tokens_BT, lengths_B = tokens(length=10), np.array([10, 4])
    stats = matryoshka_pca.Moments.zeros(Config(**TINY))
    stats = stats + matryoshka_pca.moments(compressed(kv_rank=4), with_random_bases(params), tokens_BT, lengths_B)
    k_BTKH, v_BTKH = numpy_layer0_keys_values(params, tokens_BT)
    valid = [(b, t) for b in range(2) for t in range(lengths_B[b])]
    assert stats.count == 14
    for x_BTKH, total_KH, outer_KHH in ((k_BTKH, stats.key_sum[0], stats.key_outer[0]),
                                        (v_BTKH, stats.value_sum[0], stats.value_outer[0])):
        x_NKH = np.stack([x_BTKH[b, t] for b, t in valid])
        np.testing.assert_allclose(total_KH, x_NKH.sum(0), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(outer_KHH, np.einsum("nki,nkj->kij", x_NKH, x_NKH), rtol=1e-4, atol=1e-4)

    # The parameters: the mean, and a basis that diagonalises numpy's covariance with descending variances.
    subtree = matryoshka_pca.pca_params(stats)["layer_0"]["attention"]["matryoshka_kv"]
    x_NKH = np.stack([k_BTKH[b, t] for b, t in valid])
    np.testing.assert_allclose(subtree["key_mean"], x_NKH.mean(0), atol=1e-5)
    covariance_KHH = np.stack([np.cov(x_NKH[:, k].T, bias=True) for k in range(2)])
    u_KHH = np.asarray(matryoshka_kv.cayley(subtree["key_skew"]), np.float64)
    rotated_KHH = np.einsum("kih,kij,kjl->khl", u_KHH, covariance_KHH, u_KHH)
    variances_KH = np.diagonal(rotated_KHH, axis1=1, axis2=2)
    np.testing.assert_allclose(rotated_KHH - variances_KH[..., None] * np.eye(H), 0.0, atol=1e-4)
    np.testing.assert_allclose(variances_KH, np.linalg.eigvalsh(covariance_KHH)[:, ::-1], atol=1e-4)


def test_pca_bases_truncate_better_than_the_identity_and_survive_save_and_load(tmp_path):
    params = base_params()
    model = compressed(kv_rank=H // 2)
    calibration_BT = tokens(batch=4, length=12, seed=3)
    stats = matryoshka_pca.moments(model, params, calibration_BT)
    path = str(tmp_path / "matryoshka_kv.npz")
    matryoshka_pca.save(path, matryoshka_pca.pca_params(stats), stats)
    pca = matryoshka_pca.merged(params, matryoshka_pca.load(path))
    identity = with_random_bases(params, scale=0.0)  # U = I, mu = 0: plain truncation
    base_BTV, _ = forward(Model(Config(**TINY)), params, calibration_BT)
    pca_error = float(jnp.abs(forward(model, pca, calibration_BT)[0] - base_BTV).mean())
    identity_error = float(jnp.abs(forward(model, identity, calibration_BT)[0] - base_BTV).mean())
    assert pca_error < 0.8 * identity_error  # a random tiny model is nearly isotropic: 0.65 here
    full_BTV, _ = forward(compressed(kv_rank=H), pca, calibration_BT)
    np.testing.assert_allclose(full_BTV, base_BTV, atol=1e-5)
    with np.load(path) as saved:
        eigenvalues_KH = saved["layer_0/attention/matryoshka_kv/value_eigenvalues"]
        assert int(saved["calibration_tokens"]) == 48 and (np.diff(eigenvalues_KH, axis=1) <= 0).all()


def test_no_calibration_tokens_is_one_line():
    with pytest.raises(InputError) as error:
        matryoshka_pca.pca_params(matryoshka_pca.Moments.zeros(Config(**TINY)))
    assert "0 tokens" in str(error.value) and "\n" not in str(error.value)


def test_token_windows_cut_documents_into_ragged_batches():
    documents = [[1, 2, 3], [4, 5, 6, 7, 8], [9] * 10]
    batches = list(matryoshka_pca_tool.token_windows(documents, seq_len=4, batch_rows=2, num_tokens=11))
    assert [lengths_B.tolist() for _, lengths_B in batches] == [[4, 4], [3, 0]]
    np.testing.assert_array_equal(batches[0][0], [[1, 2, 3, 4], [5, 6, 7, 8]])
    np.testing.assert_array_equal(batches[1][0], [[9, 9, 9, 0], [0, 0, 0, 0]])


def test_the_tool_writes_the_pca_file_and_refuses_an_empty_corpus(tmp_path):
    corpus_dir = tmp_path / "corpus"
    for i in range(12):
        (corpus_dir / f"m{i}.py").parent.mkdir(exist_ok=True)
        (corpus_dir / f"m{i}.py").write_text("".join(f"def f_{i}_{j}(x):\n    return x * {j}\n" for j in range(20)))
    fields = dict(TINY, vocab_size=300)  # room for the byte-level BPE's 256 bytes
    config = ml_collections.ConfigDict(dict(model=dict(name="llama", **fields), data=dict(
        corpus=str(corpus_dir), file_glob="**/*.py", max_files=0, validation_fraction=0.5, text_key="text",
        train_split="train", validation_split="validation", tfds_data_dir=str(tmp_path / "tfds"), tokenizer_path="",
        tokenizer_train_bytes=1_000_000, seq_len=16)))
    model = Model(Config(**fields))
    params = random_params(vocab_size=300)
    info = matryoshka_pca_tool.calibrate(config, str(tmp_path), model, params, num_tokens=100)
    assert info["tokens"] == 100 and info["layers"] == 2
    subtree = matryoshka_pca.load(info["path"])
    assert subtree["layer_1"]["attention"]["matryoshka_kv"]["value_skew"].shape == (2, H, H)

    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    (empty_dir / "blank.py").write_text("")
    config.data.corpus = str(empty_dir)
    with pytest.raises(InputError) as error:
        matryoshka_pca_tool.calibrate(config, str(tmp_path), model, params, num_tokens=100)
    assert "config.data.corpus" in str(error.value) and str(empty_dir) in str(error.value)
    assert "\n" not in str(error.value)


# The Pallas decode kernel over the compressed cache.

def kernel_inputs(lengths, kv_heads=2, group=2, cache_len=37, head_dim=16, rank=12, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    batch = len(lengths)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)  # noqa: E731
    bases_KHH = np.linalg.qr(rng.standard_normal((2, kv_heads, head_dim, head_dim)))[0]
    return dict(
        q_BNH=normal(batch, kv_heads * group, head_dim), k_BKSR=normal(batch, kv_heads, cache_len, rank),
        v_BKSR=normal(batch, kv_heads, cache_len, rank), lengths_B=jnp.asarray(lengths, jnp.int32),
        key_basis_KHR=jnp.asarray(bases_KHH[0, ..., :rank], jnp.float32),
        value_basis_KHR=jnp.asarray(bases_KHH[1, ..., :rank], jnp.float32),
        key_ranks_K=jnp.asarray(rng.integers(1, rank + 1, kv_heads), jnp.int32).at[0].set(rank),
        value_ranks_K=jnp.asarray(rng.integers(1, rank + 1, kv_heads), jnp.int32))


def pallas(inputs, backend, block_size, num_splits=None):
    """Either wrapper in interpret mode (the dispatcher picks the GPU one on CPU)."""
    batch, kv_heads, cache_len, rank = inputs["k_BKSR"].shape
    blocks = BlockSizes(block_size, num_splits).resolve(backend, compiled=False, programs=batch * kv_heads,
                                                        cache_len=cache_len, head_dim=rank,
                                                        itemsize=inputs["k_BKSR"].dtype.itemsize)
    return low_rank_decode_attention_pallas(*inputs.values(), scale=inputs["q_BNH"].shape[-1] ** -0.5, blocks=blocks,
                                            backend=backend, interpret=True)


def test_kernel_reference_matches_numpy_per_sequence_and_head():
    inputs = kernel_inputs([0, 1, 20, 37])
    o_BNH = np.asarray(low_rank_decode_attention(**inputs, implementation="reference"))
    x = {name: np.asarray(value, np.float64) for name, value in inputs.items()}
    for b, length in enumerate(inputs["lengths_B"].tolist()):
        for n in range(4):
            k = n // 2
            if length == 0:
                np.testing.assert_array_equal(o_BNH[b, n], 0.0)
                continue
            key_rank, value_rank = int(x["key_ranks_K"][k]), int(x["value_ranks_K"][k])
            q_R = x["q_BNH"][b, n] @ x["key_basis_KHR"][k][:, :key_rank]
            s = x["k_BKSR"][b, k, :length, :key_rank] @ q_R / 4.0
            p = np.exp(s - s.max())
            o_R = p @ x["v_BKSR"][b, k, :length, :value_rank] / p.sum()
            np.testing.assert_allclose(o_BNH[b, n], x["value_basis_KHR"][k][:, :value_rank] @ o_R, atol=1e-5)


@pytest.mark.parametrize("backend,group,head_dim,rank,cache_len,block_size", [
    ("gpu", 2, 16, 12, 37, 8),   # a rank Triton would need padded: interpret mode takes it
    ("gpu", 1, 32, 16, 64, 16),
    ("tpu", 4, 16, 12, 37, 8),
])
def test_pallas_kernel_matches_the_reference(backend, group, head_dim, rank, cache_len, block_size):
    inputs = kernel_inputs([0, 1, cache_len // 2 + 3, cache_len], group=group, cache_len=cache_len,
                           head_dim=head_dim, rank=rank)
    o_BNH = pallas(inputs, backend, block_size, num_splits=2)
    ref_BNH = low_rank_decode_attention(**inputs, implementation="reference")
    assert o_BNH.shape == inputs["q_BNH"].shape
    np.testing.assert_allclose(o_BNH, ref_BNH, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(o_BNH[0], 0.0)


def test_pallas_kernel_matches_the_reference_bf16():
    inputs = kernel_inputs([5, 37], dtype=jnp.bfloat16, rank=16)
    o_BNH = pallas(inputs, "gpu", 16)
    ref_BNH = low_rank_decode_attention(**inputs, implementation="reference")
    np.testing.assert_allclose(np.asarray(o_BNH, np.float32), np.asarray(ref_BNH, np.float32), atol=3e-2)


def test_kernel_decode_equals_the_compressed_models_attention():
    """The kernel over a model's compressed cache, plus the value mean, is the layer's attention output."""
    params = with_random_bases(base_params())
    model = compressed(kv_rank=6, kv_key_ranks=(6, 3, 2, 6), kv_value_ranks=(1, 6, 4, 4))
    tokens_BT = tokens(length=9)
    cache = model.init_cache(2, 12)
    _, cache = jax.jit(model.apply)({"params": params}, tokens_BT[:, :8], cache, jnp.array([8, 5]))
    layer = cache.layers[0]
    subtree = params["layer_0"]["attention"]["matryoshka_kv"]
    bases = [matryoshka_kv.cayley(subtree[f"{kind}_skew"])[..., :6] for kind in ("key", "value")]
    q_BNH = jax.random.normal(jax.random.key(5), (2, 4, H))
    inputs = dict(q_BNH=q_BNH, k_BKSR=layer.columns.k_BKSH, v_BKSR=layer.columns.v_BKSH, lengths_B=jnp.array([8, 5]),
                  key_basis_KHR=bases[0], value_basis_KHR=bases[1], key_ranks_K=jnp.array(layer.key_ranks),
                  value_ranks_K=jnp.array(layer.value_ranks))
    o_BNH = low_rank_decode_attention(**inputs)

    class Layer(nn.Module):  # the layer's own compress, attend and expand, at the same cache
        @nn.compact
        def __call__(self, q_BTNH):
            mkv = matryoshka_kv.MatryoshkaKV(2, H, 6, layer.key_ranks, layer.value_ranks, name="matryoshka_kv")
            zeros_BTKH = jnp.zeros((2, 1, 2, H))
            q_BTNR = mkv.compress(q_BTNH, zeros_BTKH, zeros_BTKH)[0]
            return mkv.expand(layer.attend(q_BTNR, jnp.array([[7], [4]]), "reference"))

    expected_B1NH = Layer().apply({"params": {"matryoshka_kv": subtree}}, q_BNH[:, None])
    np.testing.assert_allclose(o_BNH + jnp.repeat(subtree["value_mean"], 2, axis=0)[None], expected_B1NH[:, 0],
                               atol=1e-5)


@pytest.mark.parametrize("change, match", [
    (dict(k_BKSR=jnp.zeros((2, 2, 37, 20)), v_BKSR=jnp.zeros((2, 2, 37, 20))),
     r"rank=20 columns per head; expected 1 to head_dim=16"),
    (dict(key_basis_KHR=jnp.zeros((2, 16, 8))), r"key_basis_KHR shape \(2, 16, 8\) != \(kv_heads, head_dim, rank\)"),
    (dict(value_ranks_K=jnp.zeros((3,), jnp.int32)), r"value_ranks_K shape \(3,\) != \(kv_heads,\)"),
    (dict(lengths_B=jnp.zeros((3,), jnp.int32)), r"lengths_B shape \(3,\)"),
    (dict(value_basis_KHR=None), r"key_basis_KHR and value_basis_KHR must both be given"),
    (dict(key_basis_KHR=None, value_basis_KHR=None),
     r"without bases q_BNH \(2, 4, 16\) must have the cache's rank=12"),
])
def test_bad_kernel_inputs_are_one_line(change, match):
    with pytest.raises(InputError, match=match) as error:
        low_rank_decode_attention(**{**kernel_inputs([1, 2]), **change})
    assert "\n" not in str(error.value)


def test_a_rank_triton_would_pad_is_refused_when_compiling_for_a_gpu():
    with pytest.raises(InputError, match=r"kv_rank=24; the GPU \(Triton\) kernel needs a power of two >= 16") as e:
        check_rank(24, "gpu", compiled=True, key="kv_rank")
    assert "\n" not in str(e.value)
    for rank, backend, compiled in ((16, "gpu", True), (24, "gpu", False), (24, "tpu", True)):
        check_rank(rank, backend, compiled)


def test_kernel_without_bases_runs_in_the_key_and_value_bases():
    inputs = kernel_inputs([0, 9, 37], rank=16)
    q_BNR = jnp.einsum("bkgh,khr->bkgr", inputs["q_BNH"].reshape(3, 2, 2, 16), inputs["key_basis_KHR"])
    bare = dict(inputs, q_BNH=q_BNR.reshape(3, 4, 16), key_basis_KHR=None, value_basis_KHR=None)
    o_BNR = pallas(bare, "gpu", 8)
    np.testing.assert_allclose(o_BNR, low_rank_decode_attention(**bare, implementation="reference"), atol=1e-5)
    o_BNH = jnp.einsum("bkgr,khr->bkgh", o_BNR.reshape(3, 2, 2, 16), inputs["value_basis_KHR"]).reshape(3, 4, 16)
    np.testing.assert_allclose(o_BNH, low_rank_decode_attention(**inputs, implementation="reference"), atol=1e-5)


PER_HEAD = dict(kv_rank=6, kv_key_ranks=(6, 3, 2, 6), kv_value_ranks=(1, 6, 4, 4))


def test_the_decode_form_is_the_same_model_without_a_solve_per_step():
    model = compressed(**PER_HEAD)
    params = with_random_bases(base_params())
    fixed = model.decode_params(params)
    attention = fixed["layer_0"]["attention"]
    assert set(attention["matryoshka_kv"]) == {"key_basis", "key_mean", "value_basis", "value_mean"}
    assert attention["out_kernel"].shape == (4, 6, 32) and attention["out_bias"].shape == (32,)
    # Columns past each head's rank are zero in the fixed bases (layer 0: key ranks 6, 3; value ranks 1, 6).
    assert not np.any(attention["matryoshka_kv"]["key_basis"][1, :, 3:])
    assert not np.any(attention["matryoshka_kv"]["value_basis"][0, :, 1:])
    tokens_BT = tokens(length=10)
    full_BTV, _ = forward(model, params, tokens_BT)
    np.testing.assert_allclose(forward(model, fixed, tokens_BT)[0], full_BTV, atol=2e-5)

    cache = model.init_cache(2, 12)
    _, cache = jax.jit(model.apply)({"params": fixed}, tokens_BT[:, :6], cache)
    step = lambda p, t, c: model.apply({"params": p}, t, c)  # noqa: E731
    step_B1V, _ = jax.jit(step)(fixed, tokens_BT[:, 6:7], cache)
    np.testing.assert_allclose(step_B1V[:, 0], full_BTV[:, 6], atol=2e-5)
    # The Cayley map's elimination loop runs in every training-form step and in no decode-form step.
    loops = lambda p: {e.primitive.name for e in jax.make_jaxpr(step)(p, tokens_BT[:, 6:7], cache).eqns  # noqa: E731
                       } & {"scan", "while"}
    assert loops(params) and not loops(fixed)


def _greedy_without_cache(model, params, prompt, num_tokens, width=16):
    """Greedy tokens by full forwards of the sequence right-padded to `width` (one compilation: causal attention
    keeps the padding out of every earlier position)."""
    full = jax.jit(lambda p, t: model.apply({"params": p}, t)[0])
    sequence = list(prompt)
    for _ in range(num_tokens):
        logits_BTV = full(params, jnp.asarray([sequence + [0] * (width - len(sequence))]))
        sequence.append(int(jnp.argmax(logits_BTV[0, len(sequence) - 1])))
    return sequence[len(prompt):]


PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13]]


@pytest.mark.parametrize("strategy", ["plain", "speculative", "jacobi"])
def test_every_exact_decoding_method_decodes_the_compressed_model_greedily(strategy):
    """The engine's decode form and compressed cache under plain, speculative (the uncompressed model drafting)
    and Jacobi decoding give the tokens of greedy decoding by the compressed model's full forward."""
    model = compressed(**PER_HEAD, max_seq_len=64)
    params = with_random_bases(base_params())
    base = Model(Config(**TINY, max_seq_len=64))
    make = {"plain": lambda: PlainSampling(SamplingConfig()),
            "speculative": lambda: Speculative(SpeculativeConfig((2, 1)), DraftModel(base, base_params())),
            "jacobi": lambda: Jacobi(JacobiConfig(window=3))}[strategy]
    sampler = Sampler(model, params, None, SamplerConfig(max_new_tokens=6, prompt_buckets=(8,)), make())
    output = sampler.generate_tokens(PROMPTS)
    assert output.tokens == [_greedy_without_cache(model, params, prompt, 6) for prompt in PROMPTS]


def test_superposed_decoding_and_the_engine_report_on_the_compressed_cache():
    """At kv_rank = head_dim (random rotations and means) the compressed model is the base model, so Superposed
    Decoding's drafts through the compressed cache are the base model's; the engine reports the cache's bytes."""
    store = ngram_store.build_ngram_store([np.arange(40) % TINY["vocab_size"]], (2,), vocab_size=TINY["vocab_size"])
    strategy = Superposed(SuperposedConfig(num_drafts=2, ngram_orders=(2,), ngram_weights=(0.1,)), store)
    config = SamplerConfig(max_new_tokens=5, prompt_buckets=(8,))
    base = Sampler(Model(Config(**TINY, max_seq_len=64)), base_params(), None, config, strategy)
    full_rank = Sampler(compressed(kv_rank=H, max_seq_len=64), with_random_bases(base_params()), None, config,
                        strategy)
    assert full_rank.generate_tokens(PROMPTS).tokens == base.generate_tokens(PROMPTS).tokens

    half = Sampler(compressed(kv_rank=H // 2, max_seq_len=64), with_random_bases(base_params()), None, config)
    uncompressed = Sampler(Model(Config(**TINY, max_seq_len=64)), base_params(), None, config)
    half_bytes, full_bytes = (s.cache_bytes(s.prefill(PROMPTS)) for s in (half, uncompressed))
    # Batch 2, 2 layers, keys and values, 2 heads, 64 slots (max_seq_len), float32, and the rows' int32 lengths;
    # half the columns.
    lengths_bytes = 2 * 4
    assert full_bytes == 2 * 2 * 2 * 2 * 64 * H * 4 + lengths_bytes
    assert half_bytes - lengths_bytes == (full_bytes - lengths_bytes) // 2


def test_a_kv_rank_the_gpu_kernel_cannot_take_is_refused_at_start(monkeypatch):
    model = ml_collections.ConfigDict(dict(TINY, kv_rank=6, softmax_implementation="pallas", mixer_pattern="softmax",
                                           lightning_implementation="chunked", lightning_block_size=64))
    validation._kernels_fit_backend(model)  # on the CPU: interpret mode takes any width
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    with pytest.raises(InputError, match=r"config.model.kv_rank=6; the GPU \(Triton\) kernel needs a power of two"):
        validation._kernels_fit_backend(model)
    model.kv_rank = 16
    validation._kernels_fit_backend(model)


@pytest.mark.parametrize("with_bases", [True, False], ids=["bases", "in-basis"])
def test_kernel_sharded_over_batch_and_heads_equals_the_reference(with_bases):
    mesh = jax.make_mesh((2, 4), ("data", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    inputs = kernel_inputs([3, 37], kv_heads=4, rank=16)
    if not with_bases:
        inputs.update(q_BNH=inputs["q_BNH"][..., :16], key_basis_KHR=None, value_basis_KHR=None)
    sharding = KernelSharding(batch="data", heads="tensor", mesh=mesh)
    o_BNH = jax.jit(lambda i: low_rank_decode_attention(**i, block_size=8, sharding=sharding))(inputs)
    np.testing.assert_allclose(o_BNH, low_rank_decode_attention(**inputs, implementation="reference"), atol=1e-5)
    assert o_BNH.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
        "data", "tensor")), 3)

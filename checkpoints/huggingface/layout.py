"""Parameter names and layouts: a decodelab tensor is its Hugging Face tensor, maybe transposed, with the fused heads
axis (N*H) split in two; RoPE is rotate-half on both sides, so q/k need no permutation."""

import re

import jax
import numpy as np

_LAYER_TENSORS = {  # decodelab path within layer_i -> (HF name within model.layers.i, layout)
    "attention/query_kernel": ("self_attn.q_proj.weight", "heads_in"),
    "attention/key_kernel": ("self_attn.k_proj.weight", "heads_in"),
    "attention/value_kernel": ("self_attn.v_proj.weight", "heads_in"),
    "attention/query_bias": ("self_attn.q_proj.bias", "heads_bias"),
    "attention/key_bias": ("self_attn.k_proj.bias", "heads_bias"),
    "attention/value_bias": ("self_attn.v_proj.bias", "heads_bias"),
    "attention/query_norm/scale": ("self_attn.q_norm.weight", "copy"),
    "attention/key_norm/scale": ("self_attn.k_norm.weight", "copy"),
    "attention/out_kernel": ("self_attn.o_proj.weight", "heads_out"),
    "attention_norm/scale": ("input_layernorm.weight", "copy"),
    "mlp_norm/scale": ("post_attention_layernorm.weight", "copy"),
    "mlp/gate/kernel": ("mlp.gate_proj.weight", "transpose"),
    "mlp/up/kernel": ("mlp.up_proj.weight", "transpose"),
    "mlp/down/kernel": ("mlp.down_proj.weight", "transpose"),
}
_TOP_TENSORS = {
    "embedding": ("model.embed_tokens.weight", "copy"),
    "final_norm/scale": ("model.norm.weight", "copy"),
    "lm_head/kernel": ("lm_head.weight", "transpose"),
}


def hf_name(path: str) -> tuple[str, str]:
    """(HF tensor name, layout) of the decodelab parameter at `path` ("layer_0/mlp/up/kernel")."""
    if match := re.fullmatch(r"layer_(\d+)/(.+)", path):
        name, layout = _LAYER_TENSORS[match[2]]
        return f"model.layers.{match[1]}.{name}", layout
    return _TOP_TENSORS[path]


def hf_shape(shape: tuple, layout: str) -> tuple:
    if layout == "transpose":
        return shape[::-1]
    if layout == "heads_in":  # [D, N, H] <- [N*H, D]
        return (shape[1] * shape[2], shape[0])
    if layout == "heads_out":  # [N, H, D] <- [D, N*H]
        return (shape[2], shape[0] * shape[1])
    if layout == "heads_bias":  # [N, H] <- [N*H]
        return (shape[0] * shape[1],)
    return shape


def to_hf(x: np.ndarray, layout: str) -> np.ndarray:
    if layout == "transpose":
        return x.T
    if layout == "heads_in":
        return x.reshape(x.shape[0], -1).T
    if layout == "heads_out":
        return x.reshape(-1, x.shape[-1]).T
    if layout == "heads_bias":
        return x.reshape(-1)
    return x


def read_block(tensor, layout: str, index: tuple, shape: tuple) -> np.ndarray:
    """The block `index` (slices of the decodelab shape) of a lazily opened HF tensor, reading only that block."""
    index = tuple(slice(*s.indices(n)) for s, n in zip(index, shape))
    if layout == "copy":
        return tensor[index]
    if layout == "transpose":
        return tensor[index[1], index[0]].T
    # The fused N*H axis: read whole heads n0:n1, then select within each head.
    if layout == "heads_in":
        d, heads, within = index
        block = tensor[slice(heads.start * shape[2], heads.stop * shape[2]), d]
        return block.reshape(-1, shape[2], block.shape[-1]).transpose(2, 0, 1)[:, :, within]
    if layout == "heads_out":
        heads, within, d = index
        block = tensor[d, slice(heads.start * shape[1], heads.stop * shape[1])]
        return block.T.reshape(-1, shape[1], block.shape[0])[:, within]
    heads, within = index
    return tensor[slice(heads.start * shape[1], heads.stop * shape[1])].reshape(-1, shape[1])[:, within]


def place(plan: dict, abstract, shardings):
    """The parameters `abstract` describes, each device's block read from its tensor on its own: plan maps a
    parameter's path ("layer_0/mlp/up/kernel") to (its lazily read tensor, its layout)."""
    def place_one(key_path, leaf, sharding):
        tensor, layout = plan[jax.tree_util.keystr(key_path, simple=True, separator="/")]
        blocks = {}  # devices holding replicas of one block share one read

        def read(index):
            bounds = tuple(s.indices(n) for s, n in zip(index, leaf.shape))
            if bounds not in blocks:
                blocks[bounds] = read_block(tensor, layout, index, leaf.shape).astype(leaf.dtype)
            return blocks[bounds]

        return jax.make_array_from_callback(leaf.shape, sharding, read)

    return jax.tree_util.tree_map_with_path(place_one, abstract, shardings)

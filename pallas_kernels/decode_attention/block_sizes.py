"""How the flash-decoding kernel tiles the cache: per-backend defaults and the limits each backend imposes.

GPU (Triton): every tensor a program loads must have a power-of-two size and dot operands need >= 16 rows, so
block_size is a power of two >= 16. Triton's software pipeliner keeps `num_stages` copies of each K and V block in
shared memory, num_stages * 2 * block_size * head_dim_padded * itemsize bytes, which must fit the 227 KiB one
Hopper thread block may use (Triton's own matmul estimate, num_stages * (tile_a + tile_b) bytes). The old default,
block 256 x head_dim 128 in bf16 with 2 stages, needs 256 KiB and does not fit. The default here is JAX's decode
kernel's (block 128, 2 stages, 4 warps), halved until its buffers are at most the 128 KiB those use with
head_dim 128 in bf16 (so float32 caches get block 64), which also fits an A100's 163 KiB.

TPU (Mosaic): a split's K and V are DMA'd to VMEM double-buffered, 2 * 2 * split_len * head_dim * itemsize bytes,
which must fit the 16 MiB scoped VMEM Mosaic grants by default on v4/v5e. block_size (cache positions per inner
step) must be a multiple of the 8 sublanes; 256 keeps the scores lane-dense.
"""

import dataclasses

from jax.experimental import pallas as pl

import shapes
from errors import InputError
from errors.checks import is_int
from pallas_kernels.backend import triton_width

_GPU_SHARED_MEMORY_BYTES = 227 * 1024
_GPU_DEFAULT_BUFFER_BYTES = 128 * 1024
_GPU_DEFAULT_BLOCK, _GPU_DEFAULT_WARPS, _GPU_DEFAULT_STAGES = 128, 4, 2
# Two resident programs per H100 SM (132 SMs), so a batch-1 decode still fills the GPU.
_GPU_TARGET_PROGRAMS = 264
_TPU_VMEM_BYTES = 16 * 1024 * 1024
_TPU_DEFAULT_BLOCK = 256
# One TPU split's double-buffered K and V (4 * 2048 * head_dim * 2 bytes) stay far below the scoped VMEM limit.
_TPU_MAX_SPLIT_POSITIONS = 2048


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """The kernel's tiling; a None field takes the backend's default when resolved.

    block_size: cache positions per inner step; num_splits: splits of the cache per (sequence, kv head), run as
    separate programs and merged afterwards; num_warps, num_stages: Triton only (ignored on TPU).
    """

    block_size: int | None = None
    num_splits: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None

    def split_blocks(self, cache_len: int) -> int:
        """Blocks per split of a resolved tiling (the last split may hold fewer)."""
        return pl.cdiv(pl.cdiv(cache_len, self.block_size), self.num_splits)

    def resolve(self, backend: str, *, compiled: bool, programs: int, cache_len: int, head_dim: int,
                itemsize: int) -> "BlockSizes":
        """Concrete sizes for one call of the `backend` ("gpu" or "tpu") wrapper, compiled or in interpret mode,
        with `programs` = batch * kv_heads: defaults filled in, the block capped to the cache, num_splits made
        exact. Raises InputError for sizes the backend would refuse; Triton's rules and Hopper's shared memory
        apply only when compiling for a GPU, interpret mode needs only a multiple of 8."""
        for name in ("block_size", "num_splits", "num_warps", "num_stages"):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or value <= 0):
                raise InputError(f"decode_attention: {name}={value!r}; expected a positive int or None (default)")
        if backend == "gpu":
            block, warps, stages = self._resolve_gpu(cache_len, triton_width(head_dim), itemsize, compiled)
            splits = pl.cdiv(_GPU_TARGET_PROGRAMS, programs) if self.num_splits is None else self.num_splits
        else:
            block = _TPU_DEFAULT_BLOCK if self.block_size is None else self.block_size
            _check_sublanes(block)
            block, warps, stages = min(block, shapes.round_up(cache_len, 8)), None, None
            splits = pl.cdiv(cache_len, _TPU_MAX_SPLIT_POSITIONS) if self.num_splits is None else self.num_splits
        total_blocks = pl.cdiv(cache_len, block)
        per_split = pl.cdiv(total_blocks, min(splits, total_blocks))
        resolved = BlockSizes(block, pl.cdiv(total_blocks, per_split), warps, stages)
        vmem = 2 * 2 * per_split * block * head_dim * itemsize
        if backend == "tpu" and compiled and vmem > _TPU_VMEM_BYTES:
            raise InputError(
                f"decode_attention: num_splits={resolved.num_splits} gives splits of {per_split * block} positions "
                f"whose double-buffered K/V need {vmem // 1024} KiB of VMEM; TPU allows {_TPU_VMEM_BYTES // 1024} "
                "KiB: raise num_splits"
            )
        return resolved

    def _resolve_gpu(self, cache_len, head_pad, itemsize, compiled):
        stages = _GPU_DEFAULT_STAGES if self.num_stages is None else self.num_stages
        warps = _GPU_DEFAULT_WARPS if self.num_warps is None else self.num_warps
        buffer_bytes = lambda block: stages * 2 * block * head_pad * itemsize  # noqa: E731
        block = self.block_size
        if block is None:
            block = _GPU_DEFAULT_BLOCK
            while block > 16 and buffer_bytes(block) > _GPU_DEFAULT_BUFFER_BYTES:
                block //= 2
        _check_sublanes(block)
        # A short cache gets a smaller block (a power of two >= 16): fewer padded positions, less shared memory.
        block = min(block, triton_width(cache_len))
        if not compiled:
            return block, warps, stages
        if warps & (warps - 1):
            raise InputError(f"decode_attention: num_warps={warps}; expected a power of two on GPU (Triton)")
        if block < 16 or block & (block - 1):
            raise InputError(f"decode_attention: block_size={block}; expected a power of two >= 16 on GPU (Triton)")
        if buffer_bytes(block) > _GPU_SHARED_MEMORY_BYTES:
            raise InputError(
                f"decode_attention: block_size={block} with num_stages={stages} needs {buffer_bytes(block) // 1024} "
                f"KiB of shared memory for K/V (stages * 2 * block * head_dim {head_pad} * {itemsize} bytes); a GPU "
                f"thread block gets {_GPU_SHARED_MEMORY_BYTES // 1024} KiB: lower block_size or num_stages"
            )
        return block, warps, stages


def _check_sublanes(block):
    if block % 8:
        raise InputError(f"decode_attention: block_size={block}; expected a multiple of 8 (TPU sublanes)")

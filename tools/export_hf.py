"""Writes a run's latest parameters as a Hugging Face directory that transformers loads.

  python tools/export_hf.py --config=configs/lm.py:tiny --workdir=workdirs/tiny --out=exports/tiny
  python tools/export_hf.py --config=configs/lm.py:tiny --workdir=workdirs/tiny --out=exports/tiny --dtype=bfloat16

The directory gets config.json (LlamaForCausalLM; Qwen2 with q/k/v biases, Qwen3 with q/k norms),
model.safetensors and the run's tokenizer.json (WORKDIR/tokenizer.json, else config.data.tokenizer_path).
Then: transformers.AutoModelForCausalLM.from_pretrained("exports/tiny").
"""

import os

import jax
from absl import flags
from jax.sharding import SingleDeviceSharding

from checkpoints import huggingface
from checkpoints.manager import Checkpoints
from configs import cli
from errors import InputError
from models import registry
from parallel import mesh as mesh_lib

OUT = flags.DEFINE_string("out", None, "Directory to write the Hugging Face checkpoint into.")
DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Dtype of the written weights.")


def export(config, workdir: str, out_dir: str, dtype: str = "float32") -> str:
    """Restores WORKDIR's latest parameters onto one device and writes them to OUT_DIR."""
    if not out_dir:
        raise InputError("--out=DIR is required: the directory to write the Hugging Face checkpoint into")
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):  # Checkpoints() would create it
        raise InputError(f"no checkpoints in --workdir={workdir}; train first (python train.py ... --workdir=...)")
    tokenizer_path = os.path.join(workdir, "tokenizer.json")
    if not os.path.isfile(tokenizer_path):
        tokenizer_path = config.data.tokenizer_path
    if not tokenizer_path or not os.path.isfile(tokenizer_path):
        raise InputError(f"no tokenizer: neither {workdir}/tokenizer.json nor config.data.tokenizer_path="
                         f"{config.data.tokenizer_path!r} exists")
    model = registry.build(config.model)
    device = SingleDeviceSharding(jax.devices()[0])
    abstract_params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                                   mesh_lib.strip_logical_names(huggingface.abstract_params(model)))
    checkpoints = Checkpoints(workdir)
    params = checkpoints.restore_params(abstract_params)
    checkpoints.close()
    huggingface.export_hf(params, config.model, tokenizer_path, out_dir, dtype)
    print(f"wrote {out_dir} (config.json, model.safetensors in {dtype}, tokenizer.json)")
    return out_dir


if __name__ == "__main__":
    cli.main(lambda: export(cli.CONFIG.value, cli.WORKDIR.value, OUT.value, DTYPE.value))

"""Hugging Face checkpoints in and out: Llama 2/3, Mistral, Qwen2 and Qwen3 directories <-> the `llama` decoder.

A checkpoint is a local directory: config.json, model.safetensors (or model.safetensors.index.json and its shards)
and tokenizer.json. Only safetensors are read, never pickles; nothing downloads.

  from checkpoints import huggingface
  model, params, tokenizer = huggingface.load("/models/Llama-3.2-1B", dtype="bfloat16")
  prompt_BT = jnp.asarray([tokenizer.encode("def fib(n):").ids])
  cache = model.init_cache(batch_size=1, cache_len=256)
  logits_BTV, cache = model.apply({"params": params}, prompt_BT, cache)                 # prefill
  next_B1 = jnp.argmax(logits_BTV[:, -1:], axis=-1)
  logits_B1V, cache = model.apply({"params": params}, next_B1, cache)                   # one decode step

  # Sharded onto a mesh, each device reading only its own slice of every tensor:
  model, params, tokenizer = huggingface.load(path, mesh=mesh, rules=config.logical_axis_rules)

  # Back to a directory that transformers' AutoModelForCausalLM.from_pretrained loads:
  huggingface.export_hf(params, config.model, "WORKDIR/tokenizer.json", "/tmp/out")

Limitation: sliding-window attention (Mistral v0.1, Qwen with use_sliding_window) is not implemented, so for such
checkpoints `max_seq_len` is capped at the window, where full and windowed attention agree.
"""

from checkpoints.huggingface.config import ARCHITECTURES, RUNTIME_FIELDS, model_config_from_hf
from checkpoints.huggingface.export import export_hf
from checkpoints.huggingface.load import abstract_params, load, load_hf_params, load_tokenizer

__all__ = ["ARCHITECTURES", "RUNTIME_FIELDS", "abstract_params", "export_hf", "load", "load_hf_params",
           "load_tokenizer", "model_config_from_hf"]

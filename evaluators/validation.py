"""Validation loss of the model (its own `loss` and the terms it reports), on fixed batches of the validation split:
packed text windows (with perplexity and bits per byte), or captioned images for the image model (its caption and
diffusion losses, and the diffusion loss with every caption dropped: how much the images depend on their captions,
which classifier-free guidance amplifies; data/image_pipeline.py).

config.evaluate.validation: num_batches (global batches of config.data.global_batch_size rows).
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from data import image_pipeline, pipeline, tokenizer as tokenizer_lib
from errors import checks
from parallel import mesh as mesh_lib


def validate(section, config) -> None:
    checks.integer("config.evaluate.validation.num_batches", section.num_batches, minimum=1)


class Evaluator:
    def __init__(self, section, context):
        self.context = context
        config, model = context.config, context.model
        self.text = model.batch_format != image_pipeline.BATCH_FORMAT
        batches = pipeline.eval_batches if self.text else image_pipeline.eval_batches
        self.batches = batches(config.data, context.tokenizer, context.sources["validation"],
                               num_batches=section.num_batches, process_index=jax.process_index(),
                               process_count=jax.process_count())
        token_bytes_V = jnp.asarray(tokenizer_lib.token_byte_lengths(context.tokenizer, config.model.vocab_size))

        @jax.jit
        def batch_metrics(params, batch):
            _, metrics = model.loss(params, batch, None)
            if self.text:
                targets_BT = batch["tokens"][:, 1:]
                return dict(metrics, bytes_per_token=token_bytes_V[targets_BT].mean())
            _, null_caption = model.loss(params, image_pipeline.without_captions(batch), None)
            return dict(metrics, null_caption_diffusion_loss=null_caption["diffusion_loss"])

        self._batch_metrics = batch_metrics

    def run(self, params) -> dict:
        """Each metric's mean over the batches (of equal size, so also over their targets)."""
        mesh, rules = self.context.mesh, self.context.rules
        batch_sharding = mesh_lib.batch_sharding(mesh, rules)
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            per_batch = [jax.device_get(self._batch_metrics(params, jax.tree.map(
                lambda x: mesh_lib.global_batch(x, batch_sharding), local_batch))) for local_batch in self.batches]
        results = {key: sum(float(m[key]) for m in per_batch) / len(per_batch) for key in per_batch[0]}
        if self.text:
            data = self.context.config.data
            bytes_per_token = results.pop("bytes_per_token")
            results.update(perplexity=math.exp(results["loss"]),
                           bits_per_byte=results["loss"] / math.log(2) / max(bytes_per_token, 1e-9),
                           tokens=len(per_batch) * data.global_batch_size * data.seq_len)
        return results

    def report(self, results: dict) -> None:
        terms = ", ".join(f"{key} {value:.4f}" for key, value in results.items() if key not in ("loss", "tokens"))
        print(f"validation loss {results['loss']:.4f}, {terms}")

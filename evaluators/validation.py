"""Validation loss of the model (its own `loss`), with perplexity and bits per byte for text, on fixed batches.

config.evaluate.validation: num_batches (global batches of config.data.global_batch_size x seq_len windows).
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from data import pipeline, tokenizer as tokenizer_lib
from errors import checks
from parallel import mesh as mesh_lib


def validate(section, config) -> None:
    checks.integer("config.evaluate.validation.num_batches", section.num_batches, minimum=1)


class Evaluator:
    def __init__(self, section, context):
        self.context = context
        config = context.config
        self.batches = pipeline.eval_batches(config.data, context.tokenizer, context.sources["validation"],
                                             num_batches=section.num_batches, process_index=jax.process_index(),
                                             process_count=jax.process_count())
        token_bytes_V = jnp.asarray(tokenizer_lib.token_byte_lengths(context.tokenizer, config.model.vocab_size))
        model = context.model

        @jax.jit
        def sums(params, batch):
            loss, _ = model.loss(params, batch, None)
            targets_BT = batch["tokens"][:, 1:]
            return loss * targets_BT.size, targets_BT.size, token_bytes_V[targets_BT].sum()

        self._sums = sums

    def run(self, params) -> dict:
        mesh, rules = self.context.mesh, self.context.rules
        batch_sharding = mesh_lib.batch_sharding(mesh, rules)
        nll, tokens, num_bytes = 0.0, 0, 0
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            for local_batch in self.batches:
                batch = jax.tree.map(lambda x: mesh_lib.global_batch(x, batch_sharding), local_batch)
                batch_nll, batch_tokens, batch_bytes = jax.device_get(self._sums(params, batch))
                nll, tokens = nll + float(batch_nll), tokens + int(batch_tokens)
                num_bytes += int(batch_bytes)
        loss = nll / tokens
        return {"loss": loss, "perplexity": math.exp(loss), "bits_per_byte": nll / math.log(2) / max(num_bytes, 1),
                "tokens": tokens}

    def report(self, results: dict) -> None:
        print(f"validation loss {results['loss']:.4f}, perplexity {results['perplexity']:.2f}, "
              f"bits per byte {results['bits_per_byte']:.4f}")

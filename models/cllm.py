"""Consistency LLMs (CLLMs; Kou et al., 2024, hao-ai-lab/Consistency_LLM): the Llama decoder trained to jump to the
fixed point of Jacobi decoding (samplers/jacobi.py), so that each Jacobi step commits more tokens.

The parameters are models/llama.py's (PARAMETERS below), so a CLLM starts from any Llama checkpoint (a workdir,
hf:, gguf:) and decodes, exports and evaluates as one. Only the loss differs. Its batch is one block of a Jacobi
trajectory per row (data/jacobi_trajectories.py): tokens = context ⊕ fixed point y*, and the states y the iteration
went through. Per row a state y is drawn, and, as the reference's trainer computes it:

  consistency   CLLM's global consistency loss: at the window's positions, the model's distribution given
                context ⊕ y is pulled toward its own distribution given context ⊕ y* (stop-gradient), by the soft
                cross-entropy -sum_v p*(v) log p(v) (forward KL up to a constant), averaged over the positions from
                the prediction of y's first wrong token up to the last valid one (before them y is y*)
  ar            label-smoothed next-token cross-entropy on context ⊕ y* (the teacher's output; smoothing 0.1)
  loss = consistency_weight * consistency + ar_weight * ar     (the reference: 1 and 10)

One forward runs both sequences (2B rows): the teacher sequence gives the AR loss and, stopped, the target.
"""

import dataclasses

import jax
import jax.numpy as jnp

from errors import checks
from models import llama

PARAMETERS = "llama"


@dataclasses.dataclass(frozen=True)
class Config(llama.Config):
    consistency_weight: float = 1.0
    ar_weight: float = 10.0
    label_smoothing: float = 0.1

    def __post_init__(self):
        super().__post_init__()
        checks.number("config.model.consistency_weight", self.consistency_weight, minimum=0)
        checks.number("config.model.ar_weight", self.ar_weight, minimum=0)
        checks.number("config.model.label_smoothing", self.label_smoothing, minimum=0, below=1)


def consistency_loss(state_logits_BTV, teacher_logits_BTV, state_tokens_BL, tokens_BL, end_B):
    """Mean over the counted positions of -sum_v softmax(teacher) log_softmax(state); 0 if none is counted.

    Position t predicts token t + 1. It counts from the prediction of the first token where the state sequence
    differs from the teacher's, up to the prediction of token end_B - 1 (the last valid one)."""
    T = state_logits_BTV.shape[1]
    target_t_T = jnp.arange(1, T + 1)
    differs_BT = state_tokens_BL[:, 1:] != tokens_BL[:, 1:]
    first_wrong_B = jnp.where(differs_BT.any(axis=1), jnp.argmax(differs_BT, axis=1) + 1, T + 1)
    counted_BT = (target_t_T[None] >= first_wrong_B[:, None]) & (target_t_T[None] < end_B[:, None])
    target_BTV = jax.nn.softmax(jax.lax.stop_gradient(teacher_logits_BTV), axis=-1)
    cross_entropy_BT = -jnp.sum(target_BTV * jax.nn.log_softmax(state_logits_BTV, axis=-1), axis=-1)
    count = jnp.sum(counted_BT)
    return jnp.sum(jnp.where(counted_BT, cross_entropy_BT, 0.0)) / jnp.maximum(count, 1)


def smoothed_next_token_loss(logits_BTV, tokens_BL, end_B, smoothing: float):
    """(label-smoothed cross-entropy, plain cross-entropy) of tokens 1..end_B - 1, means over those tokens:
    (1 - smoothing) * nll + smoothing * (mean over the vocabulary of -log p), as Hugging Face's LabelSmoother."""
    T = logits_BTV.shape[1]
    valid_BT = jnp.arange(1, T + 1)[None] < end_B[:, None]
    log_probs_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
    nll_BT = -jnp.take_along_axis(log_probs_BTV, tokens_BL[:, 1:, None], axis=-1)[..., 0]
    uniform_BT = -jnp.mean(log_probs_BTV, axis=-1)
    count = jnp.maximum(jnp.sum(valid_BT), 1)
    nll = jnp.sum(jnp.where(valid_BT, nll_BT, 0.0)) / count
    uniform = jnp.sum(jnp.where(valid_BT, uniform_BT, 0.0)) / count
    return (1 - smoothing) * nll + smoothing * uniform, nll


def state_tokens(batch: dict, state_index_B):
    """batch["tokens"] with each row's window replaced by its state number state_index_B."""
    tokens_BL, states_BJW = batch["tokens"], batch["states"]
    B, W = tokens_BL.shape[0], states_BJW.shape[-1]
    state_BW = jnp.take_along_axis(states_BJW, state_index_B[:, None, None], axis=1)[:, 0]
    window_BW = batch["window_start"][:, None] + jnp.arange(W)[None]
    return tokens_BL.at[jnp.arange(B)[:, None], window_BW].set(state_BW, mode="drop")


class Model(llama.Model):
    config: Config
    batch_format = "jacobi_trajectories"

    def flops_per_token(self, seq_len: int) -> float:
        """Per token of a row: its teacher and its state sequence both run forward and backward."""
        return 2 * super().flops_per_token(seq_len)

    def loss(self, params, batch: dict, rng=None) -> tuple[jax.Array, dict]:
        """The CLLM loss on a batch of data/jacobi_trajectories.py (rng draws each row's state); on a text batch
        (the validation split's, evaluators/validation.py), the language model's next-token loss."""
        if "states" not in batch:
            return super().loss(params, batch, rng)
        cfg = self.config
        tokens_BL = batch["tokens"]
        B = tokens_BL.shape[0]
        state_index_B = jax.random.randint(rng, (B,), 0, batch["num_states"])
        state_tokens_BL = state_tokens(batch, state_index_B)
        logits_2BTV, _ = self.apply({"params": params}, jnp.concatenate([tokens_BL, state_tokens_BL])[:, :-1])
        teacher_BTV, state_BTV = logits_2BTV[:B], logits_2BTV[B:]
        end_B = batch["window_start"] + batch["valid"]
        consistency = consistency_loss(state_BTV, teacher_BTV, state_tokens_BL, tokens_BL, end_B)
        ar, next_token = smoothed_next_token_loss(teacher_BTV, tokens_BL, end_B, cfg.label_smoothing)
        loss = cfg.consistency_weight * consistency + cfg.ar_weight * ar
        return loss, {"loss": loss, "consistency_loss": consistency, "ar_loss": ar, "next_token_loss": next_token}

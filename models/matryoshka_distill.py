"""MatryoshkaKV training (Lin et al., arXiv 2410.14731, section 1.5 of the research notes): the bases of
models/matryoshka_kv.py trained by distillation from the same model uncompressed, with the base model frozen.

The parameters are models/llama.py's with kv_rank > 0 (PARAMETERS below), so a run starts from any Llama checkpoint
(workdir:, hf:, gguf:) plus the PCA bases of config.model.kv_bases (train.py takes the missing matryoshka_kv subtree
from that file, checkpoints/restore.py), and its checkpoints evaluate and decode as a compressed Llama. On a text
batch {"tokens": [B, T + 1]}:

  teacher   the uncompressed model (the same parameters without the matryoshka_kv subtree, kv_rank 0), stopped
  student   the compressed model, each (layer, KV head, key or value) unit at a rank drawn i.i.d. from the schedule
            (multiples of rank_step below kv_rank, and kv_rank itself; default rank_step head_dim / 4, so at
            kv_rank = head_dim: {H/4, H/2, 3H/4, H}, uniform), traced through MatryoshkaKV's RANKS collection
  kl        KL(teacher || student) of the softmaxes at `temperature`, times temperature^2, summed over the
            vocabulary and averaged over positions (the reference's)
  ce        the student's next-token cross-entropy
  loss = kl_weight * kl + ce_weight * ce      (the reference's live weights: 0.25 and 0.75, temperature 1)

Every parameter outside the matryoshka_kv subtrees passes through stop_gradient, so its gradient is exactly zero and
AdamW with weight_decay 0 leaves it bit-identical (with weight_decay > 0 decay would still shrink it). Without an rng
(evaluators/validation.py) the student runs at its configured ranks (kv_rank, or kv_key_ranks / kv_value_ranks).
"""

import dataclasses

import jax
import jax.numpy as jnp

from errors import InputError, checks
from models import llama, matryoshka_kv, matryoshka_pca
from models.matryoshka_kv import RANKS

PARAMETERS = "llama"
SUBTREE = matryoshka_pca.SUBTREE


@dataclasses.dataclass(frozen=True)
class Config(llama.Config):
    kl_weight: float = 0.25
    ce_weight: float = 0.75
    temperature: float = 1.0
    rank_step: int = 0  # the schedule's step; 0 = head_dim // 4

    def __post_init__(self):
        super().__post_init__()
        if not self.kv_rank:
            raise InputError("config.model.kv_rank=0: model matryoshka_distill trains MatryoshkaKV bases and needs "
                             f"kv_rank in [1, {self.head_dim}] (config.model.head_dim for training at every rank)")
        checks.number("config.model.kl_weight", self.kl_weight, minimum=0)
        checks.number("config.model.ce_weight", self.ce_weight, minimum=0)
        checks.number("config.model.temperature", self.temperature, above=0)
        if self.kl_weight + self.ce_weight <= 0:
            raise InputError(f"config.model.kl_weight={self.kl_weight} and config.model.ce_weight={self.ce_weight}: "
                             "at least one must be > 0")
        step = self.rank_step
        if not checks.is_int(step) or step < 0 or (step and self.head_dim % step):
            raise InputError(f"config.model.rank_step={step!r} must be 0 (head_dim // 4) or a positive divisor of "
                             f"config.model.head_dim={self.head_dim}")

    @property
    def rank_schedule(self) -> tuple:
        """The ranks a unit is drawn from: multiples of the step below kv_rank, and kv_rank (the full width)."""
        step = self.rank_step or max(self.head_dim // 4, 1)
        return tuple(range(step, self.kv_rank, step)) + (self.kv_rank,)


def frozen_base(params):
    """params with stop_gradient on every leaf outside the matryoshka_kv subtrees."""
    return {name: value if name == SUBTREE else
            frozen_base(value) if isinstance(value, dict) else jax.lax.stop_gradient(value)
            for name, value in params.items()}


def teacher_model(config: Config) -> llama.Model:
    """The uncompressed Llama with the same architecture (detached: a module built inside another's method would
    otherwise become its child)."""
    fields = {field.name: getattr(config, field.name) for field in dataclasses.fields(llama.Config)}
    return llama.Model(llama.Config(**{**fields, "kv_rank": 0, "kv_key_ranks": (), "kv_value_ranks": (),
                                       "kv_bases": ""}), parent=None)


def sample_ranks(config: Config, rng) -> dict:
    """A RANKS collection: each softmax layer's key and value ranks [K] int32, i.i.d. uniform over the schedule."""
    schedule = jnp.asarray(config.rank_schedule, jnp.int32)
    layers = [i for i in range(config.num_layers) if config.mixer(i) == "softmax"]
    draws_L2K = jax.random.randint(rng, (len(layers), 2, config.num_kv_heads), 0, len(schedule))
    return matryoshka_kv.ranks_collection(layers, schedule[draws_L2K[:, 0]], schedule[draws_L2K[:, 1]])


def kl_divergence(teacher_logits_BTV, student_logits_BTV, temperature: float = 1.0):
    """Mean over positions of sum_v p_t (log p_t - log p_s) at the temperature, times temperature^2."""
    log_p_t = jax.nn.log_softmax(teacher_logits_BTV.astype(jnp.float32) / temperature, axis=-1)
    log_p_s = jax.nn.log_softmax(student_logits_BTV.astype(jnp.float32) / temperature, axis=-1)
    kl_BT = jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)
    return jnp.mean(kl_BT) * temperature ** 2


def distillation_loss(config: Config, teacher_logits_BTV, student_logits_BTV, targets_BT) -> tuple[jax.Array, dict]:
    kl = kl_divergence(jax.lax.stop_gradient(teacher_logits_BTV), student_logits_BTV, config.temperature)
    ce = llama.next_token_loss(student_logits_BTV, targets_BT)
    loss = config.kl_weight * kl + config.ce_weight * ce
    return loss, {"loss": loss, "kl": kl, "next_token_loss": ce}


class Model(llama.Model):
    config: Config

    def flops_per_token(self, seq_len: int) -> float:
        """The student forward and backward, and the teacher's forward (a third of that)."""
        return super().flops_per_token(seq_len) * 4 / 3

    def loss(self, params, batch: dict, rng=None) -> tuple[jax.Array, dict]:
        """The distillation loss on a text batch; rng draws the student's ranks (None: its configured ranks)."""
        tokens_BT1 = batch["tokens"]
        inputs_BT, targets_BT = tokens_BT1[:, :-1], tokens_BT1[:, 1:]
        params = frozen_base(params)
        teacher_BTV, _ = teacher_model(self.config).apply({"params": matryoshka_pca.base_params(params)}, inputs_BT)
        variables = {"params": params}
        if rng is not None:
            variables[RANKS] = sample_ranks(self.config, rng)
        student_BTV, _ = self.apply(variables, inputs_BT)
        return distillation_loss(self.config, teacher_BTV, student_BTV, targets_BT)

"""MatryoshkaKV training (models/matryoshka_distill.py): the key and value bases of models/matryoshka_kv.py trained
from their PCA initialisation by distillation from the uncompressed model, with the base model frozen. Three steps:
PCA bases of the base model, the training run, evaluation at a lower rank.

  tiny     the base is configs/lm.py:tiny trained by `python train.py --config=configs/lm.py:tiny
           --workdir=workdirs/tiny`:
             python tools/matryoshka_pca.py --config=configs/lm.py:tiny --workdir=workdirs/tiny --num_tokens=16384
             python train.py --config=configs/matryoshka_kv.py:tiny --workdir=workdirs/matryoshka_tiny
             python evaluate.py --config=configs/lm.py:tiny --workdir=workdirs/matryoshka_tiny \
                 --config.model.kv_rank=16 --config.evaluate.run='("validation",)'
  smollm2  SmolLM2-135M-Instruct from its GGUF file (configs/smollm2.py; head_dim 64):
             python tools/matryoshka_pca.py --config=configs/smollm2.py --workdir=workdirs/smollm2 --num_tokens=16384
             python train.py --config=configs/matryoshka_kv.py:smollm2 --workdir=workdirs/matryoshka_smollm2
             python evaluate.py --config=configs/smollm2.py --workdir=workdirs/matryoshka_smollm2 \
                 --config.model.kv_rank=32 --config.evaluate.run='("validation",)'
  The evaluation runs the plain Llama family (the checkpoint's parameters are Llama's with the trained bases, and no
  kv_bases file replaces them, checkpoints/restore.py): its validation loss is the next-token loss of the model
  compressed to kv_rank. Adding --config.model.kv_bases=workdirs/tiny/matryoshka_kv.npz with the base workdir
  (--workdir=workdirs/tiny) measures the PCA bases at the same rank. Under this config (configs/matryoshka_kv.py)
  evaluate.py's validation loss is the distillation loss, 0.25 KL + 0.75 CE.

Measured on SmolLM2 (2 CPU cores, Python 3.11 / jax 0.10.2; 16,384 PCA calibration tokens): Matryoshka training
with --config.model.rank_step=8 --config.train.num_steps=120 (ranks drawn from {8, 16, ..., 64}; 22.5 minutes) and,
for comparison, training at one fixed rank with --config.model.kv_rank=26 --config.model.rank_step=64 (the 40%
budget; 24.4 minutes), into workdirs/matryoshka_smollm2 and workdirs/matryoshka_fixed_smollm2; per-head rates for
each by
    python tools/matryoshka_rates.py --config=configs/smollm2.py --workdir=WORKDIR --budget=0.75,0.5,0.4,0.25 \
        --rank_step=16 --units_per_round=36 --calibration_tokens=128   [--config.model.kv_bases=... for PCA]
(12.7 minutes each; at step 16 the 25% budget leaves every unit at 16: searched = uniform there); then
    python benchmarks/matryoshka_kv.py --init-from=gguf:$GGUF --bases pca=workdirs/smollm2/matryoshka_kv.npz \
        fixed=workdirs/matryoshka_fixed_smollm2 matryoshka=workdirs/matryoshka_smollm2
(12 minutes). Next-token accuracy retained (accuracy / the uncompressed model's 0.488 on 8,192 validation tokens,
perplexity 15.77), uniform / searched ranks:
    budget          75%            50%            40%            25%
    PCA             0.767 / 0.931  0.541 / 0.763  0.434 / 0.682  0.327
    fixed rank 26   0.965 / 0.978  0.914 / 0.889  0.886 / 0.818  0.600
    Matryoshka      0.979 / 0.983  0.909 / 0.903  0.846 / 0.841  0.621
(uniform 40% is rank 26 of 64, 40.6%). Perplexity at 40%: PCA 108.6 / 42.0, fixed 21.0 / 25.6, Matryoshka
24.8 / 24.6. 120 steps fall short of the paper's 90%-at-40% target: Matryoshka keeps 0.84 there, twice PCA's
uniform 0.43 and above PCA's searched 0.68, but below the model trained at that very rank (0.89), which it beats
at 75% and 25%, the ranks that model was not trained for.

train.py starts from config.init_from (the base checkpoint) and takes the matryoshka_kv subtree it lacks from
config.model.kv_bases. kv_rank = head_dim: each step draws every (layer, KV head, key or value) unit's rank uniformly
from the multiples of config.model.rank_step up to H (default head_dim / 4: {H/4, H/2, 3H/4, H}). The loss is the
reference's: 0.25 KL(teacher || student) at temperature 1 + 0.75 next-token cross-entropy. Only the bases and means
get gradients (every other parameter is under stop_gradient), and weight_decay is 0, so AdamW leaves the base
model's weights bit-identical; a weight_decay > 0 would decay them. The learning rate is the reference's projection
learning rate, 1e-3 (AdamW, cosine, warmup, clipping at 1.0).
"""

from configs import lm, smollm2

PRESETS = ("tiny", "smollm2")
HEAD_DIMS = {"tiny": 32, "smollm2": 64}  # the base checkpoints' head_dim (init_from sets the architecture)


def get_config(preset: str = "tiny"):
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} for configs/matryoshka_kv.py; choose one of {', '.join(PRESETS)}")
    config = smollm2.get_config() if preset == "smollm2" else lm.get_config("tiny")
    if preset == "tiny":
        config.init_from = "workdir:workdirs/tiny"
    config.model.update(name="matryoshka_distill", kv_rank=HEAD_DIMS[preset],
                        kv_bases=f"workdirs/{preset}/matryoshka_kv.npz")
    config.model.kl_weight = 0.25
    config.model.ce_weight = 0.75
    config.model.temperature = 1.0
    config.model.rank_step = 0  # 0 = head_dim // 4
    config.data.update(seq_len=128, global_batch_size=16)
    config.optimizer.update(learning_rate=1e-3, warmup_steps=20, weight_decay=0.0, grad_clip_norm=1.0)
    config.train.update(num_steps=500, log_every=25, checkpoint_every=100, evaluate_every=100)
    config.train.evaluators = ("validation",)
    config.evaluate.run = ("validation",)
    if preset == "smollm2":
        config.data.update(global_batch_size=8)
        config.train.update(num_steps=200, log_every=10, checkpoint_every=50, evaluate_every=0)
    return config

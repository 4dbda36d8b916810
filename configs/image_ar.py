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
  shapes  2.2M parameters (1.3M of them the diffusion head), 2 CPU cores. The measured run is three runs, each
          starting from the one before (init_from: parameters only, a fresh optimizer and schedule):
            python train.py --config=configs/image_ar.py:shapes --workdir=workdirs/image_ar
            python train.py --config=configs/image_ar.py:shapes --workdir=workdirs/image_ar_ft \
                --config.init_from=workdir:workdirs/image_ar --config.model.text_weight=0.02 \
                --config.train.num_steps=2000
            python train.py --config=configs/image_ar.py:shapes --workdir=workdirs/image_ar_ft2 \
                --config.init_from=workdir:workdirs/image_ar_ft --config.model.text_weight=0.02 \
                --config.train.num_steps=1400
            python evaluate.py --config=configs/image_ar.py:shapes --workdir=workdirs/image_ar_ft2 \
                --config.model.text_weight=0.02
            python benchmarks/image_ar.py --workdir=workdirs/image_ar_ft2 --prompts-per-task=4 --images-per-prompt=8 \
                --repeats=2
          The first renders the 22,000-image world once (TFDS, array_record). 5,800 steps of 32 images in all
          (~9 epochs), 0.76-0.94 s/step, ~86 minutes on 2 shared CPU cores (~37 + 31 + 18). Expect:
            steps 2400 (text_weight 1): caption loss 0.48, diffusion loss 0.019; validation diffusion loss 0.0209,
              0.0211 with every caption dropped: the images barely depend on their captions, and GenEval is 0.01
            + 2000 at text_weight 0.02 (the caption's cross-entropy, 25x the diffusion loss, had most of the
              backbone's gradient): validation diffusion 0.0125 (0.0129 without captions), GenEval 0.17
            + 1400: validation diffusion 0.0095 (0.0100 without captions), caption loss 0.455; GenEval over 80
              images (evaluate.py): single object 1.00, two objects 0.38, counting 0.17, colours 0.06, position 0.06,
              colour attribution 0.00, overall 0.28. The shapes are clean and counts follow "four" somewhat; colours
              and positions do not follow the caption yet (the losses were still falling: train longer).
          benchmarks/image_ar.py on 160 images (20 held-out prompts x 8), DDPM, guidance 3: constant 50 steps
          5.0 images/s, GenEval 0.248; constant 100 2.6/s, 0.243; DiSA 50 -> 5 linear 8.8/s (1.75x over 50, 3.4x
          over 100), 0.248; cosine 8.9/s (1.76x), 0.250; two-stage 8.6/s (1.71x), 0.248; constant 5 31.2/s (6.2x),
          0.227. Every 50 -> 5 schedule runs ~27.5 steps a token, so 1.8x over constant 50 is its ceiling.

Sampling (config.evaluate.image_generation): DDPM, 50 steps per token (DiSA constant), temperature 1, guidance 3
(the unconditional rows batched with the conditional ones), x0 clipped to the pixel range. Temperatures below 1
collapse raster-order sampling to the background (each token's likeliest value is background, so no object is
ever started): 0.4 gave blank images. Speed does not depend on the weights.
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
    config.model.diffusion_batch_mul = 2  # (t, noise) draws per image token (MAR: 4, Orthus: 8); see above
    config.model.caption_drop_rate = 0.1  # captions replaced by the null caption, for classifier-free guidance
    config.model.text_weight = 0.02  # loss = text_weight * caption cross-entropy + diffusion loss; see above

    config.data.corpus = "shapes_world"  # data/shapes_dataset.py through data/corpus.py
    config.data.text_key = "caption"
    config.data.world = ml_collections.ConfigDict(dict(seed=0, num_train=20_000, num_validation=1_000,
                                                       num_test=1_000, held_out_fraction=0.2))
    config.data.caption_tokens = 16  # text positions per row: caption, its end and left padding
    config.data.seq_len = 16 + 64  # caption_tokens + image tokens: train.py's tokens/s and FLOPs read it
    config.data.global_batch_size = 32

    config.optimizer.update(learning_rate=1e-3, warmup_steps=100, weight_decay=0.02, grad_clip_norm=3.0)
    config.train.update(num_steps=8500, log_every=50, checkpoint_every=500, evaluate_every=3000,
                        evaluators=("validation", "image_generation"))
    config.evaluate.run = ("validation", "image_generation")
    config.evaluate.validation.num_batches = 8  # 256 of the validation split's images: caption and diffusion loss
    config.evaluate.image_generation = ml_collections.ConfigDict(dict(
        prompts="held_out",  # the test split's prompts, never in training; "seen": the train split's captions
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
        config.evaluate.validation.num_batches = 1
        config.optimizer.update(warmup_steps=2)
        config.train.update(num_steps=4, log_every=1, checkpoint_every=2, evaluate_every=4)
        config.evaluate.image_generation.update(prompts_per_task=1, images_per_prompt=2, batch_size=16)
        config.evaluate.image_generation.steps.update(strategy="linear", steps_up=4, steps_low=2)
    return config

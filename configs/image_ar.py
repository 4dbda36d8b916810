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
  shapes  2.2M parameters (1.3M of them the diffusion head), 2 CPU cores, one run:
            python train.py --config=configs/image_ar.py:shapes --workdir=workdirs/image_ar
            python evaluate.py --config=configs/image_ar.py:shapes --workdir=workdirs/image_ar
            python evaluate.py --config=configs/image_ar.py:shapes --workdir=workdirs/image_ar \
                --config.evaluate.image_generation.prompts=seen
            python benchmarks/image_ar.py --workdir=workdirs/image_ar --prompts-per-task=4 --images-per-prompt=8 \
                --repeats=2
          The first renders the 22,000-image world once (TFDS, array_record, ~20 s). 8,500 steps of 32 images
          (~14 epochs), 0.6-0.7 s/step, 92 minutes on 2 CPU cores with its three evaluations. The caption's
          cross-entropy is weighted 0.02: at weight 1 (25x the diffusion loss) it took most of the backbone's
          gradient and the images ignored their captions (2,400 steps: GenEval 0.01). Two (t, eps) draws per token,
          not MAR's four: the backbone is most of a step here (batch 32: 0.48 s with one draw, ~0.65 s with two,
          ~0.95 s with four), so two buy ~45% more steps in the same time. Expect (validation diffusion loss with
          captions / with every caption dropped; GenEval of 80 images of held-out prompts, DDPM 50, guidance 3):
            step 3000: 0.0180 / 0.0187, GenEval 0.27
            step 6000: 0.0102 / 0.0109, GenEval 0.34
            step 8500: 0.0071 / 0.0078, caption loss 0.454, GenEval 0.29: single object 1.00, two objects 0.31,
              counting 0.17, colours 0.13, position 0.13, colour attribution 0.00
          and on 96 images of seen prompts (prompts=seen) 0.33: 0.69, 0.50, 0.44, 0.19, 0.19, 0.00; so the shortfall
          is following captions at all, not only generalising to new ones. Shapes are clean and their kinds follow
          the caption; counts and colours only partly, two-colour prompts not at all (an overall score's standard
          error is ~0.05 at 80 images, ~0.035 at 160).
          benchmarks/image_ar.py on 160 images (20 held-out prompts x 8), DDPM, guidance 3: constant 50 steps
          4.3 images/s, GenEval 0.326; constant 100 2.3/s, 0.326; DiSA 50 -> 5 linear 7.9/s (1.82x over 50, 3.4x
          over 100), 0.259; cosine 7.3/s (1.69x), 0.337; two-stage 7.6/s (1.75x), 0.297; constant 5 23.3/s (5.4x),
          0.276. Every 50 -> 5 schedule runs ~27.5 steps a token, so 1.8x over constant 50 is its ceiling.

Sampling (config.evaluate.image_generation): DDPM, 50 steps per token (DiSA constant), temperature 1, guidance 3
(the unconditional rows batched with the conditional ones), x0 clipped to the pixel range. Temperatures below 1
collapse raster-order sampling to the background (each token's likeliest value is background, so no object is
ever started): 0.4 gave blank images; at step 8500 on 96 seen-prompt images, temperature 0.9 scored 0.29 and
guidance 5 0.35 against 0.30 for (1, 3), all within noise. Speed does not depend on the weights.
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

"""The linear-attention decoder (Lightning Attention-2 token mixer, TransNormerLLM style) on the default corpus.

Same data, optimizer and sizes as configs/lm.py, so runs compare one to one. Presets:

  tiny         every layer linear attention; decoding carries a constant-size state per layer:
                 python train.py --config=configs/lightning.py:tiny --workdir=workdirs/lightning_tiny
                 python evaluate.py --config=configs/lightning.py:tiny --workdir=workdirs/lightning_tiny
  tiny_hybrid  softmax attention kept in every 2nd layer:
                 python train.py --config=configs/lightning.py:tiny_hybrid --workdir=workdirs/lightning_hybrid
  small        the ~100M model of configs/lm.py:small with linear attention, on a GPU (Pallas kernel):
                 python train.py --config=configs/lightning.py:small --workdir=workdirs/lightning_small
               (not run yet: no GPU so far)

benchmarks/lightning_quality.py trains tiny, tiny_hybrid and configs/lm.py:tiny for the same steps and tabulates
their validation losses. Measured on 2 CPU cores at 300 steps (~3 minutes each): validation loss 5.20 (lightning),
5.19 (hybrid), 5.36 (softmax).
"""

from configs import lm

PRESETS = ("tiny", "tiny_hybrid", "small")


def get_config(preset: str = "tiny"):
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} for configs/lightning.py; choose one of {', '.join(PRESETS)}")
    config = lm.get_config("small" if preset == "small" else "tiny")
    config.model.mixer_pattern = "lightning,softmax" if preset == "tiny_hybrid" else "lightning"
    if preset == "small":
        config.model.lightning_implementation = "pallas"
        config.model.lightning_decode_implementation = "pallas"
    return config

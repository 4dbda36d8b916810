"""decodelab: fast generation with autoregressive models, in JAX.

Install for development and tests:  pip install -e ".[test]"
"""

import setuptools

setuptools.setup(
    name="decodelab",
    version="0.1.0",
    # Tested at both ends: Python 3.11 with jax 0.10.2, Python 3.12 with jax 0.12.0.1 (README, "Supported versions").
    python_requires=">=3.11",
    packages=setuptools.find_packages(
        include=["configs*", "errors*", "evaluators*", "models*", "samplers*", "pallas_kernels*", "data*",
                 "parallel*", "shapes*", "checkpoints*", "metrics*", "tools*", "benchmarks*"]),
    py_modules=["train", "evaluate"],
    install_requires=[
        "jax>=0.10,<0.13",
        "flax>=0.12",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.12",
        "tensorflow-datasets>=4.9.9",
        "array-record>=0.8",
        "tokenizers>=0.21",
        "ml-collections>=1.0",
        "absl-py",
        "numpy",
        "einops",
        "safetensors>=0.4",
        "gguf>=0.19",  # llama.cpp checkpoints (checkpoints/gguf.py)
        "tensorboardX",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        # torch and transformers are used only as references in parity tests and benchmarks; transformers reads
        # GGUF files (the GGUF tests' reference) only with accelerate, and gguf, which the base install has.
        "test": ["pytest", "pytest-xdist", "scipy", "chex", "torch==2.13.0", "transformers>=4.46", "accelerate"],
    },
)

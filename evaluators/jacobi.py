"""Jacobi decoding (samplers/jacobi.py) against greedy decoding on next-line prompts from held-out code: the counts
CLLM reports (tokens committed per iteration, fast-forwarded and stationary tokens), forwards of the model per
generated token, and the share of prompts whose tokens are greedy decoding's (all of them, or Jacobi is wrong).
The counts depend only on the model and the prompts; wall time, which an evaluation would mix with compilation,
is benchmarks/jacobi.py's.

config.evaluate.jacobi: window (samplers.jacobi.JacobiConfig), prefix_tokens, new_tokens, num_prompts (the prompt
rule of the Superposed evaluator, metrics/drafts.py; both decode new_tokens tokens or up to the tokenizer's EOS).
"""

from data import corpus, tokenizer as tokenizer_lib
from errors import InputError, checks
from metrics import drafts
from samplers.engine import Sampler, SamplerConfig
from samplers.jacobi import Jacobi, JacobiConfig


def method_config(section) -> JacobiConfig:
    try:
        return JacobiConfig(window=section.window)
    except InputError as error:
        raise InputError(f"config.evaluate.{error}") from None


def validate(section, config) -> None:
    window = method_config(section).window
    for name in ("prefix_tokens", "new_tokens", "num_prompts"):
        checks.integer(f"config.evaluate.jacobi.{name}", section[name], minimum=1)
    if window + 2 > config.model.max_seq_len:  # what Jacobi.prepare checks once the sampler exists
        raise InputError(f"config.evaluate.jacobi.window={window}: a step writes window + 1 = {window + 1} "
                         f"positions after the prompt, which config.model.max_seq_len={config.model.max_seq_len} "
                         "cannot hold")


class Evaluator:
    def __init__(self, section, context):
        self.section, self.context = section, context
        self.method = method_config(section)
        validation = context.sources["validation"]
        texts = (corpus.record_text(validation[i], context.config.data) for i in range(len(validation)))
        self.prompts = [p["prompt_tokens"] for p in drafts.next_line_prompts(
            context.tokenizer, texts, section.prefix_tokens, section.new_tokens, section.num_prompts,
            context.config.seed)]
        if not self.prompts:
            raise InputError(f"no held-out text has a line break after config.evaluate.jacobi.prefix_tokens="
                             f"{section.prefix_tokens} tokens followed by a line of at most "
                             f"config.evaluate.jacobi.new_tokens={section.new_tokens} tokens")

    def run(self, params) -> dict:
        ctx, section = self.context, self.section
        engine_config = SamplerConfig(max_new_tokens=section.new_tokens,
                                      stop_tokens=(tokenizer_lib.eos_id(ctx.tokenizer),))
        greedy = Sampler(ctx.model, params, ctx.tokenizer, engine_config, mesh=ctx.mesh, rules=ctx.rules)
        greedy_tokens = greedy.generate_tokens(self.prompts).tokens
        jacobi = Sampler(ctx.model, params, ctx.tokenizer, engine_config, Jacobi(self.method), mesh=ctx.mesh,
                         rules=ctx.rules)
        state = jacobi.decode(jacobi.prefill(self.prompts))
        tokens = jacobi.output(state, len(self.prompts)).tokens
        return {"prompts": len(self.prompts), "window": self.method.window, "new_tokens": section.new_tokens,
                "equal_to_greedy": sum(t == g for t, g in zip(tokens, greedy_tokens)) / len(self.prompts),
                **jacobi.strategy.summary(jacobi, state, len(self.prompts))}

    def report(self, results: dict) -> None:
        setting = (f"Jacobi decoding, window {results['window']}, {results['prompts']} prompts, up to "
                   f"{results['new_tokens']} new tokens")
        if not results["iterations"]:
            print(f"{setting}: no step ran (every prompt ended at its first token)")
            return
        print(f"{setting}: {results['tokens_per_iteration']:.3f} tokens per iteration "
              f"({results['fast_forwarded_per_iteration']:.3f} fast-forwarded, "
              f"{results['stationary_per_iteration']:.3f} stationary), {results['forwards_per_token']:.3f} "
              f"forwards per token; tokens equal to greedy's for {results['equal_to_greedy']:.0%} of the prompts")

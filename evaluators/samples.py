"""Completions of code prompts from the validation split, with each configured sampler (plain sampling).

config.evaluate.samples: num_prompts, prompt_chars (each prompt ends with a document's first `def` line),
max_new_tokens, samplers (name -> samplers.sampling.SamplingConfig fields).
"""

from data import pipeline, tokenizer as tokenizer_lib
from errors import InputError, checks
from samplers.engine import Sampler, SamplerConfig
from samplers.plain import PlainSampling
from samplers.sampling import SamplingConfig

PRINTED = ("greedy", "nucleus")  # report() prints these samplers' completions


def validate(section, config) -> None:
    checks.integer("config.evaluate.samples.num_prompts", section.num_prompts, minimum=0)
    checks.integer("config.evaluate.samples.prompt_chars", section.prompt_chars, minimum=1)
    checks.integer("config.evaluate.samples.max_new_tokens", section.max_new_tokens, minimum=1)
    for name, fields in section.samplers.items():
        sampling_config(name, fields)


def sampling_config(name: str, fields) -> SamplingConfig:
    try:
        return SamplingConfig(**fields)
    except (TypeError, InputError) as error:
        raise InputError(f"config.evaluate.samples.samplers.{name}: {error}") from None


class Evaluator:
    def __init__(self, section, context):
        self.section, self.context = section, context
        self.prompts = pipeline.validation_prompts(context.config.data, context.sources["validation"],
                                                   section.num_prompts, section.prompt_chars)

    def run(self, params) -> dict:
        ctx = self.context
        engine_config = SamplerConfig(max_new_tokens=self.section.max_new_tokens,
                                      stop_tokens=(tokenizer_lib.eos_id(ctx.tokenizer),))
        results = {}
        for name, fields in (self.section.samplers.items() if self.prompts else ()):
            sampler = Sampler(ctx.model, params, ctx.tokenizer, engine_config,
                              PlainSampling(sampling_config(name, fields)), mesh=ctx.mesh, rules=ctx.rules)
            output = sampler.generate(self.prompts, seed=ctx.config.seed)
            results[name] = [{"prompt": prompt, "completion": text} for prompt, text in zip(self.prompts, output.text)]
        return results

    def report(self, results: dict) -> None:
        for name in PRINTED:
            for sample in results.get(name, ()):
                print(f"{'-' * 30} {name} {'-' * 30}\n{sample['prompt']}\033[1m{sample['completion']}\033[0m")

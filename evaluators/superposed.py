"""Superposed Decoding against nucleus sampling run k times and greedy decoding, as the paper compares them, on
next-line prompts from held-out code (metrics/drafts.py has the metrics).

config.evaluate.superposed: the fields of samplers.superposed.SuperposedConfig (the method), and ngram_store ("" =
WORKDIR/ngrams.npz; the evaluator is skipped when that default store is missing, an explicitly configured missing
store is an error), prefix_tokens, new_tokens, long_new_tokens (the two settings compared), num_prompts, grader
("" or a Hugging Face checkpoint directory sharing the tokenizer, which scores the drafts' perplexity too).
"""

import dataclasses
import os

import flax.linen as nn

from checkpoints import huggingface
from data import corpus, tokenizer as tokenizer_lib
from errors import InputError, checks
from metrics import drafts
from samplers import ngram_store
from samplers.engine import Sampler, SamplerConfig
from samplers.plain import PlainSampling
from samplers.sampling import SamplingConfig
from samplers.superposed import Superposed, SuperposedConfig

NUCLEUS = SamplingConfig(temperature=0.6, top_p=0.9)  # the paper's baseline
_METHOD_FIELDS = tuple(field.name for field in dataclasses.fields(SuperposedConfig))


def method_config(section) -> SuperposedConfig:
    try:
        return SuperposedConfig(**{name: section[name] for name in _METHOD_FIELDS})
    except InputError as error:
        raise InputError(f"config.evaluate.{error}") from None


def validate(section, config) -> None:
    method_config(section)
    for name in ("prefix_tokens", "new_tokens", "long_new_tokens", "num_prompts"):
        checks.integer(f"config.evaluate.superposed.{name}", section[name], minimum=1)
    if section.ngram_store and not os.path.isfile(section.ngram_store):
        raise InputError(f"config.evaluate.superposed.ngram_store={section.ngram_store!r} does not exist; build it "
                         f"with: {ngram_store.BUILD_COMMAND}")
    if section.grader and not os.path.isdir(section.grader):
        raise InputError(f"config.evaluate.superposed.grader={section.grader!r} is not a Hugging Face checkpoint "
                         "directory")


class Evaluator:
    def __init__(self, section, context):
        self.section, self.context = section, context
        self.method = method_config(section).resolved()
        store_path = section.ngram_store or os.path.join(context.workdir, "ngrams.npz")
        self.skipped = None
        if not section.ngram_store and not os.path.exists(store_path):
            self.skipped = f"no n-gram store at {store_path}; build it with: {ngram_store.BUILD_COMMAND}"
            return
        self.store = ngram_store.load_ngram_store(store_path)
        self.grader = load_grader(section.grader, context.tokenizer, context.mesh, context.rules) \
            if section.grader else None
        validation = context.sources["validation"]
        texts = (corpus.record_text(validation[i], context.config.data) for i in range(len(validation)))
        self.prompts = drafts.next_line_prompts(context.tokenizer, texts, section.prefix_tokens, section.new_tokens,
                                                section.num_prompts, context.config.seed)
        if not self.prompts:
            raise InputError(f"no held-out text has a line break after config.evaluate.superposed.prefix_tokens="
                             f"{section.prefix_tokens} tokens followed by a line of at most "
                             f"config.evaluate.superposed.new_tokens={section.new_tokens} tokens")

    def run(self, params) -> dict:
        """For each setting (new_tokens, long_new_tokens), one row per method (superposed, nucleus_x{k}, greedy),
        plus the protocol and a few example drafts. Draft tokens include a stop token when they end in one; text
        and diversity exclude it."""
        if self.skipped:
            return {"skipped": self.skipped}
        ctx, section, k = self.context, self.section, self.method.num_drafts
        prompts = self.prompts
        prompt_tokens = [p["prompt_tokens"] for p in prompts]
        stop_tokens = (tokenizer_lib.eos_id(ctx.tokenizer),)
        results = {"protocol": {
            "prompts": len(prompts), "prefix_tokens": section.prefix_tokens, "num_drafts": k,
            "method": dataclasses.asdict(self.method), "bos": tokenizer_lib.bos_ids(ctx.tokenizer),
            "rule": "prompt = prefix_tokens tokens (BOS first where the tokenizer adds one) ending at a line break; "
                    "P@j: a draft's first line (stripped) equals the true next line (stripped), whose own tokens "
                    "fit in new_tokens",
            "nucleus": {"temperature": NUCLEUS.temperature, "top_p": NUCLEUS.top_p, "runs": k},
            "superposed_order": "drafts sorted by score per token (lowest interpolated perplexity first)",
            "nucleus_order": "run order", "grader": bool(self.grader)}}
        for setting, new_tokens in (("short", section.new_tokens), ("long", section.long_new_tokens)):
            engine_config = SamplerConfig(max_new_tokens=new_tokens, stop_tokens=stop_tokens)

            def sampler(strategy):
                return Sampler(ctx.model, params, ctx.tokenizer, engine_config, strategy, mesh=ctx.mesh,
                               rules=ctx.rules)

            output = sampler(Superposed(self.method, self.store)).generate_tokens(prompt_tokens)
            methods = {"superposed": (output.tokens, output.text)}
            nucleus = sampler(PlainSampling(NUCLEUS))
            runs = [nucleus.generate_tokens(prompt_tokens, seed=ctx.config.seed + i) for i in range(k)]
            methods[f"nucleus_x{k}"] = ([[run.tokens[p] for run in runs] for p in range(len(prompts))],
                                        [[run.text[p] for run in runs] for p in range(len(prompts))])
            greedy = sampler(PlainSampling()).generate_tokens(prompt_tokens)
            methods["greedy"] = ([[t] for t in greedy.tokens], [[t] for t in greedy.text])
            results[setting] = {"new_tokens": new_tokens, "table": self._table(params, methods, stop_tokens),
                                "examples": [{"prompt": ctx.tokenizer.decode(prompt_tokens[p]),
                                              "next_line": prompts[p]["next_line"],
                                              **{method: texts[p] for method, (_, texts) in methods.items()}}
                                             for p in range(min(3, len(prompts)))]}
        return results

    def _table(self, params, methods: dict, stop_tokens) -> dict:
        """Every draft of every method scored in one batched pass per scoring model, then one row per method."""
        ctx, k = self.context, self.method.num_drafts
        prompt_tokens = [p["prompt_tokens"] for p in self.prompts]
        pairs = [(m, p, d) for m, (tokens, _) in methods.items() for p in range(len(prompt_tokens))
                 for d in range(len(tokens[p]))]
        pair_prompts = [prompt_tokens[p] for _, p, _ in pairs]
        pair_drafts = [methods[m][0][p][d] for m, p, d in pairs]
        scorers = {"": (ctx.model, params)} | ({"grader_": self.grader} if self.grader else {})
        nll = {name: drafts.continuation_nll(*scorer, pair_prompts, pair_drafts, mesh=ctx.mesh, rules=ctx.rules)
               for name, scorer in scorers.items()}
        table = {}
        for method, (tokens, method_texts) in methods.items():
            per_prompt = {name: [[] for _ in prompt_tokens] for name in scorers}
            for (pair_method, p, _), *values in zip(pairs, *nll.values()):
                if pair_method == method:
                    for name, value in zip(scorers, values):
                        per_prompt[name][p].append(value)
            content = [[t[:-1] if t and t[-1] in stop_tokens else t for t in row] for row in tokens]
            table[method] = drafts.draft_table(self.prompts, content, method_texts, k, per_prompt[""],
                                               per_prompt.get("grader_"))
        return table

    def report(self, results: dict) -> None:
        if "skipped" in results:
            print(f"Superposed Decoding skipped: {results['skipped']}")
            return
        for setting in ("short", "long"):
            print(f"Superposed Decoding, {results[setting]['new_tokens']} new tokens, "
                  f"{results['protocol']['prompts']} prompts:")
            for method, row in results[setting]["table"].items():
                precision = _fmt([row[f"P@{j}"] for j in range(1, self.method.num_drafts + 1)])
                print(f"  {method:12s} ppl/draft {_fmt(row['perplexity_per_draft'])} best-of-k "
                      f"{_fmt(row['perplexity_best_of_k'])} P@1..k {precision} "
                      f"distinct-2 {_fmt(row['distinct_2'])} self-BLEU {_fmt(row['self_bleu'])}")


def load_grader(path: str, tokenizer, mesh=None, rules=None):
    """(model, params) of a Hugging Face checkpoint directory that scores drafts; it must share `tokenizer`."""
    grader_model, grader_params, grader_tokenizer = huggingface.load(path, mesh=mesh, rules=rules)
    if grader_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise InputError(f"config.evaluate.superposed.grader={path} has a different tokenizer from the evaluated "
                         "model's; a grader must share it to score the same tokens")
    return grader_model, nn.meta.unbox(grader_params)


def _fmt(value) -> str:
    if isinstance(value, list):
        return "/".join(_fmt(v) for v in value)
    return "-" if value is None else f"{value:.2f}"

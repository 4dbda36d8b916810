"""Quality of k drafts per prompt, as Superposed Decoding's paper measures it, adapted to code.

- perplexity of each draft's new tokens under a model given the prompt (the paper's coherence: per draft and
  best-of-k), from one batched forward;
- P@j on the true next line (the code analogue of the paper's TriviaQA/NQ exact match): a prompt counts if any of
  its first j drafts, cut at its first newline and stripped, equals the true next line stripped;
- diversity between a prompt's drafts: distinct-n (distinct n-grams / all n-grams, over the drafts' tokens) and
  Self-BLEU (each draft's BLEU-4 against the others, averaged; nltk's sentence_bleu with method1 smoothing).

evaluators/superposed.py runs the comparison with them: Superposed Decoding against nucleus sampling run k times and
greedy decoding, on next-line prompts from held-out text.
"""

import collections
import contextlib
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import shapes
from data import tokenizer as tokenizer_lib

BLEU_EPSILON = 0.1  # nltk SmoothingFunction().method1's default
_ROWS_PER_CALL = 64  # rows per forward when scoring perplexity; fixed so every call reuses one compilation
_LENGTH_MULTIPLE = 32
_CUTS_PER_TEXT = 4  # prompts drawn from one held-out text at most, so a few long files do not make the whole set


# ---------------------------------------------------------------------------------------------------------------------
# Prompts.

def next_line_prompts(tokenizer, texts, prefix_tokens: int, max_line_tokens: int, num_prompts: int,
                      seed: int = 0) -> list[dict]:
    """Up to num_prompts {"prompt_tokens", "next_line"}, at most _CUTS_PER_TEXT per text, in text order.

    The rule: tokenize the text; a cut e with a prompt's worth of text tokens before it qualifies when token e - 1
    holds a newline followed only by whitespace (so the prompt ends at a line break, with the next line's indentation
    as the tokenizer merges it), and the next line is not blank and is finished (its newline reached) within
    max_line_tokens tokens, so a draft of that many tokens can match it. Up to _CUTS_PER_TEXT qualifying cuts per text
    are drawn with `seed`; a prompt is prefix_tokens tokens: the tokenizer's BOS where its post-processor adds one,
    then the text tokens before the cut (the reference encodes with BOS and keeps the first prefix_tokens tokens);
    the next line is the text after the cut up to its newline.
    """
    rng = np.random.default_rng(seed)
    bos = tokenizer_lib.bos_ids(tokenizer)
    text_tokens = prefix_tokens - len(bos)
    prompts = []
    for text in texts:
        if len(prompts) == num_prompts:
            break
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        cuts = []
        for e in range(max(text_tokens, 1), len(ids)):
            token_text = tokenizer.decode(ids[e - 1:e])
            if "\n" not in token_text or token_text.rsplit("\n", 1)[1].strip():
                continue
            following = tokenizer.decode(ids[e:e + max_line_tokens])
            if "\n" in following and following.split("\n", 1)[0].strip():
                cuts.append((e, following.split("\n", 1)[0]))
        for index in sorted(rng.permutation(len(cuts))[:min(_CUTS_PER_TEXT, num_prompts - len(prompts))]):
            e, line = cuts[index]
            prompts.append({"prompt_tokens": bos + ids[e - text_tokens:e], "next_line": line})
    return prompts


# ---------------------------------------------------------------------------------------------------------------------
# Metrics.

def continuation_nll(model, params, prompts: list[list[int]], continuations: list[list[int]], *, mesh=None,
                     rules=None) -> np.ndarray:
    """Mean negative log-likelihood (nats/token) of each continuation given its prompt; exp of it is its perplexity.

    Pairs are right-padded into rows of one length and scored _ROWS_PER_CALL rows per forward of `model` (no cache).
    """
    if len(prompts) != len(continuations) or not prompts or not all(continuations):
        raise ValueError("continuation_nll needs as many prompts as continuations, and no empty continuation")
    lengths = [len(p) + len(c) for p, c in zip(prompts, continuations)]
    T = shapes.round_up(max(lengths), _LENGTH_MULTIPLE)
    rows = shapes.round_up(len(prompts), _ROWS_PER_CALL)
    tokens_RT = np.zeros((rows, T), np.int32)
    scored_RT = np.zeros((rows, T), bool)  # position t scores tokens_RT[:, t] from the logits at t - 1
    for r, (prompt, continuation) in enumerate(zip(prompts, continuations)):
        tokens_RT[r, :lengths[r]] = prompt + continuation
        scored_RT[r, len(prompt):lengths[r]] = True

    @jax.jit
    def nll_sums(params, tokens_BT, scored_BT):
        logits_BTV, _ = model.apply({"params": params}, tokens_BT)
        log_probs_BTV = jax.nn.log_softmax(logits_BTV[:, :-1].astype(jnp.float32), axis=-1)
        target_log_probs_BT = jnp.take_along_axis(log_probs_BTV, tokens_BT[:, 1:, None], axis=-1)[..., 0]
        return -jnp.sum(jnp.where(scored_BT[:, 1:], target_log_probs_BT, 0.0), axis=-1)

    with contextlib.ExitStack() as stack:
        if mesh is not None:  # sharded params: activations follow the logical rules
            stack.enter_context(jax.set_mesh(mesh))
            stack.enter_context(nn.logical_axis_rules(rules))
        sums = np.concatenate([np.asarray(nll_sums(params, tokens_RT[s:s + _ROWS_PER_CALL],
                                                   scored_RT[s:s + _ROWS_PER_CALL]))
                               for s in range(0, rows, _ROWS_PER_CALL)])
    return sums[:len(prompts)] / np.array([len(c) for c in continuations])


def distinct_n(drafts: list[list[int]], n: int) -> float | None:
    """Distinct n-grams / all n-grams over the drafts' tokens (n-grams within a draft); None if there are none."""
    ngrams = [tuple(d[i:i + n]) for d in drafts for i in range(len(d) - n + 1)]
    return len(set(ngrams)) / len(ngrams) if ngrams else None


def sentence_bleu(references: list[list[int]], hypothesis: list[int], max_n: int = 4) -> float:
    """BLEU-max_n with uniform weights and method1 smoothing, as nltk's `sentence_bleu(..., SmoothingFunction()
    .method1)`: clipped n-gram precisions, zero numerators replaced by epsilon, closest-reference brevity penalty."""
    precisions = []
    for n in range(1, max_n + 1):
        counts = collections.Counter(tuple(hypothesis[i:i + n]) for i in range(len(hypothesis) - n + 1))
        max_ref = collections.Counter()
        for ref in references:
            for gram, c in collections.Counter(tuple(ref[i:i + n]) for i in range(len(ref) - n + 1)).items():
                max_ref[gram] = max(max_ref[gram], c)
        numerator = sum(min(c, max_ref[gram]) for gram, c in counts.items())
        precisions.append((numerator, max(1, sum(counts.values()))))
    if precisions[0][0] == 0:
        return 0.0  # nltk: no unigram in common
    hyp_len = len(hypothesis)
    closest_ref = min((abs(len(r) - hyp_len), len(r)) for r in references)[1]
    brevity = 1.0 if hyp_len > closest_ref else math.exp(1 - closest_ref / hyp_len)
    return brevity * math.exp(sum(math.log((num if num else BLEU_EPSILON) / den) for num, den in precisions) / max_n)


def self_bleu(drafts: list[list[int]]) -> float | None:
    """Mean BLEU-4 of each draft against the others (higher = less diverse); None for fewer than 2 drafts."""
    drafts = [d for d in drafts if d]
    if len(drafts) < 2:
        return None
    return float(np.mean([sentence_bleu(drafts[:i] + drafts[i + 1:], d) for i, d in enumerate(drafts)]))


def matches_line(draft_text: str, next_line: str) -> bool:
    """Whether the draft's first line, stripped, is the true next line, stripped."""
    return draft_text.split("\n", 1)[0].strip() == next_line.strip()


def precision_at(matches: list[list[bool]], j: int) -> float:
    """Fraction of prompts with a match among their first j drafts (P@j)."""
    return float(np.mean([any(row[:j]) for row in matches]))


# ---------------------------------------------------------------------------------------------------------------------
# One method's row of the comparison table.

def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def draft_table(prompts: list[dict], drafts: list[list[list[int]]], texts: list[list[str]], num_drafts: int,
                nll: list[np.ndarray], grader_nll: list[np.ndarray] | None) -> dict:
    """One method's row: per-draft (by rank) and best-of-k perplexity (mean over prompts of exp(mean NLL)), P@j,
    distinct-1..3 and Self-BLEU (means over prompts). nll[p][d] is draft d of prompt p's mean NLL."""
    row = {"drafts_per_prompt": _mean(len(d) for d in drafts)}
    for name, scores in (("", nll), ("grader_", grader_nll)):
        if scores is None:
            continue
        ppl = [np.exp(s) for s in scores]
        row[f"{name}perplexity_per_draft"] = [_mean(p[j] for p in ppl if len(p) > j) for j in range(num_drafts)]
        row[f"{name}perplexity_mean"] = _mean(x for p in ppl for x in p)
        row[f"{name}perplexity_best_of_k"] = _mean(min(p) for p in ppl)
    matches = [[matches_line(t, prompt["next_line"]) for t in row_texts] for prompt, row_texts in zip(prompts, texts)]
    row.update({f"P@{j}": precision_at(matches, j) for j in range(1, num_drafts + 1)})
    row.update({f"distinct_{n}": _mean(distinct_n(d, n) for d in drafts) for n in (1, 2, 3)})
    row["self_bleu"] = _mean(self_bleu(d) for d in drafts)
    return row

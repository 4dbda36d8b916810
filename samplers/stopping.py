"""When a row stops: stop tokens and stop sequences, in the decode loop (token ids) and on the host (text).

The in-loop check ends a row as soon as its last tokens equal a stop sequence's own tokenization, which saves the
remaining steps; the host check is the one that decides, since the model may spell the same text with other tokens.
"""

import jax
import jax.numpy as jnp

# Written into the token buffer after a row is done; never a token id, so it is easy to drop.
MASKED = -1


def stop_sequence_ids(tokenizer, stop_sequences: tuple[str, ...]) -> tuple[tuple[int, ...], ...]:
    """Each stop sequence's tokenization (no special tokens), hashable for the jitted loop."""
    return tuple(tuple(tokenizer.encode(text, add_special_tokens=False).ids) for text in stop_sequences)


def is_stop(token_B: jax.Array, tokens_BN: jax.Array, step: jax.Array, stop_tokens: tuple[int, ...],
            sequence_ids: tuple[tuple[int, ...], ...]) -> jax.Array:
    """Whether each row's new token (already written at tokens_BN[:, step]) is a stop token or completes a stop
    sequence's token ids."""
    stop_B = jnp.isin(token_B, jnp.asarray(stop_tokens, jnp.int32)) if stop_tokens else jnp.zeros_like(token_B, bool)
    for ids in sequence_ids:
        length = len(ids)
        if length == 0 or length > tokens_BN.shape[1]:
            continue
        start = jnp.maximum(step + 1 - length, 0)
        window_BL = jax.lax.dynamic_slice_in_dim(tokens_BN, start, length, axis=1)
        stop_B |= (step + 1 >= length) & jnp.all(window_BL == jnp.asarray(ids, jnp.int32), axis=1)
    return stop_B


def cut_at_stop_sequence(tokenizer, tokens: list[int], text: str,
                         stop_sequences: tuple[str, ...]) -> tuple[list[int], str] | None:
    """(the shortest token prefix whose text holds the earliest stop sequence, the text before it), or None.

    Decoded text only grows with the prefix, so a binary search finds the prefix in O(log n) decodes.
    """
    found = [(text.find(stop), stop) for stop in stop_sequences if stop and stop in text]
    if not found:
        return None
    position, stop = min(found)
    end = position + len(stop)
    low, high = 1, len(tokens)  # decode(tokens[:high]) holds text[:end]; find the smallest such high
    while low < high:
        middle = (low + high) // 2
        if stop in tokenizer.decode(tokens[:middle])[:end]:
            high = middle
        else:
            low = middle + 1
    return tokens[:high], text[:position]

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


def is_stop_token(tokens_BC: jax.Array, stop_tokens: tuple[int, ...]) -> jax.Array:
    """[B, C] whether each token is a stop token."""
    if not stop_tokens:
        return jnp.zeros(tokens_BC.shape, bool)
    return jnp.isin(tokens_BC, jnp.asarray(stop_tokens, jnp.int32))


def ends_stop_sequence(tokens_BN: jax.Array, position_BC: jax.Array,
                       sequence_ids: tuple[tuple[int, ...], ...]) -> jax.Array:
    """[B, C] whether the tokens of row b ending at position_BC[b, c] (already written into tokens_BN) are a stop
    sequence's token ids; a chunk of several new tokens is checked at each of its positions."""
    N = tokens_BN.shape[1]
    stop_BC = jnp.zeros(position_BC.shape, bool)
    for ids in sequence_ids:
        length = len(ids)
        if length == 0 or length > N:
            continue
        window_BCL = position_BC[..., None] - (length - 1) + jnp.arange(length)[None, None]
        tokens_BCL = jnp.take_along_axis(tokens_BN[:, None, :], jnp.clip(window_BCL, 0, N - 1), axis=2)
        stop_BC |= (window_BCL[..., 0] >= 0) & jnp.all(tokens_BCL == jnp.asarray(ids, jnp.int32)[None, None], axis=-1)
    return stop_BC


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

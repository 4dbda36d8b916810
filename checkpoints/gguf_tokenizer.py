"""The tokenizer a GGUF file describes, rebuilt from its metadata as a `tokenizers.Tokenizer`.

A GGUF carries no tokenizer.json: llama.cpp's converter stores the vocabulary (tokenizer.ggml.tokens, in the
byte-level spelling where a space is "Ġ"), the merges, each token's type, the name of the pre-tokenizer
(tokenizer.ggml.pre, which llama.cpp maps to fixed split rules), the BOS/EOS ids and whether to add them. This
module turns those back into the Hugging Face tokenizer they came from:

  from checkpoints import gguf_tokenizer
  tokenizer = gguf_tokenizer.from_metadata(metadata, "model.gguf")   # metadata: {GGUF key: value}
  tokenizer.save("WORKDIR/tokenizer.json")

Only byte-level BPE ("gpt2") tokenizers are rebuilt; SentencePiece ("llama") and others are refused.
"""

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

from errors import InputError

TOKENIZER_MODELS = ("gpt2",)  # llama.cpp's name for byte-level BPE
# tokenizer.ggml.token_type values (llama.cpp's llama_token_type) that are added tokens, matched whole in text.
_CONTROL, _USER_DEFINED = 3, 4

_GPT2_SPLIT = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2's regex, then bytes
# Llama 3's split (its tokenizer.json regex; llama.cpp spells the same rule without the (?i:...) group).
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3_REGEX), behavior="isolated"),
                                         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
_DIGITS_THEN_GPT2 = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _GPT2_SPLIT])

# tokenizer.ggml.pre -> (pre-tokenizer, whole words found in the vocabulary skip the merges, BOS added when the
# file does not say), as llama.cpp's llama-vocab.cpp sets them for each name.
PRE_TOKENIZERS = {
    "gpt-2": (_GPT2_SPLIT, False, False),
    "smollm": (_DIGITS_THEN_GPT2, False, False),
    "starcoder": (_DIGITS_THEN_GPT2, False, False),
    "refact": (_DIGITS_THEN_GPT2, False, False),
    "llama-bpe": (_LLAMA3_SPLIT, True, True),
    "llama3": (_LLAMA3_SPLIT, True, True),
    "llama-v3": (_LLAMA3_SPLIT, True, True),
}


def _get(metadata: dict, key: str, file: str):
    if key not in metadata:
        raise InputError(f"{file} lacks the metadata key {key}, which a byte-level BPE tokenizer needs")
    return metadata[key]


def _special_token(metadata: dict, name: str, tokens: list, file: str) -> str:
    """The text of the BOS or EOS token, which the post-processor adds."""
    key = f"tokenizer.ggml.{name}_token_id"
    token_id = _get(metadata, key, file)
    if not 0 <= token_id < len(tokens):
        raise InputError(f"{file}: {key}={token_id} is outside the {len(tokens)} tokens")
    return tokens[token_id]


def from_metadata(metadata: dict, file: str) -> tokenizers.Tokenizer:
    """The Hugging Face tokenizer that the GGUF metadata of FILE (named in errors) describes."""
    model = metadata.get("tokenizer.ggml.model")
    if model not in TOKENIZER_MODELS:
        raise InputError(f"{file}: tokenizer.ggml.model={model!r} is not supported; supported: "
                         f"{', '.join(map(repr, TOKENIZER_MODELS))} (byte-level BPE)")
    pre = metadata.get("tokenizer.ggml.pre")
    if pre not in PRE_TOKENIZERS:
        raise InputError(f"{file}: tokenizer.ggml.pre={pre!r} is not supported; supported: "
                         f"{', '.join(map(repr, PRE_TOKENIZERS))}")
    pre_tokenizer, ignore_merges, add_bos = PRE_TOKENIZERS[pre]

    tokens = _get(metadata, "tokenizer.ggml.tokens", file)
    vocab = {token: token_id for token_id, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        duplicate = next(token for token_id, token in enumerate(tokens) if vocab[token] != token_id)
        raise InputError(f"{file}: tokenizer.ggml.tokens lists {duplicate!r} more than once")
    merges = []
    for index, merge in enumerate(_get(metadata, "tokenizer.ggml.merges", file)):
        pair = merge.split(" ")
        if len(pair) != 2:  # byte-level tokens spell a space as "Ġ", so a merge is two tokens and one space
            raise InputError(f"{file}: tokenizer.ggml.merges[{index}]={merge!r} is not two byte-level tokens")
        merges.append(tuple(pair))
    try:
        tokenizer = tokenizers.Tokenizer(models.BPE(vocab, merges, ignore_merges=ignore_merges))
    except Exception as error:  # the Rust side raises a bare Exception, e.g. for a merge of unknown tokens
        raise InputError(f"{file}: tokenizer.ggml.tokens and merges do not form a BPE ({error})") from None
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()

    token_types = metadata.get("tokenizer.ggml.token_type", [])
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False)
                                  for token, kind in zip(tokens, token_types) if kind == _CONTROL])
    tokenizer.add_tokens([AddedToken(token, special=False, normalized=False)
                          for token, kind in zip(tokens, token_types) if kind == _USER_DEFINED])

    bos = [_special_token(metadata, "bos", tokens, file)] if metadata.get("tokenizer.ggml.add_bos_token",
                                                                          add_bos) else []
    eos = [_special_token(metadata, "eos", tokens, file)] if metadata.get("tokenizer.ggml.add_eos_token") else []
    if bos or eos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=[*bos, "$A", *eos], pair=[*bos, "$A", *eos, *bos, "$B", *eos],
            special_tokens=[(token, vocab[token]) for token in dict.fromkeys(bos + eos)])
    return tokenizer

"""A byte-level tokenizer built in memory (no download): one token per UTF-8 byte plus three specials.

Used with the tiny random models of the tests; a real model brings its own tokenizer.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast

__all__ = ["byte_tokenizer", "BYTE_VOCAB_SIZE"]

_SPECIALS = ["<unk>", "<s>", "</s>"]
BYTE_VOCAB_SIZE = 256 + len(_SPECIALS)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A fast tokenizer mapping each byte to one id (ids 3..258); ids 0..2 are <unk>, <s>, </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(_SPECIALS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )

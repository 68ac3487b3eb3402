"""Text into token ids as eval and calibrate both need them: the checkpoint's own tokenizer, no special tokens
added, and only the prefix of a large text that the ids wanted need (into the ids the whole text would give)."""

from __future__ import annotations

from pathlib import Path

import torch

from qstream.errors import QstreamError
from qstream.io.text_sources import Text

# Tokenizing a prefix of the text: a token is the whole text's once it ends this many characters before the cut.
# Fast tokenizers split text into pre-tokens (words, digit runs, whitespace runs) by rules that look a few
# characters ahead, and BPE/Unigram work inside one pre-token, so cutting the text changes only the pre-token
# at the cut; no pre-token of real text spans 1024 characters.
PREFIX_MARGIN_CHARS = 1024
CHARS_PER_TOKEN_GUESS = 6  # first prefix length per token wanted (English: about 4.5); too short costs one more round


def load_tokenizer(tokenizer_dir: Path):
    """The checkpoint's tokenizer, or a one-line error naming the directory."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(tokenizer_dir)
    except (OSError, ValueError) as exc:
        raise QstreamError(f"{tokenizer_dir}: no usable tokenizer ({str(exc).splitlines()[0]}); "
                           "copy the base model's tokenizer files into it") from None


def settled_ids(tok, text: str, chars: int) -> list[int]:
    """The ids of text[:chars] that end PREFIX_MARGIN_CHARS or more before the cut: the whole text's first ids."""
    enc = tok(text[:chars], add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    limit = chars - PREFIX_MARGIN_CHARS
    n = next((i for i, (_, end) in enumerate(enc["offset_mapping"]) if end > limit), len(enc["input_ids"]))
    return enc["input_ids"][:n]


def tokenize(tokenizer_dir: Path, text: Text, max_tokens: int | None = None) -> tuple[torch.Tensor, bool]:
    """(ids, whole): the text's token ids as the whole text tokenized once with no special tokens gives them,
    and whether the whole text was tokenized. With max_tokens, a fast tokenizer encodes growing prefixes of the
    text until max_tokens ids are settled (see settled_ids), and returns those: a few windows of a large corpus
    cost milliseconds, not minutes and gigabytes."""
    tok = load_tokenizer(tokenizer_dir)
    if max_tokens is not None and tok.is_fast:  # slow tokenizers give no offsets: they take the whole text
        chars = max_tokens * CHARS_PER_TOKEN_GUESS + PREFIX_MARGIN_CHARS
        while chars < len(text.text):
            ids = settled_ids(tok, text.text, chars)
            if len(ids) >= max_tokens:
                return torch.tensor(ids[:max_tokens], dtype=torch.long), False
            chars *= 2
    ids = tok(text.text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long), True

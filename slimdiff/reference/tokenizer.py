"""A CLIP-style BPE tokenizer whose vocabulary and merges the project writes from the caption grammar."""

from __future__ import annotations

from transformers import CLIPTokenizer

from slimdiff.reference.data import grammar_words

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _word_merges(word: str) -> list[tuple[str, str]]:
    """Left-to-right merges that build `word</w>` from its characters (CLIP marks word ends with </w>)."""
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    merges, left = [], pieces[0]
    for right in pieces[1:]:
        merges.append((left, right))
        left = left + right
    return merges


def grammar_vocab_and_merges(words: list[str] | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary (letters, letters+</w>, every merge product, special tokens) and BPE merges.

    Every grammar word becomes a single token; other lowercase words fall back to letters.
    """
    words = sorted(set(words or grammar_words()))
    merges: list[tuple[str, str]] = []
    for word in words:
        for pair in _word_merges(word):
            if pair not in merges:
                merges.append(pair)
    tokens = list(LETTERS) + [c + "</w>" for c in LETTERS] + [a + b for a, b in merges]
    vocab: dict[str, int] = {}
    for token in tokens + [BOS, EOS]:
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def _clip_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]], model_max_length: int) -> CLIPTokenizer:
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=EOS,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        model_max_length=model_max_length,
    )


def build_tokenizer(model_max_length: int = 32) -> CLIPTokenizer:
    """A `CLIPTokenizer` over the grammar vocabulary; pads with the end-of-text token like SD 1.5.

    Merges of different words can interact (BPE applies the globally best-ranked pair first), so
    words that still split get extra merges joining their pieces until each is one token.
    """
    vocab, merges = grammar_vocab_and_merges()
    for _ in range(8):
        tokenizer = _clip_tokenizer(vocab, merges, model_max_length)
        split = [tokenizer.tokenize(w) for w in grammar_words()]
        split = [pieces for pieces in split if len(pieces) > 1]
        if not split:
            return tokenizer
        for pieces in split:
            left = pieces[0]
            for right in pieces[1:]:
                if (left, right) not in merges:
                    merges.append((left, right))
                vocab.setdefault(left + right, len(vocab))
                left = left + right
    raise RuntimeError(f"could not build single-token merges for {[''.join(p) for p in split]}")

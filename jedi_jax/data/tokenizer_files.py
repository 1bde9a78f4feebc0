"""A tiny CLIP-BPE tokenizer folder for the mini world's vocabulary.

``transformers.CLIPTokenizer.from_pretrained(folder)`` loads it offline. Every word of
``mini_world.vocabulary()`` is ONE token; anything else still tokenizes (into characters), so the
tokenizer never fails on a foreign prompt. Layout of the vocab (as in OpenAI's CLIP vocab): single
characters, the same characters with ``</w>`` (end of word), the merge results, then
``<|startoftext|>`` and ``<|endoftext|>`` (also the pad and unknown token).

Merges are found greedily: for each word, simulate BPE with the merges so far and, while the word is
not one token, append the merge of its first two tokens. An appended merge has the lowest priority,
so it never changes how an already-finished word tokenizes (some better-ranked merge always applied
at every step there); hence every word ends as one token.

    python -m jedi_jax.data.tokenizer_files [folder]   # default: jedi_jax/assets/mini_tokenizer
"""
from __future__ import annotations

import json
import os
import string
import sys
from typing import Iterable, Sequence

from jedi_jax.models.tokenizer import bpe_merge

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
EOW = "</w>"
# Characters that tokenize as themselves. Printable ASCII maps to itself under CLIP's byte-level
# unicode table, so these are valid byte-level symbols.
CHARS = string.ascii_lowercase + string.digits + ".,!?'-:;\"()&/+*#%$@_"
MODEL_MAX_LENGTH = 77
PACKAGED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets",
                            "mini_tokenizer")


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE of one lower-case word: symbols = chars, the last one with </w>, then the merge loop."""
    return bpe_merge(list(word[:-1]) + [word[-1] + EOW], ranks)


def build_vocab(words: Iterable[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab token -> id, merges in rank order) such that each word is a single token."""
    words = sorted({w.lower() for w in words})
    for w in words:
        bad = [c for c in w if c not in CHARS]
        if not w or bad:
            raise ValueError(f"word {w!r} has characters outside the tokenizer alphabet: {bad}")
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for w in words:
        while len(sym := _bpe(w, ranks)) > 1:
            pair = (sym[0], sym[1])
            ranks[pair] = len(merges)
            merges.append(pair)
    tokens = list(CHARS) + [c + EOW for c in CHARS]
    seen = set(tokens)
    for a, b in merges:
        if a + b not in seen:
            seen.add(a + b)
            tokens.append(a + b)
    tokens += [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_tokenizer_folder(folder: str, words: Sequence[str] | None = None,
                           model_max_length: int = MODEL_MAX_LENGTH) -> str:
    """Writes vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json into folder."""
    if words is None:
        from jedi_jax.data.mini_world import vocabulary
        words = vocabulary()
    vocab, merges = build_vocab(words)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f, ensure_ascii=False, indent=0)
        f.write("\n")
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        **specials,
    }
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
        json.dump(specials, f, indent=2)
        f.write("\n")
    return folder


def load_tokenizer(folder: str | None = None):
    """``transformers.CLIPTokenizer`` from ``folder`` (default: the packaged mini-world tokenizer)."""
    from transformers import CLIPTokenizer
    return CLIPTokenizer.from_pretrained(folder or PACKAGED_DIR)


def main(argv: Sequence[str] = ()) -> None:
    folder = argv[0] if argv else PACKAGED_DIR
    write_tokenizer_folder(folder)
    with open(os.path.join(folder, "vocab.json")) as f:
        n = len(json.load(f))
    print(f"wrote {folder} ({n} tokens)")


if __name__ == "__main__":
    import argparse

    _parser = argparse.ArgumentParser(prog="python -m jedi_jax.data.tokenizer_files",
                                      description="Write the mini world's CLIP-BPE tokenizer folder.")
    _parser.add_argument("folder", nargs="?", default=None,
                         help=f"output folder (default: the packaged one, {PACKAGED_DIR})")
    _args = _parser.parse_args(sys.argv[1:])
    main([_args.folder] if _args.folder else [])

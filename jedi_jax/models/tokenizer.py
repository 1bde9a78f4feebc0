"""CLIP tokenizer: a thin wrapper over `transformers.CLIPTokenizer` loaded from a local folder.

    tok = load_tokenizer("ckpt/tokenizer")                 # vocab.json + merges.txt (+ configs)
    ids = tokenize(tok, ["a photo of a cat"], 77)          # np.int32 (B, 77): bos ... eos pad...

`write_test_tokenizer(dir, words)` writes a tiny but valid CLIP BPE vocabulary so tests stay
hermetic: the 256 byte-level symbols, the same with the end-of-word suffix "</w>", the merges
that build each given word into ONE token, then <|startoftext|> and <|endoftext|> as the two
highest ids (as in the real CLIP vocab, so eos is the argmax of a sequence).
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

START, END, EOW = "<|startoftext|>", "<|endoftext|>", "</w>"


def load_tokenizer(path: str | os.PathLike):
    """`transformers.CLIPTokenizer` from a local folder (never downloads)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(os.fspath(path), local_files_only=True)


def tokenize(tokenizer, prompts: str | Sequence[str], max_length: int = 77) -> np.ndarray:
    """prompts -> np.int32 (B, max_length): bos, tokens, eos, then pad; truncated to max_length
    (eos kept), as diffusers' pipelines call the tokenizer (padding="max_length", truncation=True)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    enc = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True, return_tensors="np")
    return np.asarray(enc["input_ids"], dtype=np.int32)


class CachedTokenize:
    """`tokenize` with a per-prompt memo: prompts -> np.int32 (B, max_length), rows identical to
    `tokenize(tokenizer, prompts, max_length)`.

    A training loader tokenizes N captions of every set; the mini world's captions come from a few
    thousand template fills, so after warm-up a batch is dictionary look-ups (the tokenizer call was
    half of the loader's time at 128 sets per batch). The memo is bounded: past `max_entries`
    distinct prompts it stops growing and later new prompts are tokenized each time.
    """

    def __init__(self, tokenizer, max_length: int = 77, max_entries: int = 1 << 18):
        self.tokenizer, self.max_length, self.max_entries = tokenizer, int(max_length), int(max_entries)
        self._rows: dict[str, np.ndarray] = {}  # dict get/set are atomic: safe for loader threads

    def __call__(self, prompts: str | Sequence[str]) -> np.ndarray:
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        missing = list(dict.fromkeys(p for p in prompts if p not in self._rows))
        fresh = dict(zip(missing, tokenize(self.tokenizer, missing, self.max_length))) if missing else {}
        for p, row in fresh.items():
            if len(self._rows) >= self.max_entries:
                break
            self._rows[p] = row
        rows = [fresh[p] if p in fresh else self._rows[p] for p in prompts]
        return np.stack(rows) if rows else np.zeros((0, self.max_length), np.int32)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode symbol table (the byte-level alphabet, 256 symbols)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def bpe_merge(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """The BPE merge loop (lowest rank first, all occurrences), as CLIP's tokenizer runs it."""
    while len(symbols) > 1:
        pairs = {(a, b) for a, b in zip(symbols, symbols[1:])}
        best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        out, i = [], 0
        while i < len(symbols):
            if i < len(symbols) - 1 and (symbols[i], symbols[i + 1]) == best:
                out.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                out.append(symbols[i])
                i += 1
        symbols = out
    return symbols


def write_test_tokenizer(directory: str | os.PathLike, words: Sequence[str]) -> dict[str, int]:
    """Writes vocab.json and merges.txt to `directory`; returns the vocab (token -> id).

    Each word (letters only; lowercased like CLIP's normalizer) tokenizes to the single token
    `word</w>`. Any other text still tokenizes (down to byte symbols), as with the real vocab.
    """
    byte_symbols = list(bytes_to_unicode().values())
    vocab_list = byte_symbols + [s + EOW for s in byte_symbols]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    byte_map = bytes_to_unicode()
    words = list(dict.fromkeys(w.lower() for w in words))  # unique, in order
    for w in words:
        if not w or not w.isalpha():
            raise ValueError(f"test tokenizer words must be non-empty and letters only, got {w!r}")
    encoded = {w: [byte_map[b] for b in w.encode("utf-8")] for w in words}

    def add(a: str, b: str):
        if (a, b) not in ranks:
            ranks[(a, b)] = len(merges)
            merges.append((a, b))
            if a + b not in vocab_list:
                vocab_list.append(a + b)

    # Merges appended after the existing ones have the lowest priority, so they only fire where no
    # earlier merge applies: fixing one word never breaks another. Loop until every word is one token.
    for _ in range(100):
        done = True
        for w, syms in encoded.items():
            pieces = bpe_merge(syms[:-1] + [syms[-1] + EOW], ranks)
            if len(pieces) > 1:
                done = False
                acc = pieces[0]
                for p in pieces[1:]:
                    add(acc, p)
                    acc += p
        if done:
            break
    else:  # pragma: no cover
        raise RuntimeError("could not build merges for the test tokenizer")

    vocab_list += [START, END]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.writelines(f"{a} {b}\n" for a, b in merges)
    return vocab

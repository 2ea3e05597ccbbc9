"""Captions and the tokenizer of the text-conditioned digits world.

Every digit scan gets a caption from a template ("a handwritten seven", "the digit 7", ...). The
training templates and the *held-out* templates (never shown in training) are built from the same
words, so a held-out caption is a new combination of known words: the generalisation check of the
text teacher's prompt fidelity.

The tokenizer is a stock ``transformers.CLIPTokenizer`` (Radford et al. 2021) whose ``vocab.json`` /
``merges.txt`` are generated here: CLIP's byte-level alphabet (every single character, with and without
the end-of-word mark), one token per caption word, and the BPE merges that build each word from its
characters, so every caption word is exactly one token.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from .digits import NUM_CLASSES

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

#: Templates the text teacher trains on; ``{word}`` is the number word, ``{digit}`` the numeral.
TRAIN_TEMPLATES = (
    "a handwritten {word}",
    "the digit {digit}",
    "{word}, written thin",
    "a {digit}",
    "the number {word}",
    "a scan of the digit {digit}",
    "{word}",
)

#: Templates never shown in training: new combinations of the training words.
HELDOUT_TEMPLATES = (
    "the handwritten digit {word}",
    "a scan of a {word}",
    "number {digit}, written thin",
    "the {digit}",
)

#: Tokens per caption, start and end marks included (the longest caption takes 7).
TOKENIZER_MAX_LENGTH = 16

_WORD = re.compile(r"[a-z]+|[0-9]|[^\sa-z0-9]")
_END = "</w>"


def caption_words(text: str) -> list[str]:
    """The words of ``text`` as CLIP's tokenizer splits them: lower-case letters runs, single numerals, marks."""
    return _WORD.findall(text.lower())


def check_templates(templates: Sequence[str]) -> tuple[str, ...]:
    """Return ``templates`` as a tuple if each names the digit once (``{word}`` or ``{digit}``), else raise."""
    if not templates:
        raise ValueError("caption templates are empty; pass at least one, e.g. 'a handwritten {word}'.")
    for t in templates:
        n = t.count("{word}") + t.count("{digit}")
        if n != 1 or re.search(r"\{(?!word\}|digit\})", t):
            raise ValueError(
                f"caption template {t!r} must name the digit exactly once, as {{word}} or {{digit}}, and hold no "
                "other braces."
            )
    return tuple(templates)


def make_caption(label: int, template: str) -> str:
    """The caption of digit ``label`` under ``template``."""
    return template.format(word=NUMBER_WORDS[int(label)], digit=str(int(label)))


def random_captions(labels: torch.Tensor, templates: Sequence[str], drop_prob: float,
                    generator: torch.Generator) -> list[str]:
    """One caption per label from a random template; the empty caption with probability ``drop_prob`` (CFG)."""
    pick = torch.randint(0, len(templates), (len(labels),), generator=generator)
    drop = torch.rand(len(labels), generator=generator) < drop_prob
    return ["" if d else make_caption(int(y), templates[int(k)]) for y, k, d in zip(labels, pick, drop)]


def captions_like_reference(n: int, templates: Sequence[str], split: str = "heldout") -> tuple[list[str], torch.Tensor]:
    """``n`` captions whose digits follow ``split``'s class mix (templates cycling with the index), and the digits.

    Caption ``k`` uses ``templates[k % len(templates)]``, so every template meets every digit when ``n`` is large.
    """
    from .digits import class_labels_like_reference

    labels = class_labels_like_reference(n, split)
    templates = check_templates(tuple(templates))
    return [make_caption(int(y), templates[k % len(templates)]) for k, y in enumerate(labels)], labels


def vocabulary(templates: Iterable[str]) -> list[str]:
    """The sorted caption words of ``templates`` with every number word and numeral filled in."""
    words = set()
    for t in templates:
        for label in range(NUM_CLASSES):
            words.update(caption_words(make_caption(label, t)))
    return sorted(words)


def digit_of_caption(caption: str, words: Iterable[str]) -> int:
    """The digit a caption asks for; a word outside ``words`` or a caption naming no / two digits raises.

    Example:
        >>> digit_of_caption("a handwritten seven", vocabulary(TRAIN_TEMPLATES))
        7
    """
    known = set(words)
    found = []
    for w in caption_words(caption):
        if w not in known:
            raise ValueError(
                f"caption {caption!r} uses the word {w!r}, which is not in the digits-world vocabulary; use only "
                f"these words: {' '.join(sorted(known))}."
            )
        if w in NUMBER_WORDS:
            found.append(NUMBER_WORDS.index(w))
        elif w.isdigit():
            found.append(int(w))
    if len(set(found)) != 1:
        raise ValueError(f"caption {caption!r} must name exactly one digit (a number word or a numeral).")
    return found[0]


def clip_byte_alphabet() -> list[str]:
    """CLIP's byte-to-unicode alphabet (256 printable characters standing for the 256 bytes)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = keep[:], 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Greedy BPE of one word (lowest-ranked pair first), as CLIP's tokenizer applies its merges."""
    parts = list(word[:-1]) + [word[-1] + _END]
    while len(parts) > 1:
        pairs = [(ranks.get((a, b)), i) for i, (a, b) in enumerate(zip(parts, parts[1:])) if (a, b) in ranks]
        if not pairs:
            break
        _, i = min(pairs)
        a, b = parts[i], parts[i + 1]
        merged, j = [], 0
        while j < len(parts):  # merge every occurrence of the pair, left to right
            if j < len(parts) - 1 and parts[j] == a and parts[j + 1] == b:
                merged.append(a + b)
                j += 2
            else:
                merged.append(parts[j])
                j += 1
        parts = merged
    return parts


def bpe_merges(words: Sequence[str]) -> list[tuple[str, str]]:
    """Merges that make each of ``words`` one token: a new lowest-priority merge whenever a word is still split.

    A merge appended last never fires while a higher-priority pair is present, so words already whole stay whole.
    """
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        while len(parts := _bpe(word, ranks)) > 1:
            pair = (parts[0], parts[1])
            ranks[pair] = len(merges)
            merges.append(pair)
    return merges


def write_digits_tokenizer(folder: str | Path, templates: Iterable[str] = TRAIN_TEMPLATES + HELDOUT_TEMPLATES,
                           max_length: int = TOKENIZER_MAX_LENGTH):
    """Write and return a stock ``CLIPTokenizer`` whose vocabulary holds every word of ``templates``.

    Args:
        folder: Where ``vocab.json``, ``merges.txt`` and the tokenizer config go.
        templates: Caption templates (see :data:`TRAIN_TEMPLATES`); their words become single tokens.
        max_length: ``model_max_length`` (captions are padded to it, as Stable Diffusion pipelines do).

    Example:
        >>> tok = write_digits_tokenizer("tok")
        >>> tok("a handwritten seven").input_ids  # [<start>, a, handwritten, seven, <end>]
    """
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = clip_byte_alphabet()
    tokens = chars + [c + _END for c in chars]
    words = [w for w in vocabulary(check_templates(tuple(templates))) if len(w) > 1]
    merges = bpe_merges(words)
    tokens += [w + _END for w in words]
    merged = {a + b for a, b in merges} - set(tokens)  # intermediate pieces: in the vocabulary, as BPE expects
    tokens += sorted(merged)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)
    tok.save_pretrained(folder)
    return tok


def write_bpe_files(tokenizer, folder: str | Path) -> None:
    """Write ``vocab.json`` and ``merges.txt`` of a (tokenizers-backed) CLIP tokenizer into ``folder``.

    ``save_pretrained`` of recent transformers writes only ``tokenizer.json``; the two classic files let
    transformers versions that read them (the slow ``CLIPTokenizer``) load the same tokenizer.
    """
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    folder = Path(folder)
    (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges), encoding="utf-8")


__all__ = [
    "HELDOUT_TEMPLATES",
    "NUMBER_WORDS",
    "TOKENIZER_MAX_LENGTH",
    "TRAIN_TEMPLATES",
    "bpe_merges",
    "caption_words",
    "captions_like_reference",
    "check_templates",
    "clip_byte_alphabet",
    "digit_of_caption",
    "make_caption",
    "random_captions",
    "vocabulary",
    "write_bpe_files",
    "write_digits_tokenizer",
]

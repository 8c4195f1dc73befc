"""Tokenisation (HF ``tokenizers``), prompt prefixes, pooling and normalisation."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
from tokenizers import Tokenizer

from .config import ModelConfig
from .errors import EngineError, ErrorCode, tokenise_timeout
from .types import InputType

SLICE_CHARS = 64 * 1024   # tokenised between deadline checks (~30-60 ms here)
# A text over twice this many characters per model token is tokenised from its head first
# (TextEncoder._encode): no real text has that many characters per token, so the head is what
# the model reads, and the rest (up to 32 k characters an input) is never tokenised.
HEAD_CHARS_PER_TOKEN = 8
# A head is taken when it runs this many tokens past what the model reads: its last tokens,
# at the cut, are then far from the ones kept (a normaliser that strips a text's end)
HEAD_SPARE_TOKENS = 16
# A head with no space to cut at (CJK, Thai, runs of punctuation) is cut at the start of a
# word the tokeniser itself sees in the head's last CUT_WINDOW_CHARS characters, at least
# CUT_EDGE_CHARS from the window's end (a word cut by the window's end may end elsewhere).
CUT_WINDOW_CHARS = 64
CUT_EDGE_CHARS = 8


@dataclass
class Encoded:
    """One tokenised input: ids ready to pad into a batch."""

    ids: List[int]
    type_ids: List[int]
    truncated: bool

    @property
    def length(self) -> int:
        return len(self.ids)


class TextEncoder:
    """Applies the model's prefixes, then tokenises with truncation to ``max_tokens``."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self._tok = Tokenizer.from_file(str(cfg.tokenizer))
        self._tok.no_padding()   # the batcher pads, after sorting by length
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        # What the tokeniser makes of a text that gives it nothing (its special tokens, e.g.
        # [CLS] [SEP] or <s> </s>, after the prompt prefix if any), per input type: a text
        # encoded to exactly this was reduced to nothing (combining marks, a variation
        # selector, private-use characters, U+FFFD ... that the normaliser drops) and would be
        # embedded as the empty string. Not "any special id": [UNK] (an emoji, a 200-letter
        # word) or a literal "[SEP]" in the text are the text's own tokens.
        self._nothing = {t: self._tok.encode(self.prefix(t)).ids for t in InputType}
        # Those are the tokens the tokeniser adds to any text: a max_tokens not above them
        # leaves no room for the text. The tokeniser never cuts into them, so with max_tokens 1
        # it did not truncate at all (an over-long input failed INTERNAL), and with 2 every
        # text became [CLS] [SEP] (refused as empty).
        own = max(map(len, self._nothing.values()))
        if cfg.max_tokens <= own:
            raise EngineError(
                ErrorCode.MODEL_LOAD_FAILED,
                f'model {cfg.id}: max_tokens {cfg.max_tokens} leaves no room for text: its '
                f'tokenizer adds {own} tokens of its own (special tokens and prompt prefix): '
                f'set max_tokens above {own}')
        self._tok.enable_truncation(max_length=cfg.max_tokens)
        self.pad_id = self._tok.padding['pad_id'] if self._tok.padding else (
            self._tok.token_to_id('<pad>') or self._tok.token_to_id('[PAD]') or 0)
        # Head-first tokenising (see _encode) relies on a cut at a space splitting the tokens
        # there; an added token with a space inside could straddle the cut: not for those.
        spaced = any(any(c.isspace() for c in tok.content)
                     for tok in self._tok.get_added_tokens_decoder().values())
        self._head_chars = 0 if spaced else cfg.max_tokens * HEAD_CHARS_PER_TOKEN

    def prefix(self, input_type: InputType) -> str:
        if input_type is InputType.QUERY:
            return self.cfg.query_prefix
        if input_type is InputType.PASSAGE:
            return self.cfg.passage_prefix
        return ''

    def encode(self, texts: Sequence[str], input_type: InputType = InputType.NONE,
               deadline: Optional[float] = None) -> List[Encoded]:
        """Tokenise ``texts``; past ``deadline`` (monotonic) raise TIMEOUT.

        The tokeniser reads a whole text before it truncates (a long one: its head, see
        ``_encode``), so a request near the byte limit takes seconds to tokenise; it goes in
        slices of ~``SLICE_CHARS`` characters read with the deadline checked between them, so
        such a request times out within its budget instead of holding a thread (and a graceful
        stop) for as long as it takes.
        """
        prefix = self.prefix(input_type)
        if prefix:
            texts = [prefix + t for t in texts]
        texts = list(texts)
        if deadline is None or sum(map(len, texts)) <= SLICE_CHARS:
            return self._refuse_nothing(self._encode(texts), input_type)
        out: List[Encoded] = []
        cuts: Dict[int, int] = {}
        start = size = 0
        for i, t in enumerate(texts):
            cut = self._cut(t)
            if cut:
                cuts[i - start] = cut
            size += cut or len(t)       # what the tokeniser reads of it
            if size >= SLICE_CHARS or i == len(texts) - 1:
                if time.monotonic() >= deadline:
                    raise tokenise_timeout(f'{len(out)} of {len(texts)} inputs done')
                out += self._encode(texts[start:i + 1], cuts)
                start, size, cuts = i + 1, 0, {}
        return self._refuse_nothing(out, input_type)

    def _refuse_nothing(self, out: List[Encoded], input_type: InputType) -> List[Encoded]:
        """INVALID_INPUT, like a blank text, for an input the tokeniser reduced to nothing."""
        nothing = self._nothing[input_type]
        n = len(nothing)
        for i, e in enumerate(out):
            # a length compare per input (~40 ns); the ids only when the length matches
            if len(e.ids) == n and e.ids == nothing:
                raise EngineError(ErrorCode.INVALID_INPUT,
                                  f'inputs[{i}] is empty once tokenised: the tokenizer drops '
                                  'every character of it (only combining marks, variation '
                                  'selectors, private-use or replacement characters ...)')
        return out

    def _encode(self, texts: List[str],
                cuts: Optional[Dict[int, int]] = None) -> List[Encoded]:
        """``cuts``: ``{index: _cut(text)}`` of the texts with a head (computed when None)."""
        # encode_batch_fast, even for one text: unlike encode() it releases the GIL while it
        # tokenises (callers' threads tokenise in parallel with the doors' Python), and it skips
        # the character offsets nothing here reads (~15 % less CPU).
        if cuts is None:
            cuts = {i: c for i, c in enumerate(map(self._cut, texts)) if c}
        if not cuts:
            encs = self._tok.encode_batch_fast(texts)
        else:
            # The tokeniser reads a whole text before it truncates (256 inputs of 32 k
            # characters: 2.1 s here, where their heads take 0.16 s). Cut at a word's start, a
            # text's tokens are its head's, then the rest's; a head with more tokens than the
            # model reads (overflowing, with some to spare) truncates to what the whole text
            # does, and the others are tokenised whole.
            encs = [None] * len(texts)
            heads = [texts[i][:cut] for i, cut in cuts.items()]
            for i, e in zip(cuts, self._tok.encode_batch_fast(heads)):
                if sum(len(o.ids) for o in e.overflowing) > HEAD_SPARE_TOKENS:
                    encs[i] = e
            whole = [i for i, e in enumerate(encs) if e is None]
            for i, e in zip(whole, self._tok.encode_batch_fast([texts[i] for i in whole])):
                encs[i] = e
        return [Encoded(e.ids, e.type_ids, bool(e.overflowing)) for e in encs]

    def _cut(self, text: str) -> int:
        """Where to cut ``text``, long enough to tokenise from its head first (0: whole): at
        the last space or newline in the head's second half, else at the start of a word the
        tokeniser sees near the head's end (for BERT's normaliser each CJK character is a word;
        a text with neither, one long word, is tokenised whole)."""
        limit = self._head_chars
        if not limit or len(text) <= 2 * limit:
            return 0
        cut = max(text.rfind(' ', limit // 2, limit), text.rfind('\n', limit // 2, limit))
        if cut > 0:
            return cut
        base = limit - CUT_WINDOW_CHARS
        enc = self._tok.encode(text[base:limit], add_special_tokens=False)
        words, offsets = enc.word_ids, enc.offsets
        for k in range(len(words) - 1, 0, -1):
            begins = offsets[k][0]
            if words[k] is not None and words[k] != words[k - 1] and \
                    0 < begins <= CUT_WINDOW_CHARS - CUT_EDGE_CHARS:
                return base + begins
        return 0


def pad_batch(items: Sequence[Encoded], pad_id: int, with_type_ids: bool):
    """Right-pad a (length-sorted) batch into int64 arrays."""
    width = max(e.length for e in items)
    n = len(items)
    ids = np.full((n, width), pad_id, dtype=np.int64)
    mask = np.zeros((n, width), dtype=np.int64)
    types = np.zeros((n, width), dtype=np.int64) if with_type_ids else None
    for row, e in enumerate(items):
        ids[row, :e.length] = e.ids
        mask[row, :e.length] = 1
        if types is not None:
            types[row, :e.length] = e.type_ids
    return ids, mask, types


def pool(hidden: np.ndarray, mask: np.ndarray, mode: str) -> np.ndarray:
    """Pool token embeddings [B, L, H] to sentence embeddings [B, H] (float32)."""
    if mode == 'cls':
        return hidden[:, 0, :].astype(np.float32, copy=True)
    if mode == 'last_token':
        # Right padding: the last real token sits at length - 1.
        last = mask.sum(axis=1) - 1
        return hidden[np.arange(hidden.shape[0]), last, :].astype(np.float32, copy=True)
    m = mask[:, :, None].astype(hidden.dtype)
    summed = (hidden * m).sum(axis=1)
    counts = np.clip(m.sum(axis=1), 1e-9, None)
    return (summed / counts).astype(np.float32, copy=False)


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.clip(norms, 1e-12, None)

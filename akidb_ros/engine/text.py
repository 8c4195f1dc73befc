"""Tokenisation (HF ``tokenizers``), prompt prefixes, pooling and normalisation."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
from tokenizers import Tokenizer

from .config import ModelConfig
from .errors import EngineError, ErrorCode
from .types import InputType

SLICE_CHARS = 64 * 1024   # tokenised between deadline checks (~30-60 ms here)


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
        self._tok.enable_truncation(max_length=cfg.max_tokens)
        self.pad_id = self._tok.padding['pad_id'] if self._tok.padding else (
            self._tok.token_to_id('<pad>') or self._tok.token_to_id('[PAD]') or 0)
        # What the tokeniser makes of a text that gives it nothing (its special tokens, e.g.
        # [CLS] [SEP] or <s> </s>, after the prompt prefix if any), per input type: a text
        # encoded to exactly this was reduced to nothing (combining marks, a variation
        # selector, private-use characters, U+FFFD ... that the normaliser drops) and would be
        # embedded as the empty string. Not "any special id": [UNK] (an emoji, a 200-letter
        # word) or a literal "[SEP]" in the text are the text's own tokens.
        self._nothing = {t: self._tok.encode(self.prefix(t)).ids for t in InputType}

    def prefix(self, input_type: InputType) -> str:
        if input_type is InputType.QUERY:
            return self.cfg.query_prefix
        if input_type is InputType.PASSAGE:
            return self.cfg.passage_prefix
        return ''

    def encode(self, texts: Sequence[str], input_type: InputType = InputType.NONE,
               deadline: Optional[float] = None) -> List[Encoded]:
        """Tokenise ``texts``; past ``deadline`` (monotonic) raise TIMEOUT.

        The tokeniser reads a whole text before it truncates, so a request near the byte limit
        takes seconds to tokenise; it goes in slices of ~``SLICE_CHARS`` characters with the
        deadline checked between them, so such a request times out within its budget instead
        of holding a thread (and a graceful stop) for as long as it takes.
        """
        prefix = self.prefix(input_type)
        if prefix:
            texts = [prefix + t for t in texts]
        texts = list(texts)
        if deadline is None or sum(map(len, texts)) <= SLICE_CHARS:
            return self._refuse_nothing(self._encode(texts), input_type)
        out: List[Encoded] = []
        start = size = 0
        for i, t in enumerate(texts):
            size += len(t)
            if size >= SLICE_CHARS or i == len(texts) - 1:
                if time.monotonic() >= deadline:
                    raise EngineError(ErrorCode.TIMEOUT,
                                      f'request not tokenised within its deadline '
                                      f'({len(out)} of {len(texts)} inputs done)',
                                      retry_after_s=1.0)
                out += self._encode(texts[start:i + 1])
                start, size = i + 1, 0
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

    def _encode(self, texts: List[str]) -> List[Encoded]:
        # encode_batch_fast, even for one text: unlike encode() it releases the GIL while it
        # tokenises (callers' threads tokenise in parallel with the doors' Python), and it skips
        # the character offsets nothing here reads (~15 % less CPU).
        encs = self._tok.encode_batch_fast(texts)
        return [Encoded(e.ids, e.type_ids, bool(e.overflowing)) for e in encs]


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

"""Incremental detokenization with stop-string handling.

:class:`StreamDecoder` turns a stream of token ids into text deltas that are
safe to show immediately:

* Text is obtained by decoding a short window of ids with some earlier context
  and subtracting the decode of the same window without the newest ids (the
  "prefix offset / read offset" technique).  This keeps the leading space that
  SentencePiece-style decoders drop when a piece is decoded on its own, and it
  bounds the per-token cost by the window length instead of the history length.
* A decode ending in U+FFFD means an incomplete UTF-8 sequence: the ids are held
  until the character completes, or emitted anyway once more than
  ``max_held_tokens`` ids keep ending in U+FFFD (genuinely invalid bytes must not
  stall the stream).
* Text that could be the beginning of a stop string is held back; when a stop
  string appears, only the text before it is emitted and the decoder stops.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

__all__ = ["REPLACEMENT_CHAR", "StreamDecoder"]

REPLACEMENT_CHAR = "\ufffd"


class StreamDecoder:
    """Streams text for one generated sequence.

    Args:
        decode: turns a list of token ids into text (U+FFFD for incomplete UTF-8).
        stop: stop strings; generation text is cut right before the first one
            that appears.
        max_held_tokens: how many ids may be held while the decode keeps ending
            in U+FFFD before the text is emitted as is.
        max_context_tokens: upper bound on the ids kept as decoding context in
            front of the unread ids (only reached with long runs of ids that
            decode to nothing, e.g. ignored special tokens).
    """

    def __init__(
        self,
        decode: Callable[[list[int]], str],
        stop: Sequence[str] = (),
        *,
        max_held_tokens: int = 4,
        max_context_tokens: int = 16,
    ) -> None:
        if isinstance(stop, str):
            stop = (stop,)
        for s in stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings (got {s!r})")
        if max_held_tokens < 0:
            raise ValueError(f"max_held_tokens must be >= 0 (got {max_held_tokens})")
        if max_context_tokens < 1:
            raise ValueError(f"max_context_tokens must be >= 1 (got {max_context_tokens})")
        self._decode = decode
        self._stop: tuple[str, ...] = tuple(dict.fromkeys(stop))
        self._max_stop_len = max((len(s) for s in self._stop), default=0)
        self._max_held = max_held_tokens
        self._max_context = max_context_tokens

        self._ids: list[int] = []
        # ids[prefix_offset:read_offset] is context already turned into text;
        # ids[read_offset:] have not produced text yet.
        self._prefix_offset = 0
        self._read_offset = 0
        self._prefix_text = ""  # decode(ids[prefix_offset:read_offset]), cached

        self._pending = ""  # text decoded but held back (possible stop-string start)
        self._text = ""  # everything emitted so far
        self._stopped = False

    # -- public API ---------------------------------------------------------

    @property
    def stopped(self) -> bool:
        """True once a stop string has appeared."""
        return self._stopped

    @property
    def text(self) -> str:
        """All text emitted so far (never includes a matched stop string)."""
        return self._text

    @property
    def token_ids(self) -> tuple[int, ...]:
        """Every id pushed so far."""
        return tuple(self._ids)

    def push(self, token_id: int) -> str:
        """Add one token id and return the text that is safe to emit now."""
        if self._stopped:
            return ""
        self._ids.append(int(token_id))
        delta = self._read_new_text(final=False)
        return self._emit(delta, final=False)

    def flush(self) -> str:
        """Return whatever is still held back at the end of generation."""
        if self._stopped:
            return ""
        delta = self._read_new_text(final=True)
        return self._emit(delta, final=True)

    # -- token ids -> text ----------------------------------------------------

    def _read_new_text(self, *, final: bool) -> str:
        if self._read_offset >= len(self._ids):
            return ""
        window = self._ids[self._prefix_offset :]
        new_text = self._decode(window)
        held = len(self._ids) - self._read_offset
        incomplete = new_text.endswith(REPLACEMENT_CHAR)
        if incomplete and held <= self._max_held and not final:
            # Probably a UTF-8 sequence split across ids: wait for more.
            return ""
        if len(new_text) <= len(self._prefix_text) and not incomplete:
            # The new ids decode to nothing on their own (e.g. a lone SentencePiece
            # "▁" at the start, or an ignored special token).  Keep them as context
            # so they still influence later decodes, but stop counting them as held.
            self._read_offset = len(self._ids)
            self._set_context(new_text)
            return ""
        delta = new_text[len(self._prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._set_context(None)
        return delta

    def _set_context(self, context_text: str | None) -> None:
        """Bound the context window and refresh the cached decode of it.

        ``context_text`` is ``decode(ids[prefix_offset:read_offset])`` when the
        caller already knows it.
        """
        if self._read_offset - self._prefix_offset > self._max_context:
            self._prefix_offset = self._read_offset - self._max_context
            context_text = None
        if context_text is None:
            if self._prefix_offset == self._read_offset:
                context_text = ""
            else:
                context_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        self._prefix_text = context_text

    # -- text -> emitted text (stop strings) ----------------------------------

    def _emit(self, delta: str, *, final: bool) -> str:
        if not delta and not (final and self._pending):
            return ""
        pending = self._pending + delta
        if self._stop:
            cut = self._find_stop(pending)
            if cut is not None:
                out = pending[:cut]
                self._pending = ""
                self._stopped = True
                self._text += out
                return out
        hold = 0 if final else self._held_back_length(pending)
        out = pending[: len(pending) - hold]
        self._pending = pending[len(pending) - hold :]
        self._text += out
        return out

    def _find_stop(self, text: str) -> int | None:
        best: int | None = None
        for s in self._stop:
            i = text.find(s)
            if i != -1 and (best is None or i < best):
                best = i
        return best

    def _held_back_length(self, text: str) -> int:
        """Length of the longest tail of ``text`` that starts some stop string."""
        longest = min(len(text), self._max_stop_len - 1)
        for n in range(longest, 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self._stop):
                return n
        return 0

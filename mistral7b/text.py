"""How text that is not valid Unicode is treated, decided once for every entry point.

Text reaches us as bytes (stdin, files, an HTTP body) or as Python strings that may hold lone
surrogates (command-line arguments that were not UTF-8 arrive as U+DC80..U+DCFF through
Python's surrogateescape; JSON allows "\\udc80" escapes; Python callers can pass anything).
Tokenizers need valid Unicode, so every undecodable byte and every lone surrogate becomes
U+FFFD, the replacement character, as `bytes.decode(errors="replace")` does. Nothing is
dropped silently: the model sees a replacement character where the bad input was.

    >>> clean_text("Hello \\udcff\\udcfe")        # b"Hello \\xff\\xfe" from argv
    'Hello \\ufffd\\ufffd'
    >>> clean_bytes(b"caf\\xc3\\xa9 \\xff")
    'café \\ufffd'
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


def clean_bytes(data: bytes) -> str:
    """UTF-8 bytes to text, each undecodable byte sequence replaced by U+FFFD."""
    return data.decode("utf-8", errors="replace")


def clean_text(text: str) -> str:
    """`text` with every lone surrogate replaced: surrogate-escaped bytes (U+DC80..U+DCFF, how
    Python carries undecodable argv and stdin bytes) are decoded as the bytes they stand for,
    with U+FFFD where they are not UTF-8; any other lone surrogate becomes U+FFFD."""
    try:
        text.encode("utf-8")
        return text                      # the common case: already valid, no copy
    except UnicodeEncodeError:
        pass
    out = bytearray()
    for ch in text:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:     # surrogateescape: the original byte
            out.append(code - 0xDC00)
        elif 0xD800 <= code <= 0xDFFF:   # any other lone surrogate
            out += REPLACEMENT.encode("utf-8")
        else:
            out += ch.encode("utf-8")
    return clean_bytes(bytes(out))

"""XML character data escaping shared by the encoder and the decoder (XML 1.0 §2.2, §2.4)."""

from __future__ import annotations

import re

# Characters a document may not contain at all, even as references.
INVALID_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
_NEEDS_ESCAPE = re.compile("[&<>\r]")
_ESCAPES = {"&": "&amp;", "<": "&lt;", ">": "&gt;", "\r": "&#13;"}


def escape(text: str) -> str:
    """Character data for element content. CR is written as a reference because XML parsers
    normalise a literal CR to LF (XML 1.0 §2.11); characters XML cannot carry become U+FFFD."""
    if text.isprintable() and "&" not in text and "<" not in text and ">" not in text:
        return text  # the common case, checked in C (isprintable excludes every control)
    if INVALID_XML.search(text):
        text = INVALID_XML.sub("\ufffd", text)
    if _NEEDS_ESCAPE.search(text):
        return _NEEDS_ESCAPE.sub(lambda m: _ESCAPES[m.group()], text)
    return text

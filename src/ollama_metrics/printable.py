"""printable(): text a client controls, made safe for one log line.

A request path, a model name, a store's or Ollama's error text can hold control characters: a
newline forges a second log line, an ANSI escape recolours or rewrites the terminal that shows
the log. Every log call that includes such text passes it through printable(), which writes each
character Python does not print (C0 and C1 controls, DEL, format and separator characters) as
repr() would (`\\x1b`, `\\n`, `\\u202e`) and leaves the rest, non-ASCII letters included, as is.
"""

from __future__ import annotations


def printable(value: object) -> str:
    text = str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)

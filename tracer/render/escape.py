"""strace's escaping of what a tracee controls (file names, symbol names, comm, buffers),
so that none of its bytes can act on the terminal (ESC, BEL, CSI, a newline forging a
line): printable text as is, the rest as C escapes (`\\33`, `\\n`, `\\377`).

Strings from the kernel and from ELF files are bytes; the tracer keeps them as `str`
decoded with `surrogateescape` (os.fsdecode), so an invalid byte 0xff is U+DCFF here and
comes out as `\\377`, the byte it was.
"""
from __future__ import annotations

__all__ = ["quote_bytes", "escape_text", "DEFAULT_STRING_SIZE"]

DEFAULT_STRING_SIZE = 32     # strace's default -s

# strace (src/util.c: string_quote): these as their C escapes, other controls in octal.
_NAMED = {0x09: "\\t", 0x0A: "\\n", 0x0B: "\\v", 0x0C: "\\f", 0x0D: "\\r",
          0x22: '\\"', 0x5C: "\\\\"}
_DIGITS = frozenset(b"01234567")


def _octal(b: int, next_byte: int | None) -> str:
    # three digits when an octal digit follows: "\0" then "1" would read back as "\01"
    return f"\\{b:03o}" if next_byte is not None and next_byte in _DIGITS else f"\\{b:o}"


def quote_bytes(data: bytes, limit: int = DEFAULT_STRING_SIZE) -> str:
    """strace's string form: `"..."` with C escapes, printable ASCII as is, and `...` after
    the closing quote when data is longer than limit bytes (only limit of them shown)."""
    shown = data[:limit]
    out = []
    n = len(shown)
    for i, b in enumerate(shown):
        named = _NAMED.get(b)
        if named is not None:
            out.append(named)
        elif 32 <= b < 127:
            out.append(chr(b))
        else:
            out.append(_octal(b, shown[i + 1] if i + 1 < n else None))
    return '"' + "".join(out) + '"' + ("..." if len(data) > limit else "")


def _escape_char(c: str, following: str | None) -> str:
    o = ord(c)
    if c == "\\":
        return "\\\\"
    if 0xDC80 <= o <= 0xDCFF:            # surrogateescape: the invalid byte itself
        raw = bytes([o - 0xDC00])
    elif o < 0x80 and (o < 32 or o == 0x7F):
        named = _NAMED.get(o)
        if named is not None and c not in '"':
            return named
        raw = bytes([o])
    else:
        raw = c.encode("utf-8", "surrogatepass")
    nxt = following.encode("utf-8", "surrogateescape")[:1] if following else b""
    return "".join(_octal(b, (raw[i + 1] if i + 1 < len(raw) else (nxt[0] if nxt else None)))
                   for i, b in enumerate(raw))


def escape_text(text: str) -> str:
    """A tracee-controlled name for a text line: printable characters (Unicode letters
    included) as they are; controls (C0, DEL, C1 such as CSI U+009B), format characters
    (bidirectional overrides), separators other than the space, invalid bytes and the
    backslash escaped as strace escapes them."""
    if text.isascii() and text.isprintable() and "\\" not in text:
        return text                       # the common case, fast
    out = []
    for i, c in enumerate(text):
        if c == "\\" or not c.isprintable() or 0xD800 <= ord(c) <= 0xDFFF:
            out.append(_escape_char(c, text[i + 1] if i + 1 < len(text) else None))
        else:
            out.append(c)
    return "".join(out)

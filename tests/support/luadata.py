"""Read the Lua data files that Prosody's internal storage writes.

Prosody's ``util.serialization`` writes plain Lua literals: tables with ``[key] = value``,
``name = value`` and positional items, strings with C-style and ``\\ddd`` byte escapes (every
byte outside printable ASCII is escaped, so UTF-8 text arrives as escaped bytes), integers,
``%.18g`` floats, booleans. ``archive`` stores (offline messages, MAM) are a sequence of
``item(TABLE);`` calls, one per stored stanza, and a stored stanza is a table with ``name``,
``attr`` and its children in the array part. Only this literal subset is parsed; anything else is
an error rather than a guess.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

XML_NS = "http://www.w3.org/XML/1998/namespace"


class LuaTable:
    """A Lua table split the way Prosody uses it: array part and keyed part."""

    def __init__(self) -> None:
        self.array: list[LuaValue] = []
        self.fields: dict[str | int | float | bool, LuaValue] = {}

    def get(self, key: str | int, default: LuaValue = None) -> LuaValue:
        return self.fields.get(key, default)

    def __repr__(self) -> str:
        return f"LuaTable(array={self.array!r}, fields={self.fields!r})"


LuaValue = str | int | float | bool | LuaTable | None


class LuaSyntaxError(ValueError):
    pass


_TOKEN = re.compile(
    rb"""
    (?P<space>\s+|--[^\n]*)
  | (?P<string>"(?:[^"\\\n]|\\.|\\\n)*"|'(?:[^'\\\n]|\\.|\\\n)*')
  | (?P<number>-?(?:0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?))
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<punct>[{}\[\]=;,()/])
    """,
    re.VERBOSE | re.DOTALL,
)

_SIMPLE_ESCAPES = {
    ord("a"): b"\a",
    ord("b"): b"\b",
    ord("f"): b"\f",
    ord("n"): b"\n",
    ord("r"): b"\r",
    ord("t"): b"\t",
    ord("v"): b"\v",
    ord("\\"): b"\\",
    ord('"'): b'"',
    ord("'"): b"'",
    ord("\n"): b"\n",
}


def _unescape(raw: bytes) -> str:
    out = bytearray()
    i = 0
    while i < len(raw):
        c = raw[i]
        if c != 0x5C:  # backslash
            out.append(c)
            i += 1
            continue
        nxt = raw[i + 1]
        if nxt in _SIMPLE_ESCAPES:
            out += _SIMPLE_ESCAPES[nxt]
            i += 2
        elif 0x30 <= nxt <= 0x39:
            m = re.match(rb"\d{1,3}", raw[i + 1 :])
            assert m is not None
            out.append(int(m.group()))
            i += 1 + len(m.group())
        elif nxt == ord("x"):
            out.append(int(raw[i + 2 : i + 4], 16))
            i += 4
        else:
            raise LuaSyntaxError(f"unsupported escape \\{chr(nxt)}")
    # Prosody stores what it received, which is UTF-8 by the XMPP rules.
    return out.decode("utf-8", errors="surrogateescape")


class _Parser:
    def __init__(self, data: bytes) -> None:
        self.tokens: list[tuple[str, bytes]] = []
        pos = 0
        while pos < len(data):
            m = _TOKEN.match(data, pos)
            if m is None:
                raise LuaSyntaxError(f"unexpected input at byte {pos}: {data[pos : pos + 20]!r}")
            kind = m.lastgroup
            assert kind is not None
            if kind != "space":
                self.tokens.append((kind, m.group()))
            pos = m.end()
        self.i = 0

    def peek(self) -> tuple[str, bytes] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self) -> tuple[str, bytes]:
        tok = self.peek()
        if tok is None:
            raise LuaSyntaxError("unexpected end of input")
        self.i += 1
        return tok

    def expect(self, text: bytes) -> None:
        _kind, value = self.take()
        if value != text:
            raise LuaSyntaxError(f"expected {text!r}, got {value!r}")

    def value(self) -> LuaValue:
        kind, text = self.take()
        if kind == "string":
            return _unescape(text[1:-1])
        if kind == "number":
            if re.fullmatch(rb"-?\d+", text):
                return int(text)
            if re.fullmatch(rb"-?0[xX][0-9a-fA-F]+", text):
                return int(text, 16)
            return float(text)
        if kind == "name":
            if text == b"true":
                return True
            if text == b"false":
                return False
            if text == b"nil":
                return None
            raise LuaSyntaxError(f"unexpected name {text!r}")
        if text == b"{":
            return self.table()
        if text == b"(":
            # (1/0), (-1/0), (0/0): how util.serialization writes non-finite floats.
            num = self.value()
            self.expect(b"/")
            den = self.value()
            self.expect(b")")
            if not isinstance(num, int | float) or den != 0:
                raise LuaSyntaxError("unsupported parenthesised expression")
            return float("nan") if num == 0 else (float("inf") if num > 0 else float("-inf"))
        raise LuaSyntaxError(f"unexpected token {text!r}")

    def table(self) -> LuaTable:
        table = LuaTable()
        while True:
            tok = self.peek()
            if tok is None:
                raise LuaSyntaxError("unterminated table")
            if tok[1] == b"}":
                self.i += 1
                return table
            if tok[1] == b"[":
                self.i += 1
                key = self.value()
                self.expect(b"]")
                self.expect(b"=")
                if key is None or isinstance(key, LuaTable):
                    raise LuaSyntaxError("unsupported table key")
                table.fields[key] = self.value()
            elif (
                tok[0] == "name"
                and self.i + 1 < len(self.tokens)
                and self.tokens[self.i + 1][1] == b"="
            ):
                self.i += 2
                table.fields[tok[1].decode()] = self.value()
            else:
                table.array.append(self.value())
            sep = self.peek()
            if sep is not None and sep[1] in (b";", b","):
                self.i += 1


def parse_value(data: bytes) -> LuaValue:
    """Parse one Lua literal, optionally preceded by ``return`` (how ``.dat`` files look)."""
    parser = _Parser(data)
    tok = parser.peek()
    if tok is not None and tok == ("name", b"return"):
        parser.i += 1
    value = parser.value()
    if parser.peek() is not None and parser.peek() != ("punct", b";"):
        raise LuaSyntaxError("trailing input after value")
    return value


def parse_item_list(data: bytes) -> list[LuaTable]:
    """Parse a ``.list`` file: ``item(TABLE);`` repeated."""
    parser = _Parser(data)
    items: list[LuaTable] = []
    while parser.peek() is not None:
        _kind, text = parser.take()
        if text != b"item":
            raise LuaSyntaxError(f"expected item(...), got {text!r}")
        parser.expect(b"(")
        value = parser.value()
        if not isinstance(value, LuaTable):
            raise LuaSyntaxError("item() without a table")
        items.append(value)
        parser.expect(b")")
        sep = parser.peek()
        if sep is not None and sep[1] == b";":
            parser.i += 1
    return items


def stanza_to_element(table: LuaTable) -> ET.Element:
    """Rebuild an element from Prosody's serialised stanza table.

    Prosody keeps namespaced attributes as ``"NS\\1name"`` (or ``"NS|name"``) keys; they become
    ElementTree's ``{NS}name``, and so does the literal ``xml:lang`` key Prosody uses. ``xmlns``
    stays a plain attribute, as Prosody has it.
    """
    name = table.get("name")
    attr = table.get("attr")
    if not isinstance(name, str):
        raise LuaSyntaxError("stanza table without a name")
    attrs: dict[str, str] = {}
    if isinstance(attr, LuaTable):
        for key, value in attr.fields.items():
            if not isinstance(key, str) or not isinstance(value, str):
                continue
            sep = "\x01" if "\x01" in key else ("|" if "|" in key else None)
            if key == "xml:lang":
                key = f"{{{XML_NS}}}lang"
            elif sep is not None:
                ns, _, local = key.partition(sep)
                key = f"{{{ns}}}{local}"
            attrs[key] = value
    element = ET.Element(name, attrs)
    last: ET.Element | None = None
    for child in table.array:
        if isinstance(child, LuaTable):
            last = stanza_to_element(child)
            element.append(last)
        elif isinstance(child, str):
            if last is None:
                element.text = (element.text or "") + child
            else:
                last.tail = (last.tail or "") + child
    return element

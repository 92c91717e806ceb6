"""Incremental JSON decoding of request bodies, with memory bounded by the tensors they declare.

``json.loads`` on a 16 MB body of numbers holds the body and ~32 bytes of Python objects per
number: about ten times the tensor it describes. :class:`JsonStream` is fed a body chunk by chunk
instead. The small envelope (names, shapes, parameters) becomes ordinary Python values; the
array under a key of an object for which ``plan(obj, key)`` names a dtype is decoded straight into a
numpy array, one comma-aligned slice at a time, each slice by a C decoder (orjson for floats, else
``json``). Nested data (``[[1, 2], [3, 4]]``) is read in row-major order, as KServe allows. A
document whose (small) size is known up front is simply gathered and decoded at once.

Beyond strict JSON it accepts what Python's ``json`` and rapidjson (``tritonclient``) write for
non-finite floats: ``NaN``, ``Infinity``, ``-Infinity``, and the strings ``"NaN"``/``"Infinity"``/
``"-Infinity"`` inside number arrays (what :mod:`.kserve` writes, so a response can be sent back).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import numpy as np

try:  # parses float arrays ~3x faster than json; the daemon extra installs it
    import orjson
except ImportError:  # pragma: no cover - depends on the install
    orjson = None


class JsonStreamError(ValueError):
    """The bytes fed are not the JSON expected; the message names the byte offset."""


_WS = rb"[ \t\r\n]*"
_TOKEN = re.compile(
    _WS + rb'(?:([{}\[\]:,])|("(?:[^"\\\x00-\x1f]|\\.)*")'
    rb"|(-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?|true|false|null|NaN|-?Infinity)(?=[ \t\r\n,\]}:]))")
# What a token cut by the end of the buffer can look like (wait for more bytes rather than fail).
_PARTIAL = re.compile(_WS + rb'(?:"(?:[^"\\\x00-\x1f]|\\.)*\\?|-?[0-9.eE+-]*|-?[A-Za-z]{1,8})\Z')
_SPACE = re.compile(_WS)
_BRACKETS_TO_SPACES = bytes.maketrans(b"[]", b"  ")
_LITERALS = {b"true": True, b"false": False, b"null": None, b"NaN": float("nan"),
             b"Infinity": float("inf"), b"-Infinity": float("-inf")}

MAX_DEPTH = 32
#: Longest token kept waiting for its end: a longer string (send big BYTES elements in the binary
#: extension) or number is refused, so a hostile body cannot make each chunk rescan megabytes.
_MAX_PARTIAL = 1 << 20

#: ``plan(obj, key)`` → (dtype, element count or None) to decode the array ``obj[key]`` in bulk, or None.
Plan = Callable[[dict[str, Any], str], "tuple[np.dtype, int | None] | None"]
#: Tokens outside bulk arrays: a request's envelope is small, and each token costs Python time.
MAX_TOKENS = 200_000
#: A document known to be at most this long is gathered and decoded by one ``json.loads`` (its
#: arrays stay lists): streaming pays off only where the size matters, and a token costs ~3 us.
WHOLE_MAX = 64 * 1024


class _BulkArray:
    """One ``data`` array being decoded into ``dtype`` (preallocated when ``count`` is known)."""

    def __init__(self, dtype: np.dtype, count: int | None) -> None:
        self.dtype, self.count = dtype, count
        self.depth = 1
        self.filled = 0
        self.out = np.empty(count, dtype) if count is not None else None
        self.parts: list[np.ndarray] = []

    def consume(self, buf: bytes, pos: int, offset: int) -> tuple[int, np.ndarray | None]:
        """Decode what ``buf[pos:]`` holds; (new position, the array once its ``]`` was seen)."""
        # Brackets inside strings are not told apart: a segment cut at one does not decode.
        # (bytes.find, not a regex: sre looks for a character class byte by byte, ~10x slower)
        depth, at = self.depth, pos
        opening, closing = buf.find(b"[", at), buf.find(b"]", at)
        while closing >= 0:
            if 0 <= opening < closing:
                depth += 1
                if depth > MAX_DEPTH:
                    raise JsonStreamError(f"'data' is nested too deeply (byte {offset + opening})")
                opening = buf.find(b"[", opening + 1)
                continue
            depth -= 1
            if depth == 0:
                self._decode(buf[pos:closing], offset + pos)
                return closing + 1, self._result()
            closing = buf.find(b"]", closing + 1)
        if opening >= 0 and depth + buf.count(b"[", opening) > MAX_DEPTH:
            raise JsonStreamError(f"'data' is nested too deeply (byte {offset + opening})")
        cut = buf.rfind(b",", pos)
        if cut < 0:
            if len(buf) - pos > _MAX_PARTIAL:
                raise JsonStreamError(f"'data' holds a {len(buf) - pos}-byte token at byte {offset + pos}: not a number")
            return pos, None
        self.depth += buf.count(b"[", pos, cut) - buf.count(b"]", pos, cut)
        self._decode(buf[pos:cut], offset + pos)
        return cut + 1, None

    def _decode(self, segment: bytes, offset: int) -> None:
        text = segment.translate(_BRACKETS_TO_SPACES)
        if not text.strip():
            return
        text = b"[" + text + b"]"
        values = None
        if orjson is not None and self.dtype.kind == "f":  # (ints: orjson reads a too large one as a float)
            try:
                values = orjson.loads(text)
            except orjson.JSONDecodeError:
                pass  # NaN/Infinity tokens or an error: the json module reads the one, words the other
        if values is None:
            try:
                values = json.loads(text)
            except ValueError as exc:
                raise JsonStreamError(f"'data' is not a list of numbers near byte {offset}: {exc.msg}") from None
        if self.dtype.kind == "f" and b"null" in text:  # (numpy would read null as NaN; `None in values` is slow)
            raise JsonStreamError(f"'data' holds null near byte {offset}; use NaN")
        try:
            part = np.asarray(values, dtype=self.dtype)
        except (ValueError, TypeError, OverflowError) as exc:
            raise JsonStreamError(f"'data' is not a list of {self.dtype} numbers near byte {offset}: {exc}") from None
        if part.ndim != 1:  # e.g. ["1", "2"] for a bool: numpy would not flatten strings
            raise JsonStreamError(f"'data' is not a list of numbers near byte {offset}")
        if self.out is None:
            self.parts.append(part)
        elif self.filled + part.size > self.out.size:
            raise JsonStreamError(f"'data' has more than the {self.out.size} elements its shape declares")
        else:
            self.out[self.filled:self.filled + part.size] = part
        self.filled += part.size

    def _result(self) -> np.ndarray:
        if self.out is None:
            return np.concatenate(self.parts) if self.parts else np.empty(0, self.dtype)
        return self.out[:self.filled]


class JsonStream:
    """Push decoder of one JSON object: :meth:`feed` bytes as they come, then :meth:`close`."""

    def __init__(self, plan: Plan | None = None, max_tokens: int = MAX_TOKENS, size: int | None = None) -> None:
        """``size``: the document's length when known up front (at most :data:`WHOLE_MAX`: decoded at once)."""
        self._plan, self._tokens_left = plan, max_tokens
        self._whole = bytearray() if size is not None and size <= WHOLE_MAX else None
        self._buf = b""
        self._offset = 0  # of _buf[0] in the whole document
        self._stack: list[list[Any]] = []  # [container, pending key, expect]
        self._bulk: _BulkArray | None = None
        self._root: Any = None
        self._done = False

    def feed(self, data: bytes) -> None:
        if self._whole is not None:
            self._whole += data
            if len(self._whole) <= WHOLE_MAX:
                return
            data, self._whole = bytes(self._whole), None  # longer than announced: stream it
        self._buf = self._buf + data if self._buf else bytes(data)
        pos = self._run(self._buf, 0, final=False)
        self._offset += pos
        self._buf = self._buf[pos:]

    def close(self) -> Any:
        """The decoded document (an object); raises if the bytes fed do not make one."""
        if self._whole is not None:
            return _loads_whole(bytes(self._whole))
        pos = self._run(self._buf, 0, final=True)
        if not self._done:
            raise JsonStreamError(f"the JSON document ends early (byte {self._offset + pos})")
        return self._root

    # ---- the state machine --------------------------------------------------------------------
    # expect: "value", "value_or_end" (after '['), "key_or_end" (after '{'), "key", ":", ", or end"

    def _run(self, buf: bytes, pos: int, final: bool) -> int:
        while True:
            if self._bulk is not None:
                pos, array = self._bulk.consume(buf, pos, self._offset)
                if array is None:
                    return pos
                self._bulk = None
                self._value(array, pos)
                continue
            match = _TOKEN.match(buf, pos)
            if match is None:
                rest = _SPACE.match(buf, pos).end()
                if rest == len(buf):
                    return rest
                if self._done:
                    raise JsonStreamError(f"unexpected data after the JSON document at byte {self._offset + rest}")
                if not final and _PARTIAL.match(buf, rest):
                    if len(buf) - rest > _MAX_PARTIAL:
                        raise JsonStreamError(f"a token of more than {_MAX_PARTIAL} bytes at byte {self._offset + rest}")
                    return pos
                raise JsonStreamError(f"invalid JSON at byte {self._offset + rest}: {buf[rest:rest + 20]!r}")
            if self._done:
                raise JsonStreamError(f"unexpected data after the JSON document at byte {self._offset + match.start(0)}")
            pos = match.end()
            self._tokens_left -= 1
            if self._tokens_left < 0:
                raise JsonStreamError("the JSON outside tensor data is too large (more than "
                                      f"{MAX_TOKENS} tokens; send big arrays as tensor data)")
            punct, string, scalar = match.groups()
            if punct is not None:
                self._punct(punct, pos)
            elif string is not None:
                try:
                    text = json.loads(string)
                except ValueError as exc:
                    raise JsonStreamError(f"bad string at byte {self._offset + match.start(2)}: {exc.msg}") from None
                self._string(text, pos)
            else:
                value = _LITERALS[scalar] if scalar in _LITERALS else json.loads(scalar)
                self._value(value, pos)

    def _expect(self) -> str:
        return self._stack[-1][2] if self._stack else "value"

    def _fail(self, what: str, pos: int) -> JsonStreamError:
        return JsonStreamError(f"invalid JSON at byte {self._offset + pos - 1}: unexpected {what}")

    def _punct(self, char: bytes, pos: int) -> None:
        expect = self._expect()
        if char in (b"{", b"["):
            if expect not in ("value", "value_or_end"):
                raise self._fail(char.decode(), pos)
            if not self._stack and char == b"[":
                raise JsonStreamError("the request body must be a JSON object")
            if len(self._stack) >= MAX_DEPTH:
                raise JsonStreamError(f"the JSON document is nested too deeply (byte {self._offset + pos - 1})")
            if char == b"[" and self._plan is not None and self._stack and isinstance(self._stack[-1][0], dict):
                plan = self._plan(self._stack[-1][0], self._stack[-1][1])
                if plan is not None:
                    self._bulk = _BulkArray(*plan)
                    return
            self._stack.append([{}, None, "key_or_end"] if char == b"{" else [[], None, "value_or_end"])
        elif char in (b"}", b"]"):
            closes = "key_or_end" if char == b"}" else "value_or_end"
            if expect not in (closes, ", or end") or isinstance(self._stack[-1][0], dict) != (char == b"}"):
                raise self._fail(char.decode(), pos)
            container = self._stack.pop()[0]
            self._value(container, pos)
        elif char == b":":
            if expect != ":":
                raise self._fail("':'", pos)
            self._stack[-1][2] = "value"
        else:  # ','
            if expect != ", or end":
                raise self._fail("','", pos)
            self._stack[-1][2] = "key" if isinstance(self._stack[-1][0], dict) else "value"

    def _string(self, text: str, pos: int) -> None:
        if self._expect() in ("key", "key_or_end"):
            self._stack[-1][1] = text
            self._stack[-1][2] = ":"
        else:
            self._value(text, pos)

    def _value(self, value: Any, pos: int) -> None:
        if not self._stack:
            if not isinstance(value, dict):
                raise JsonStreamError("the request body must be a JSON object")
            self._root, self._done = value, True
            return
        frame = self._stack[-1]
        if frame[2] not in ("value", "value_or_end"):
            raise self._fail("value", pos)
        if isinstance(frame[0], dict):
            frame[0][frame[1]] = value
        else:
            frame[0].append(value)
        frame[2] = ", or end"


def _loads_whole(data: bytes) -> Any:
    try:
        document = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise JsonStreamError(f"the document is not UTF-8 (byte {exc.start})") from None
    except ValueError as exc:
        raise JsonStreamError(f"invalid JSON at byte {exc.pos}: {exc.msg}") from None
    except RecursionError:
        raise JsonStreamError("the JSON document is nested too deeply") from None
    if not isinstance(document, dict):
        raise JsonStreamError("the request body must be a JSON object")
    return document

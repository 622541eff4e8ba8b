"""JSON that a person hands ComfyHub (an uploaded workflow, a ComfyUI-Manager snapshot, template settings): the one
place it is read and parsed, within a size limit (UPLOAD_MAX_BYTES) and a nesting limit (UPLOAD_MAX_DEPTH).

Every refusal is a `JSONInputError` whose message says what is wrong and which limit it hit, so a page shows it
next to the field and a command exits 2 with it; nothing here may end in a RecursionError or a MemoryError.
"""
from __future__ import annotations

import json
import re

from django.conf import settings
from django.template.defaultfilters import filesizeformat

# A string (with its escapes) or a run of opening or closing brackets: enough to count how deep a text nests
# without parsing it. Counting stops after _TOKENS_COUNTED tokens, so a text built to be slow to count is not.
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[\[{]+|[\]}]+', re.DOTALL)
_TOKENS_COUNTED = 1_000_000


class JSONInputError(ValueError):
    """Input that is too big, nests too deep, or is not JSON; the message names the input and the limit."""


def check_size(size: int, *, what: str) -> None:
    limit = settings.UPLOAD_MAX_BYTES
    if size > limit:
        raise JSONInputError(f"{what} is {filesizeformat(size)}; at most {filesizeformat(limit)} is taken "
                             "(UPLOAD_MAX_BYTES).")


def read_upload(upload, *, what: str | None = None) -> bytes:
    """The bytes of an uploaded file, refused by its declared size before anything is read, then read with a cap
    (never more than UPLOAD_MAX_BYTES + 1 bytes in memory)."""
    what = what or f"{upload.name}"
    if upload.size is not None:
        check_size(upload.size, what=what)
    upload.seek(0)
    raw = upload.read(settings.UPLOAD_MAX_BYTES + 1)
    check_size(len(raw), what=what)
    return raw


def read_stream(stream, *, what: str) -> bytes:
    """At most UPLOAD_MAX_BYTES from a binary stream (stdin); one byte more is refused."""
    raw = stream.read(settings.UPLOAD_MAX_BYTES + 1)
    check_size(len(raw), what=what)
    return raw


def loads(raw: bytes | str, *, what: str = "The JSON"):
    """Parse JSON within the limits. `what` starts the messages: "The workflow", "comfy.settings.json"."""
    check_size(len(raw), what=what)
    if isinstance(raw, (bytes, bytearray)):
        try:
            text = bytes(raw).decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise JSONInputError(f"{what} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
                                 "save it as UTF-8 JSON.") from exc
    else:
        text = raw
    try:
        data = json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise too_deep(*text_depth(text), what=what) from None
    except json.JSONDecodeError as exc:
        raise JSONInputError(f"{what} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}.") \
            from None
    except ValueError as exc:  # NaN/Infinity (below), an integer of thousands of digits
        raise JSONInputError(f"{what} is not valid JSON: {exc}") from None
    check_depth(data, what=what)
    return data


def kind_of(value) -> str:
    """'a string', 'a list', ... for messages about a value of the wrong type."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "true or false", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number; write a number or null instead.")


def depth(data) -> int:
    """How deep lists and objects nest (a scalar is 0, [] is 1, {"a": [1]} is 2), without recursion."""
    deepest = 0
    stack = [(data, 1)]
    while stack:
        value, level = stack.pop()
        if isinstance(value, dict):
            children = value.values()
        elif isinstance(value, (list, tuple)):
            children = value
        else:
            continue
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in children if isinstance(child, (dict, list, tuple)))
    return deepest


def check_depth(data, *, what: str) -> None:
    found = depth(data)
    if found > settings.UPLOAD_MAX_DEPTH:
        raise too_deep(found, what=what)


def too_deep(found: int, counted_all: bool = True, *, what: str) -> JSONInputError:
    levels = f"{found:,}" if counted_all else f"at least {found:,}"
    return JSONInputError(f"{what} nests {levels} levels deep; at most {settings.UPLOAD_MAX_DEPTH} are taken "
                          "(UPLOAD_MAX_DEPTH).")


def text_depth(text: str) -> tuple[int, bool]:
    """How deep brackets nest in a JSON text (strings skipped), and whether the whole text was counted."""
    level = deepest = 0
    for count, match in enumerate(_TOKEN.finditer(text)):
        if count == _TOKENS_COUNTED:
            return deepest, False
        token = match.group()
        if token[0] in "[{":
            level += len(token)
            deepest = max(deepest, level)
        elif token[0] in "]}":
            level -= len(token)
    return deepest, True

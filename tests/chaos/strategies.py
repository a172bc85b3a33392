"""Hypothesis strategies for any protobuf message, derived from its descriptor alone: each field
unset or set to a hostile value of its type (boundary integers, enum numbers the .proto does
not define, empty and oversized bytes and strings, nested messages, repeated fields with
duplicates), and for the handle types a real handle of the live host, another VM's, or a
forgery built from the two."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

# sizes of a bytes or string field: empty, one, a page and one past it, and past 1 MiB (the
# payload limit of the memory RPCs), below the channels' 4 MiB message limit
SIZES = (0, 1, 64, 65, 4096, 4097, (1 << 20) + 1)
MAX_DEPTH = 3

_T = FieldDescriptor
_SIGNED32 = (_T.TYPE_INT32, _T.TYPE_SINT32, _T.TYPE_SFIXED32)
_SIGNED64 = (_T.TYPE_INT64, _T.TYPE_SINT64, _T.TYPE_SFIXED64)
_UNSIGNED32 = (_T.TYPE_UINT32, _T.TYPE_FIXED32)
_UNSIGNED64 = (_T.TYPE_UINT64, _T.TYPE_FIXED64)


def boundaries(bits: int, signed: bool) -> list[int]:
    """0, 1, the ends of the type, and where a narrower type or a page/2M boundary ends."""
    if signed:
        top = (1 << (bits - 1)) - 1
        return sorted(
            e for e in {0, 1, -1, top, -top - 1, 0x7FFFFFFF, -(1 << 31)} if -top - 1 <= e <= top
        )
    top = (1 << bits) - 1
    edges = {0, 1, 2, 3, 4, 99, 0x1000, 0xFFF, 0x200000, 0x7FFFFFFF, 0xFFFFFFFF, 1 << 32, top}
    return sorted(e for e in edges if e <= top)


def integer(bits: int, signed: bool, known: Sequence[int] = ()) -> st.SearchStrategy[int]:
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    inside = [k for k in known if lo <= k <= hi]
    parts = [st.sampled_from(boundaries(bits, signed)), st.integers(lo, hi)]
    if inside:
        parts.insert(0, st.sampled_from(inside))
    return st.one_of(*parts)


def enum_value(desc: EnumDescriptor) -> st.SearchStrategy[int]:
    """A defined value, or one the .proto does not define (proto3 enums are open: the number
    reaches the server as sent)."""
    defined = sorted(v.number for v in desc.values)
    undefined = sorted({max(defined) + 1, 99, -1, 0x7FFFFFFF, -(1 << 31)} - set(defined))
    return st.one_of(st.sampled_from(defined), st.sampled_from(undefined))


def blob(known: Sequence[bytes] = ()) -> st.SearchStrategy[bytes]:
    sized = st.sampled_from(SIZES).flatmap(
        lambda n: st.just(b"\xa5" * n) if n > 4097 else st.binary(min_size=n, max_size=n)
    )
    parts = [sized, st.binary(max_size=96)]
    if known:
        parts.insert(0, st.sampled_from(list(known)))
    return st.one_of(*parts)


def text(known: Sequence[str] = ()) -> st.SearchStrategy[str]:
    sized = st.sampled_from(SIZES).map(lambda n: "x" * n)
    odd = st.sampled_from(
        [
            "",
            " ",
            "\x00",
            "../../etc/passwd",
            "/etc/hostname",
            "02:00:00:00:00:01",
            "ff:ff:ff:ff:ff:ff",
            "00:00:00:00:00:00",
            "zz:zz",
            "\u00e9\u2603",
        ]
    )
    parts = [odd, sized, st.text(max_size=40)]
    if known:
        parts.insert(0, st.sampled_from(list(known)))
    return st.one_of(*parts)


@dataclass
class Known:
    """Values of the live host the strategies mix in, so that requests reach past the first
    lookup: real messages by full type name (handles, identities), and integers, strings and
    bytes seen there (GPAs, PFNs, MACs, ids, tokens)."""

    messages: dict[str, list[Message]] = field(default_factory=dict)
    ints: list[int] = field(default_factory=list)
    strings: list[str] = field(default_factory=list)
    blobs: list[bytes] = field(default_factory=list)


# per-field overrides: (message full name, field name) -> strategy; a test narrows a field that
# would otherwise make one example wait for seconds (a flood's duration, a copy's timeout)
Overrides = Mapping[tuple[str, str], st.SearchStrategy[Any]]


def _scalar(f: FieldDescriptor, known: Known) -> st.SearchStrategy[Any]:
    if f.type == _T.TYPE_BOOL:
        return st.booleans()
    if f.type == _T.TYPE_ENUM:
        return enum_value(f.enum_type)
    if f.type in _SIGNED32:
        return integer(32, True, known.ints)
    if f.type in _SIGNED64:
        return integer(64, True, known.ints)
    if f.type in _UNSIGNED32:
        return integer(32, False, known.ints)
    if f.type in _UNSIGNED64:
        return integer(64, False, known.ints)
    if f.type in (_T.TYPE_FLOAT, _T.TYPE_DOUBLE):
        return st.floats(
            allow_nan=True, allow_infinity=True, width=32 if f.type == _T.TYPE_FLOAT else 64
        )
    if f.type == _T.TYPE_STRING:
        return text(known.strings)
    if f.type == _T.TYPE_BYTES:
        return blob(known.blobs)
    raise TypeError(f"{f.full_name}: field type {f.type} has no strategy")


def _repeated(element: st.SearchStrategy[Any]) -> st.SearchStrategy[list[Any]]:
    """A short list, or one element repeated (the duplicates a list field must refuse)."""
    return st.one_of(
        st.lists(element, max_size=4),
        st.tuples(element, st.integers(2, 3)).map(lambda t: [t[0]] * t[1]),
    )


def _is_map(f: FieldDescriptor) -> bool:
    return f.type == _T.TYPE_MESSAGE and f.message_type.GetOptions().map_entry


def _field(
    f: FieldDescriptor, known: Known, overrides: Overrides, depth: int
) -> st.SearchStrategy[Any]:
    over = overrides.get((f.containing_type.full_name, f.name))
    if over is not None:
        return over
    if _is_map(f):
        k, v = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
        return st.dictionaries(
            _field(k, known, overrides, depth + 1),
            _field(v, known, overrides, depth + 1),
            max_size=3,
        )
    one = (
        message(f.message_type, known, overrides, depth + 1)
        if f.type == _T.TYPE_MESSAGE
        else _scalar(f, known)
    )
    return _repeated(one) if f.is_repeated else one


def _build(cls: type[Message], values: dict[str, Any]) -> Message:
    msg = cls()
    for name, value in values.items():
        if value is None:
            continue
        f = msg.DESCRIPTOR.fields_by_name[name]
        if _is_map(f):
            target = getattr(msg, name)
            for k, v in value.items():
                if f.message_type.fields_by_name["value"].type == _T.TYPE_MESSAGE:
                    target[k].CopyFrom(v)
                else:
                    target[k] = v
        elif f.is_repeated:
            target = getattr(msg, name)
            if f.type == _T.TYPE_MESSAGE:
                for v in value:
                    target.add().CopyFrom(v)
            else:
                target.extend(value)
        elif f.type == _T.TYPE_MESSAGE:
            getattr(msg, name).CopyFrom(value)
        else:
            setattr(msg, name, value)
    return msg


def message(
    desc: Descriptor, known: Known | None = None, overrides: Overrides | None = None, depth: int = 0
) -> st.SearchStrategy[Message]:
    """Messages of type `desc`: each field unset or set to a hostile value of its type; for a
    type `known` holds real instances of, one of them (or a forgery mixing two) as often as
    a generated one."""
    known = known or Known()
    overrides = overrides or {}
    cls: Callable[..., Message] = message_factory.GetMessageClass(desc)
    if depth > MAX_DEPTH:
        return st.just(cls())
    fields = {f.name: st.none() | _field(f, known, overrides, depth) for f in desc.fields}
    generated = st.fixed_dictionaries(fields).map(lambda v: _build(cls, v))  # type: ignore[arg-type]
    real = known.messages.get(desc.full_name)
    if real:
        return st.one_of(st.sampled_from(real), generated)
    return generated

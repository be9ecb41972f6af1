"""Hypothesis strategies for what a hostile client can send: frames, fields, JSON oddities."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import strategies as st

from shared.messages import REQUESTS

#: Valid JSON the usual encoders never write, and the texts that were reported to hurt.
ODD_JSON: list[str] = [
    "1e400",
    "-1e400",
    "1e-400",
    "1" * 4301,
    "-" + "9" * 5000,
    '"\\ud800"',
    '"\\udc00"',
    '"\\ud83d\\ude00"',
    '"\\u0000"',
    "[]",
    "{}",
    '""',
    "null",
    " [ 1 , 2 ] ",
    "\n{\n}\n",
    "0.0000000000000000000000001",
    "123456789012345678901234567890",
]


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


json_values: st.SearchStrategy[Any] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=12,
)

#: A JSON value as text: ordinary, odd, or nested at every depth around the limits.
json_texts: st.SearchStrategy[str] = st.one_of(
    json_values.map(json.dumps),
    st.sampled_from(ODD_JSON),
    st.integers(min_value=1, max_value=400).map(nested),
    st.integers(min_value=60, max_value=70).map(nested),
    # Past the interpreter's recursion limit (about 1,000): the reported crash.
    st.sampled_from([985, 1000, 2000, 5000]).map(nested),
)

request_types = st.one_of(st.sampled_from(sorted(REQUESTS)), st.text(max_size=12))
field_names = st.sampled_from(["role", "targetId", "channelId", "payload", "limit", "after"])


@st.composite
def request_frames(draw: st.DrawFn, channel_id: str = "", target_id: str = "") -> str:
    """A frame shaped like a request, with any of its parts wrong, odd or missing."""
    fields: list[tuple[str, str]] = []
    if draw(st.booleans()) or True:
        fields.append(("type", json.dumps(draw(request_types))))
    if draw(st.integers(0, 9)):
        fields.append(("id", draw(st.one_of(st.integers(0, 10**6).map(str), json_texts))))
    for name in draw(st.lists(field_names, max_size=4, unique=True)):
        value = draw(
            st.one_of(
                st.just(json.dumps(channel_id if name == "channelId" else target_id)),
                json_texts,
            )
        )
        fields.append((name, value))
    if draw(st.booleans()):
        fields = draw(st.permutations(fields))
    return "{" + ",".join(f"{json.dumps(name)}:{value}" for name, value in fields) + "}"


frames: st.SearchStrategy[str | bytes] = st.one_of(
    request_frames(),
    json_texts,
    st.text(max_size=40),
    st.binary(max_size=40),
)

"""The codec's limits: nesting depth and valid JSON that msgspec cannot read (issue 15.2)."""

from __future__ import annotations

import pytest

from shared.codec import (
    CLOSE_UNSUPPORTED_DATA,
    READABLE_DEPTH,
    TOO_DEEP,
    UNCARRIABLE,
    CloseConnection,
    ErrorReply,
    FailedReply,
    decode_request,
    nesting_depth,
)
from shared.messages import Message


def message(payload: str) -> str:
    return f'{{"type":"message","id":3,"channelId":"c","payload":{payload}}}'


@pytest.mark.parametrize(
    ("text", "depth"),
    [
        ("[" * 70 + "]" * 70, 70),
        ("[[],[[]],{}]" * 30, 3),
        ('["[[[[[[[[[[", "]]]]", "\\"[[[["]' * 40, 1),
        ('{"a":[{"b":[1,2,{"c":[]}]}]}' * 20, 6),
    ],
)
def test_nesting_depth_is_exact(text: str, depth: int) -> None:
    assert nesting_depth(text, 2) == depth


def test_few_brackets_skip_the_scan() -> None:
    assert nesting_depth("[[[]]]", 64) == 0


@pytest.mark.parametrize("text", ["[" * 300, "[" * 100 + "]" * 50, "[" * 5000 + "]" * 5000])
def test_unbalanced_or_very_deep_counts_as_past_the_bound(text: str) -> None:
    assert nesting_depth(text, 64) == READABLE_DEPTH + 1


def test_depth_at_the_limit_passes_and_one_more_is_refused() -> None:
    # The request object is level 1: a 63-deep payload makes 64.
    assert isinstance(decode_request(message("[" * 63 + "]" * 63)), Message)
    refused = decode_request(message("[" * 64 + "]" * 64))
    assert refused == FailedReply(
        "message", 3, "Invalid request: JSON nested deeper than 64 levels", "c", TOO_DEEP
    )


def test_too_deep_to_read_closes_1003() -> None:
    assert decode_request(message("[" * 2000 + "]" * 2000)) == CloseConnection(
        CLOSE_UNSUPPORTED_DATA, "JSON nested deeper than 64 levels", TOO_DEEP
    )


def test_too_deep_without_an_id_is_an_error_reply() -> None:
    rejection = decode_request("[" * 70 + "]" * 70)
    assert isinstance(rejection, ErrorReply) and rejection.kind == TOO_DEEP


@pytest.mark.parametrize("payload", ["1e400", "-1e400", "1" * 4301, "1e-400", '"\\ud83d\\ude00"'])
def test_valid_numbers_and_surrogate_pairs_are_carried(payload: str) -> None:
    request = decode_request(message(payload))
    assert isinstance(request, Message) and bytes(request.payload) == payload.encode()


@pytest.mark.parametrize("payload", ['"\\ud800"', '"\\udc00x"', '["\\uDBFF"]'])
def test_unpaired_surrogates_are_refused_with_a_reason(payload: str) -> None:
    rejection = decode_request(message(payload))
    assert isinstance(rejection, FailedReply) and rejection.kind == UNCARRIABLE
    assert "surrogate" in rejection.error and rejection.subject == "c"


@pytest.mark.parametrize("frame", ["1e400", "1" * 4301, '"\\ud800"', "[1e400]"])
def test_valid_json_that_is_not_an_object(frame: str) -> None:
    assert decode_request(frame) == ErrorReply(None, "Message must be a JSON object")


def test_not_json_constants_stay_invalid_json() -> None:
    assert decode_request('{"id": NaN}') == CloseConnection(CLOSE_UNSUPPORTED_DATA, "Invalid JSON")


def test_a_missing_field_is_named_even_beside_a_huge_number() -> None:
    rejection = decode_request('{"type":"message","id":4,"payload":1e400}')
    assert isinstance(rejection, FailedReply) and "channelId" in rejection.error


def test_a_huge_number_as_the_subject_is_not_echoed() -> None:
    # Found by the fuzz test: the number came back as a str subclass msgspec cannot encode.
    rejection = decode_request('{"type":"close","id":0,"channelId":1e400}')
    assert isinstance(rejection, FailedReply) and type(rejection.subject) is str
    assert rejection.subject == ""


def test_too_deep_and_not_json_closes_as_invalid_json() -> None:
    assert decode_request(message("[" * 70 + "x" + "]" * 70)) == CloseConnection(
        CLOSE_UNSUPPORTED_DATA, "Invalid JSON"
    )


def test_an_unpaired_surrogate_behind_an_escaped_backslash_is_refused_too() -> None:
    # JSON "\\ud800\udc00": the text \ud800 (an escaped backslash, then "ud800"), then a lone
    # low surrogate; msgspec refuses it, the standard library reads it.
    rejection = decode_request('{"type":"register","id":1,"role":"\\\\ud800\\udc00"}')
    assert isinstance(rejection, FailedReply) and rejection.kind == UNCARRIABLE
    assert rejection.request_type == "register" and rejection.reply_to == 1
    assert "surrogate" in rejection.error


@pytest.mark.parametrize(
    "role",
    [
        "\\ud800\\\\udc00",  # a lone high surrogate, then the text \udc00
        "\\ud800\\n",  # a high surrogate, then another escape
        "x\\\\\\udc00",  # the text \ (an escaped backslash), then a lone low surrogate
    ],
)
def test_a_surrogate_is_paired_only_with_the_escape_right_after_it(role: str) -> None:
    rejection = decode_request('{"type":"register","id":1,"role":"' + role + '"}')
    assert isinstance(rejection, FailedReply) and "surrogate" in rejection.error

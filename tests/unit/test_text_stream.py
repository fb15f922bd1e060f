"""IncrementalDetokenizer, StopMatcher and TextStream: examples and properties."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.worker.engines.text_stream import IncrementalDetokenizer, StopMatcher, TextStream

pytestmark = pytest.mark.unit


def _byte_pieces(data: bytes) -> tuple[list[int], dict[int, bytes]]:
    """One token per byte (byte-fallback style): ids 0..255 are the bytes themselves."""
    return list(data), {b: bytes([b]) for b in range(256)}


def _reference_cut(text: str, stops: list[str]) -> tuple[str, str | None]:
    """The text before the first stop to COMPLETE (longest on a tie), by brute force."""
    stops = [s for s in stops if s]
    for end in range(1, len(text) + 1):
        done = [s for s in stops if text[:end].endswith(s)]
        if done:
            stop = max(done, key=len)
            return text[: end - len(stop)], stop
    return text, None


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


# --- IncrementalDetokenizer ---------------------------------------------------------------


def test_multibyte_character_split_across_byte_tokens_arrives_whole_once() -> None:
    ids, pieces = _byte_pieces("猫🐈".encode())
    detok = IncrementalDetokenizer(pieces.__getitem__)
    out = [detok.feed(i) for i in ids]
    # 猫 is 3 bytes, 🐈 is 4: nothing until each last byte, then the whole character.
    assert out == ["", "", "猫", "", "", "", "🐈"]
    assert detok.flush() == ""


def test_invalid_bytes_become_replacement_characters_not_exceptions() -> None:
    pieces = {0: b"\xff", 1: b"a", 2: b"\xe7\x8c"}  # a bad byte, then a truncated character
    detok = IncrementalDetokenizer(pieces.__getitem__)
    assert detok.feed(0) == "\ufffd"
    assert detok.feed(1) == "a"
    assert detok.feed(2) == ""
    assert detok.flush() == "\ufffd"


def test_leading_space_kept_after_a_prompt_and_stripped_at_sequence_start() -> None:
    pieces = {0: b"", 1: b" hello", 2: b" world"}  # 0 is an empty control piece (BOS)
    after_prompt = IncrementalDetokenizer(pieces.__getitem__)
    assert after_prompt.feed(1) + after_prompt.feed(2) == " hello world"
    at_start = IncrementalDetokenizer(pieces.__getitem__, strip_leading_space=True)
    # An empty piece does not use up the strip: the first piece with bytes does.
    assert at_start.feed(0) + at_start.feed(1) + at_start.feed(2) == "hello world"


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=40), cuts=st.lists(st.integers(0, 200), max_size=20))
def test_any_token_split_decodes_like_the_whole_bytes(text: str, cuts: list[int]) -> None:
    data = text.encode()
    chunks = _split(data, cuts)
    pieces = dict(enumerate(chunks))
    detok = IncrementalDetokenizer(pieces.__getitem__)
    out = [detok.feed(i) for i in range(len(chunks))]
    out.append(detok.flush())
    assert "".join(out) == text


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=40), cuts=st.lists(st.integers(0, 200), max_size=20))
def test_arbitrary_bytes_decode_like_one_shot_replace(data: bytes, cuts: list[int]) -> None:
    chunks = _split(data, cuts)
    pieces = dict(enumerate(chunks))
    detok = IncrementalDetokenizer(pieces.__getitem__)
    out = "".join(detok.feed(i) for i in range(len(chunks))) + detok.flush()
    assert out == data.decode("utf-8", errors="replace")


# --- StopMatcher --------------------------------------------------------------------------


def test_stop_split_across_feeds_is_caught_and_never_emitted() -> None:
    matcher = StopMatcher(["</end>"])
    assert matcher.feed("abc</") == ("abc", None)  # "</" held back
    assert matcher.feed("en") == ("", None)
    assert matcher.feed("d>tail") == ("", "</end>")
    assert matcher.matched == "</end>"
    assert matcher.flush() == ""
    assert matcher.feed("more") == ("", "</end>")


def test_false_start_is_released_when_it_stops_being_a_prefix() -> None:
    matcher = StopMatcher(["STOP"])
    assert matcher.feed("xST") == ("x", None)
    assert matcher.feed("x") == ("STx", None)
    assert matcher.feed("S") == ("", None)
    assert matcher.flush() == "S"


def test_holds_only_the_longest_suffix_that_is_a_stop_prefix() -> None:
    matcher = StopMatcher(["abab"])
    # "aba" ends with "aba" (a prefix) -> hold 3, emit nothing of the suffix.
    assert matcher.feed("zaba") == ("z", None)
    assert matcher.feed("a") == ("aba", None)  # "abaa": the longest such suffix is "a"
    assert matcher.feed("bab") == ("", "abab")


def test_the_stop_that_ends_first_wins_and_its_name_is_reported() -> None:
    # "bc" completes before "abcd" does, whatever the chunking.
    assert StopMatcher(["abcd", "bc"]).feed("xabcd") == ("xa", "bc")
    matcher = StopMatcher(["abcd", "bc"])
    assert [matcher.feed(c) for c in "xabc"] == [("x", None), ("", None), ("", None), ("a", "bc")]
    # Same end: the longer (earlier) one.
    assert StopMatcher(["c", "abc"]).feed("zabc") == ("z", "abc")


def test_no_stops_passes_text_through_and_empty_stops_are_ignored() -> None:
    matcher = StopMatcher(["", ""])
    assert matcher.stops == ()
    assert matcher.feed("anything") == ("anything", None)
    assert matcher.flush() == ""


_alphabet = st.sampled_from(list("ab猫🐈 \n"))
_text = st.text(alphabet=_alphabet, max_size=30)
_stop = st.text(alphabet=_alphabet, min_size=1, max_size=4)


@settings(max_examples=300, deadline=None)
@given(text=_text, stops=st.lists(_stop, max_size=3), cuts=st.lists(st.integers(0, 200)))
def test_streamed_stop_matching_equals_the_reference_cut(
    text: str, stops: list[str], cuts: list[int]
) -> None:
    points = sorted({c % (len(text) + 1) for c in cuts} | {0, len(text)})
    matcher = StopMatcher(stops)
    emitted: list[str] = []
    matched: str | None = None
    for a, b in itertools.pairwise(points):
        chunk, matched = matcher.feed(text[a:b])
        emitted.append(chunk)
        if matched is not None:
            break
    if matched is None:
        emitted.append(matcher.flush())
    expected_text, expected_stop = _reference_cut(text, stops)
    assert "".join(emitted) == expected_text
    assert matched == expected_stop
    assert not any(stop in chunk for chunk in emitted for stop in stops)


# --- TextStream: tokens (bytes split anywhere) through both stages -----------------------


@settings(max_examples=300, deadline=None)
@given(
    text=_text,
    stops=st.lists(_stop, max_size=3),
    cuts=st.lists(st.integers(0, 400), max_size=30),
)
def test_token_stream_emits_the_decoded_text_cut_at_the_first_stop(
    text: str, stops: list[str], cuts: list[int]
) -> None:
    data = text.encode()
    chunks = _split(data, cuts)
    pieces = dict(enumerate(chunks))
    stream = TextStream(pieces.__getitem__, stops)
    emitted: list[str] = []
    matched: str | None = None
    for token_id in range(len(chunks)):
        chunk, matched = stream.feed(token_id)
        emitted.append(chunk)
        if matched is not None:
            break
    if matched is None:
        chunk, matched = stream.flush()
        emitted.append(chunk)
    expected_text, expected_stop = _reference_cut(text, stops)
    assert "".join(emitted) == expected_text
    assert matched == expected_stop
    assert stream.matched == expected_stop
    for chunk in emitted:
        assert not any(stop in chunk for stop in stops)
        assert "\ufffd" not in chunk  # valid UTF-8 split anywhere never yields a replacement


def test_stop_completed_by_the_flushed_partial_character_still_matches() -> None:
    # The replacement character of a truncated sequence can itself complete a stop.
    pieces = {0: b"x", 1: b"\xe7"}
    stream = TextStream(pieces.__getitem__, ["x\ufffd"])
    assert stream.feed(0) == ("", None)
    assert stream.feed(1) == ("", None)
    assert stream.flush() == ("", "x\ufffd")

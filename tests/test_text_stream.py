from __future__ import annotations

from transformers import PreTrainedTokenizerFast

from server.engine.text_stream import TextStream
from testkit.tiny_models import build_tokenizer

TOKENIZER: PreTrainedTokenizerFast = build_tokenizer()


def stream_all(text: str, stop: tuple[str, ...] = ()) -> tuple[list[str], TextStream]:
    stream = TextStream(TOKENIZER, stop)
    pieces = []
    for token in TOKENIZER(text)["input_ids"]:
        pieces.append(stream.push(token))
        if stream.stopped:
            break
    pieces.append(stream.finish())
    return pieces, stream


def test_pieces_join_to_the_decoded_text_including_multibyte_characters() -> None:
    text = "The captain says ahoy — ça va? 🏴‍☠️ yes"
    pieces, _ = stream_all(text)
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)


def test_stop_string_cuts_the_text_and_is_never_released() -> None:
    pieces, stream = stream_all("hello friend, the storm comes at night", stop=("storm",))
    assert stream.stopped
    assert "".join(pieces) == "hello friend, the "


def test_a_partial_stop_match_is_held_back_then_released() -> None:
    stream = TextStream(TOKENIZER, stop=("rainbow",))
    released = "".join(stream.push(t) for t in TOKENIZER("the rain falls")["input_ids"])
    released += stream.finish()
    assert released == "the rain falls"
    assert not stream.stopped


def test_earliest_of_several_stop_strings_wins() -> None:
    pieces, _ = stream_all("north south east west", stop=("west", "south"))
    assert "".join(pieces) == "north "

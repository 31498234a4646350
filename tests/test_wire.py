"""Identity on the wire: a report procorch cannot match is a fault it reports, never a guess.

Every frame a worker writes names its step and attempt. These steps tamper
with their worker's own channel (as a step that writes to, or closes, file
descriptors it does not own would); the step at fault fails saying so, and
every other step, on that lane or another, keeps its own outcome.
"""

from __future__ import annotations

import pytest
from helpers import WireTamperingExecutor, spec

from procorch import Event, StepFinished, StepStarted, execute_steps_parallel

pytestmark = pytest.mark.usefixtures("no_leaked_processes", "bounded_time")

TAMPERING = ["garbage", "forged_done", "forged_start", "forged_next", "close_channel"]


@pytest.mark.parametrize("agent", TAMPERING)
def test_tampered_channel_fails_only_the_tampering_step(agent: str) -> None:
    """The step that spoiled its channel fails in words; the steps around it succeed."""
    specs = [spec(f"t{i}", agent if i == 5 else "ok") for i in range(12)]
    events: list[Event] = []
    out = execute_steps_parallel(WireTamperingExecutor(), specs, events=events.append)
    for index, outcome in enumerate(out):
        assert outcome.task_id == f"t{index}"
        if index == 5:
            assert not outcome.success
            assert outcome.error is not None and outcome.error.kind == "internal"
            assert "could not follow its worker's report" in outcome.output
            assert "step 't5' (agent" in outcome.output
        else:
            assert outcome.success, outcome.output
            assert outcome.output == f"ran: prompt-t{index}"
    finished = [e for e in events if isinstance(e, StepFinished)]
    assert sorted(e.index for e in finished) == list(range(12))


def test_tampering_steps_among_many_never_shift_an_outcome() -> None:
    """Hundreds of quick steps with tampering ones among them: every outcome is its own step's."""
    agents = [TAMPERING[(i // 20) % len(TAMPERING)] if i % 20 == 7 else "ok" for i in range(400)]
    specs = [spec(f"t{i}", agent) for i, agent in enumerate(agents)]
    events: list[Event] = []
    out = execute_steps_parallel(WireTamperingExecutor(), specs, events=events.append)
    for index, (agent, outcome) in enumerate(zip(agents, out, strict=True)):
        assert outcome.task_id == f"t{index}"
        if agent == "ok":
            assert outcome.success and outcome.output == f"ran: prompt-t{index}", outcome
        else:
            assert outcome.error is not None and outcome.error.kind == "internal", outcome
    starts: dict[int, int] = {}
    for event in events:
        if isinstance(event, StepStarted):
            starts[event.index] = starts.get(event.index, 0) + 1
    assert all(count == 1 for count in starts.values())  # no innocent ran twice


def test_a_large_result_written_around_its_frame_is_the_frame_msgspec_encodes() -> None:
    """done_parts writes a large bytes result beside its frame: the same bytes, joined."""
    from procorch import StepOutcome
    from procorch._protocol import LARGE_FRAME, frame_parts
    from procorch._worker import done_frame, done_parts

    step_spec = spec("s1")
    for structured in (b"r" * (LARGE_FRAME + 1), b"small", {"k": b"r" * (LARGE_FRAME + 1)}):
        outcome = StepOutcome("s1", "s", "ok", "out", True, structured)
        parts = done_parts(step_spec, 3, 1, outcome, 0.5)
        assert b"".join(parts) == b"".join(frame_parts(done_frame(step_spec, 3, 1, outcome, 0.5)))
        if isinstance(structured, bytes) and len(structured) > LARGE_FRAME:
            assert any(part is structured for part in parts)  # never copied into the frame


def test_a_pickled_result_in_pieces_is_written_as_its_joined_bytes() -> None:
    """ResultPieces (a ProcessPool result on a lane) give the frame of the pickle, unjoined."""
    import cloudpickle

    from procorch import StepOutcome
    from procorch._protocol import frame_parts
    from procorch._worker import ResultPieces, done_frame, done_parts

    step_spec = spec("s1")
    big = b"q" * 300_000
    pieces = [b"head", big, b"tail"]
    outcome = StepOutcome("s1", "s", "ok", "", True, ResultPieces(pieces, 300_008))
    joined = StepOutcome("s1", "s", "ok", "", True, b"head" + big + b"tail")
    parts = done_parts(step_spec, 3, 1, outcome, 0.5)
    assert b"".join(parts) == b"".join(frame_parts(done_frame(step_spec, 3, 1, joined, 0.5)))
    assert any(part is big for part in parts)
    small = StepOutcome("s1", "s", "ok", "", True, ResultPieces([b"a", b"b"], 2))
    parts = done_parts(step_spec, 3, 1, small, 0.5)
    expected = StepOutcome("s1", "s", "ok", "", True, b"ab")
    assert b"".join(parts) == b"".join(frame_parts(done_frame(step_spec, 3, 1, expected, 0.5)))
    result = [big, {"n": 1}]
    from procorch._payload import _PieceSink

    sink = _PieceSink()
    cloudpickle.CloudPickler(sink, protocol=5).dump(result)
    assert any(piece is big for piece in sink.pieces)  # the result's bytes, not a copy
    assert cloudpickle.loads(b"".join(sink.pieces)) == result


def test_a_large_result_is_read_as_a_view_only_when_asked() -> None:
    """decode_large_done: a bytes result is a memoryview into the frame; anything else, None."""
    from procorch import StepOutcome
    from procorch._protocol import Done, decode_large_done, encode

    blob = b"v" * 200_000
    frame = bytearray(encode(Done(4, 2, StepOutcome("t", "s", "a", "o", True, blob), 0.1)))
    done = decode_large_done(frame)
    assert done is not None and (done.step, done.attempt) == (4, 2)
    view = done.outcome.structured
    assert isinstance(view, memoryview) and view == blob and view.obj is not None
    other = bytearray(encode(Done(4, 2, StepOutcome("t", "s", "a", "o", True, ["x"] * 9), 0.1)))
    assert decode_large_done(other) is None

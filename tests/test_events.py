"""Events: order within a step, nothing lost, nothing after StepFinished."""

from __future__ import annotations

import queue

import msgspec
from helpers import ChattyExecutor, FaultyExecutor, spec

from procorch import (
    Event,
    StepFinished,
    StepProgress,
    StepStarted,
    execute_steps_parallel,
)


def _by_step(events: list[Event]) -> dict[str, list[Event]]:
    steps: dict[str, list[Event]] = {}
    for event in events:
        steps.setdefault(event.task_id, []).append(event)
    return steps


def test_every_progress_event_arrives_in_order_before_finished() -> None:
    """2,000 events per step arrive complete, in emit order, between started and finished."""
    seen: list[Event] = []
    specs = [spec(str(i)) for i in range(4)]
    out = execute_steps_parallel(ChattyExecutor(2000), specs, events=seen.append)
    assert all(o.success for o in out)
    for index, (_task_id, events) in enumerate(sorted(_by_step(seen).items())):
        assert isinstance(events[0], StepStarted)
        assert isinstance(events[-1], StepFinished) and events[-1].success
        progress = events[1:-1]
        assert all(isinstance(e, StepProgress) for e in progress)
        assert [e.data for e in progress] == list(range(2000))  # type: ignore[union-attr]
        assert {e.index for e in events} == {index}
        assert {e.attempt for e in events} == {1}


def test_events_can_go_to_a_queue() -> None:
    """A queue.Queue receives the same events a callback would."""
    inbox: queue.Queue[Event] = queue.Queue()
    execute_steps_parallel(ChattyExecutor(3), [spec("a")], events=inbox)
    names = [type(inbox.get_nowait()).__name__ for _ in range(inbox.qsize())]
    assert names == ["StepStarted", "StepProgress", "StepProgress", "StepProgress", "StepFinished"]


def test_started_event_names_attempt_and_worker_pid() -> None:
    """StepStarted carries attempt 1, the agent, and the pid of the worker that ran it."""
    seen: list[Event] = []
    out = execute_steps_parallel(FaultyExecutor(hint=1), [spec("a")], events=seen.append)
    started = seen[0]
    assert isinstance(started, StepStarted)
    assert (started.task_id, started.index, started.attempt, started.agent) == ("a", 0, 1, "ok")
    assert started.pid > 0 and out[0].success


def test_events_are_json_encodable_with_their_kind() -> None:
    """Each event encodes to JSON tagged with its kind and decodes back as an Event."""
    seen: list[Event] = []
    execute_steps_parallel(ChattyExecutor(1), [spec("a")], events=seen.append)
    encoded = [msgspec.json.encode(e) for e in seen]
    assert [msgspec.json.decode(e)["event"] for e in encoded] == ["started", "progress", "finished"]
    assert [msgspec.json.decode(e, type=Event) for e in encoded] == seen


def test_unencodable_event_data_fails_the_step_with_a_clear_error() -> None:
    """Emitting a value msgspec cannot encode is the step's error, named as such."""
    seen: list[Event] = []
    out = execute_steps_parallel(
        ChattyExecutor(2), [spec("a", "unencodable"), spec("b")], events=seen.append
    )
    assert not out[0].success and out[0].error is not None
    assert out[0].error.kind == "exception"
    assert "event data must be encodable by msgspec" in out[0].output
    assert out[1].success
    finished = [e for e in seen if isinstance(e, StepFinished)]
    assert {(e.task_id, e.success) for e in finished} == {("a", False), ("b", True)}


def test_a_failing_callback_stops_the_call_and_the_engine_recovers() -> None:
    """An exception raised by the caller's callback reaches the caller; the next call works."""

    class Stop(Exception):
        pass

    def explode(event: Event) -> None:
        if isinstance(event, StepProgress):
            raise Stop

    try:
        execute_steps_parallel(ChattyExecutor(5), [spec(str(i)) for i in range(4)], events=explode)
    except Stop:
        pass
    else:
        raise AssertionError("the callback's exception was swallowed")
    out = execute_steps_parallel(ChattyExecutor(5), [spec(str(i)) for i in range(4)])
    assert all(o.success for o in out)


def test_a_raising_callback_s_exception_carries_the_finished_outcomes() -> None:
    """The call stops, but the exception holds every outcome finished so far, and says so."""

    class Stop(Exception):
        pass

    finished: list[int] = []

    def stop_at_the_third_finish(event: Event) -> None:
        if isinstance(event, StepFinished):
            finished.append(event.index)
            if len(finished) == 3:
                raise Stop

    specs = [spec(str(i)) for i in range(6)]
    try:
        execute_steps_parallel(ChattyExecutor(1), specs, events=stop_at_the_third_finish)
    except Stop as exc:
        outcomes = exc.outcomes  # type: ignore[attr-defined]
        notes = exc.__notes__
    else:
        raise AssertionError("the callback's exception was swallowed")
    assert set(finished) <= set(outcomes)
    assert all(outcomes[i].task_id == str(i) and outcomes[i].success for i in outcomes)
    assert any(".outcomes holds" in note for note in notes)

"""stream_steps_parallel: outcomes as they come, from specs as they come.

The input is read lazily and at most ``max_in_flight`` steps are in the
engine or waiting to be yielded at any time, so a generator of a million
specs runs in constant memory in the parent: the dispatcher forgets each step
once its outcome is handed over.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator
from typing import Any, Unpack

from ._call import EventTarget, Guards, check_spec, prepare_call
from ._executor import Executor
from ._model import AgentStepSpec, StepOutcome

__all__ = ["stream_steps_parallel"]

# Steps taken from the input per lane and not yet yielded, by default. Quick
# steps travel in chunks of up to a few hundred (see the dispatcher), so a
# window much smaller than that starves the chunks: 4 per lane made 200,000
# no-op steps 17 times slower (47 s) than 256 per lane (2.7 s), which holds a few hundred KB.
_DEFAULT_WINDOW_PER_LANE = 256

_END: Any = object()  # the input ran out (None is a bad item, not the end)


def stream_steps_parallel(
    executor: Executor,
    specs: Iterable[AgentStepSpec],
    events: EventTarget | None = None,
    *,
    ordered: bool = False,
    max_in_flight: int | None = None,
    **guards: Unpack[Guards],
) -> Iterator[tuple[int, StepOutcome]]:
    """Yield ``(index, outcome)`` for every spec, as each step finishes.

    With ``ordered=True`` the outcomes come in input order instead (a step
    that finishes early waits, within the ``max_in_flight`` window, for those
    before it). ``specs`` may be any iterable, read only as room frees up;
    ``max_in_flight`` (default: 256 per unit of concurrency hint) bounds the
    steps taken from it and not yet yielded.

    Breaking out of the loop (or closing the generator) stops the work that
    is left: running steps are killed, the rest never start. A spec that is
    not valid raises InvalidSpecError when it is reached; repeated task_ids
    are not checked, since that would need memory growing with the input.
    """
    call = prepare_call(executor, events, guards)
    window = _DEFAULT_WINDOW_PER_LANE * call.limit if max_in_flight is None else max_in_flight
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"max_in_flight must be an int >= 1 (got {max_in_flight!r})")
    return _stream(call, iter(specs), ordered, window)


def _stream(
    call: Any, source: Iterator[AgentStepSpec], ordered: bool, window: int
) -> Iterator[tuple[int, StepOutcome]]:
    finished: collections.deque[tuple[int, StepOutcome]] = collections.deque()
    waiting: dict[int, StepOutcome] = {}  # ordered mode: finished, not yet yielded
    dispatch = call.dispatch(
        on_outcome=lambda index, outcome: finished.append((index, outcome)),
        keep_outcomes=False,
    )
    next_to_yield = 0
    exhausted = False
    opened = False
    try:
        while True:
            while not exhausted and not dispatch.stopping:
                if dispatch.remaining + len(finished) + len(waiting) >= window:
                    break
                spec = next(source, _END)
                if spec is _END:
                    exhausted = True
                    break
                dispatch.add(spec, check_spec(dispatch.next_index, spec))
            if not opened and dispatch.remaining:
                dispatch.open(min(call.limit, window))
                opened = True
            while finished:
                index, outcome = finished.popleft()
                if not ordered:
                    yield index, outcome
                    continue
                waiting[index] = outcome
                while next_to_yield in waiting:
                    yield next_to_yield, waiting.pop(next_to_yield)
                    next_to_yield += 1
            if dispatch.remaining:
                dispatch.turn()
            elif exhausted or dispatch.stopping:
                return
    except GeneratorExit:  # the caller stopped early: its running steps end in words
        if opened:
            dispatch.abandon()
        raise
    finally:
        if opened:
            dispatch.close()

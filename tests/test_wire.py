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

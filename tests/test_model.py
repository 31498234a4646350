"""The data model: the seed's JSON, builders, and the optional error field."""

from __future__ import annotations

import pickle

import msgspec
import pytest

from procorch import AgentStepSpec, InvalidSpecError, StepError, StepOutcome

SCHEMA = {"type": "object", "properties": {"v": {"type": "string"}}, "required": ["v"]}


def test_spec_round_trips_with_every_optional_field() -> None:
    """A spec with all three optional fields survives JSON encode and decode."""
    spec = (
        AgentStepSpec("t1", "explore", "d", "p")
        .with_max_steps(3)
        .with_parent_session_id("parent")
        .with_output_schema(SCHEMA)
    )
    back = msgspec.json.decode(msgspec.json.encode(spec), type=AgentStepSpec)
    assert back == spec
    assert back.output_schema == SCHEMA


def test_spec_builders_return_a_new_spec() -> None:
    """Builders leave the original spec untouched."""
    spec = AgentStepSpec("t", "a", "d", "p")
    assert spec.with_max_steps(5).max_steps == 5
    assert spec.max_steps is None


def test_spec_encodes_to_the_seed_json() -> None:
    """Field names and order match the seed; unset optional fields are left out."""
    spec = AgentStepSpec("t", "a", "d", "p")
    assert (
        msgspec.json.encode(spec) == b'{"task_id":"t","agent":"a","description":"d","prompt":"p"}'
    )
    full = spec.with_max_steps(2).with_parent_session_id("s").with_output_schema({})
    assert msgspec.json.encode(full) == (
        b'{"task_id":"t","agent":"a","description":"d","prompt":"p",'
        b'"max_steps":2,"parent_session_id":"s","output_schema":{}}'
    )


def test_outcome_round_trips_with_structured_value() -> None:
    """An outcome with a structured value survives JSON encode and decode."""
    outcome = StepOutcome("t1", "task-run-t1", "explore", "ok", True, structured={"v": "x"})
    assert msgspec.json.decode(msgspec.json.encode(outcome), type=StepOutcome) == outcome


def test_old_payloads_without_optional_fields_decode() -> None:
    """The seed's older payloads still decode, with the optional fields unset."""
    old_spec = msgspec.json.decode(
        b'{"task_id":"t","agent":"a","description":"d","prompt":"p"}', type=AgentStepSpec
    )
    assert old_spec.output_schema is None
    assert old_spec.max_steps is None
    old_outcome = msgspec.json.decode(
        b'{"task_id":"t","session_id":"s","agent":"a","output":"o","success":true}',
        type=StepOutcome,
    )
    assert old_outcome.structured is None
    assert old_outcome.error is None


def test_seed_shaped_outcome_encodes_to_the_seed_json() -> None:
    """An outcome without procorch's error field encodes exactly as the seed does."""
    outcome = StepOutcome("t", "s", "a", "o", True)
    assert msgspec.json.encode(outcome) == (
        b'{"task_id":"t","session_id":"s","agent":"a","output":"o","success":true}'
    )


def test_failed_outcome_uses_the_task_run_session() -> None:
    """StepOutcome.failed labels the session task-run-{task_id}."""
    outcome = StepOutcome.failed("t9", "review", "went wrong")
    assert outcome.session_id == "task-run-t9"
    assert (outcome.task_id, outcome.agent, outcome.output) == ("t9", "review", "went wrong")
    assert outcome.success is False


def test_failed_outcome_with_error_survives_json_and_pickle() -> None:
    """The error field round-trips through JSON and pickle alike."""
    error = StepError(kind="crash", message="m", exit_code=-11, signal="SIGSEGV", pid=42)
    outcome = StepOutcome.failed("t", "a", "m", error)
    assert msgspec.json.decode(msgspec.json.encode(outcome), type=StepOutcome) == outcome
    assert pickle.loads(pickle.dumps(outcome)) == outcome


def test_spec_fields_are_validated_on_decode() -> None:
    """A wrong type names the field at fault."""
    with pytest.raises(msgspec.ValidationError, match=r"\$\.max_steps"):
        msgspec.json.decode(
            b'{"task_id":"t","agent":"a","description":"d","prompt":"p","max_steps":-1}',
            type=AgentStepSpec,
        )


def test_invalid_spec_error_survives_pickle() -> None:
    """InvalidSpecError keeps its facts through a pickle round trip."""
    error = pickle.loads(pickle.dumps(InvalidSpecError(3, "bad")))
    assert (error.index, error.reason, str(error)) == (3, "bad", "specs[3]: bad")

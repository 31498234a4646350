"""Structured output: a spec's output_schema is enforced on its outcome."""

from __future__ import annotations

import json

import msgspec
import pytest
from helpers import StructuredExecutor

from procorch import AgentStepSpec, InvalidSpecError, execute_steps_parallel, output_schema_for

SCHEMA = {
    "type": "object",
    "properties": {"v": {"type": "string"}, "n": {"type": "integer", "minimum": 0}},
    "required": ["v"],
}


def _spec(task_id: str, value: object, schema: dict = SCHEMA) -> AgentStepSpec:
    prompt = "" if value is None else json.dumps(value)
    return AgentStepSpec(task_id, "a", "d", prompt).with_output_schema(schema)


def test_conforming_structured_output_succeeds() -> None:
    """A value that matches the schema keeps the outcome successful."""
    [out] = execute_steps_parallel(StructuredExecutor(), [_spec("t", {"v": "x", "n": 2})])
    assert out.success and out.structured == {"v": "x", "n": 2}


def test_non_conforming_output_fails_naming_the_violation() -> None:
    """A value breaking the schema fails the step and says what and where."""
    out = execute_steps_parallel(
        StructuredExecutor(), [_spec("bad", {"v": "x", "n": -1}), _spec("ok", {"v": "y"})]
    )
    assert not out[0].success and out[0].error is not None
    assert out[0].error.kind == "invalid_result"
    assert "does not match its output_schema: -1 is less than the minimum of 0 at $.n" in (
        out[0].output
    )
    assert out[1].success


def test_missing_structured_output_fails() -> None:
    """A schema with no structured value at all is a failure."""
    [out] = execute_steps_parallel(StructuredExecutor(), [_spec("none", None)])
    assert not out.success and "it has no structured output" in out.output


def test_invalid_schema_is_refused_before_any_work() -> None:
    """A schema that is not valid JSON Schema is named before any step starts."""
    bad = _spec("t", {"v": "x"}, schema={"type": "no-such-type"})
    with pytest.raises(InvalidSpecError, match=r"specs\[0\]: output_schema is not a valid JSON"):
        execute_steps_parallel(StructuredExecutor(), [bad])


class Answer(msgspec.Struct):
    """An output type whose schema msgspec writes."""

    title: str
    score: float


def test_schema_from_a_msgspec_type() -> None:
    """output_schema_for(Struct) yields a schema that accepts and rejects as the type does."""
    schema = output_schema_for(Answer)
    out = execute_steps_parallel(
        StructuredExecutor(),
        [
            _spec("good", {"title": "t", "score": 0.5}, schema),
            _spec("bad", {"title": "t", "score": "high"}, schema),
        ],
    )
    assert out[0].success
    assert not out[1].success and "'high' is not of type 'number'" in out[1].output

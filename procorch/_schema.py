"""Structured output: checking ``structured`` against a spec's ``output_schema``.

Schemas are JSON Schema, draft 2020-12, checked by the ``jsonschema`` package.
A schema is checked in the parent before any step starts; a step's output is
checked in its worker, so the cost is spread over the workers. Compiled
validators are cached per schema, so a batch of specs sharing a schema pays
for compiling it once per worker.
"""

from __future__ import annotations

import functools
from typing import Any

import msgspec

__all__ = ["output_schema_for"]

# jsonschema is imported on first use: most calls carry no schema, and it
# adds tens of milliseconds to ``import procorch`` (workers have it preloaded).


def output_schema_for(output_type: Any) -> dict[str, Any]:
    """A JSON Schema for ``output_type`` (a msgspec Struct, dataclass, TypedDict...).

    Put it in a spec's ``output_schema`` to require that step's ``structured``
    output to have that shape: ``spec.with_output_schema(output_schema_for(Answer))``.
    """
    return msgspec.json.schema(output_type)


def check_output_schema(schema: dict[str, Any]) -> str | None:
    """None if ``schema`` is a valid draft 2020-12 schema, else what is wrong with it."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        return f"{exc.message} at {_path(exc.absolute_path)}"
    return None


def structured_violation(schema: dict[str, Any], value: Any) -> str | None:
    """None if ``value`` conforms to ``schema``, else its first violation and where."""
    from jsonschema.exceptions import best_match

    validator = _validator(msgspec.json.encode(schema, order="sorted"))
    error = best_match(validator.iter_errors(value))
    if error is None:
        return None
    return f"{error.message} at {_path(error.absolute_path)}"


@functools.lru_cache(maxsize=64)
def _validator(schema_json: bytes) -> Any:
    from jsonschema import Draft202012Validator

    return Draft202012Validator(msgspec.json.decode(schema_json))


def _path(parts: Any) -> str:
    text = "$"
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text

"""procorch: run untrusted steps in worker processes and survive whatever they do.

``import procorch`` loads only the data model (specs, outcomes, events,
errors, guards). Every door is loaded on first use (``procorch.map``,
``from procorch import execute_steps_parallel``), so a program pays for the
worker pool, asyncio, SQLite, Dask or JSON Schema only when it uses them.
"""

import sys
from typing import TYPE_CHECKING, Any

from ._errors import (
    ExecutorError,
    InvalidSpecError,
    JournalError,
    JournalSchemaError,
    StepTimeout,
    WorkflowLockedError,
)
from ._events import (
    Event,
    EventSink,
    StepCrashed,
    StepFinished,
    StepProgress,
    StepRerun,
    StepStarted,
)
from ._executor import DEFAULT_MAX_PARALLEL_TASKS, AgentExecutor, Executor
from ._guards import CancelToken, RetryPolicy
from ._model import AgentStepSpec, ErrorKind, StepError, StepOutcome
from ._usage import StepUsage

if TYPE_CHECKING:
    from ._aio import (
        EventStream,
        execute_loop_async,
        execute_pipeline_async,
        execute_steps_parallel_async,
    )
    from ._combinators import Stage, execute_loop, execute_pipeline
    from ._dask import DaskBackend, cluster_threads
    from ._futures import BrokenPoolError, CallTimeoutError, ProcessPool, StepFailedError
    from ._journal import JournalStore, SqliteStore, WorkflowJournal
    from ._map import MapResult
    from ._map import imap as imap  # public, but kept out of __all__ (see below)
    from ._map import map as map  # public as procorch.map, never a bare import
    from ._parallel import execute_steps_parallel
    from ._progress import Progress, progress
    from ._report import ReportSink, write_report
    from ._resumable import execute_steps_parallel_resumable
    from ._sandbox import Sandbox
    from ._schema import output_schema_for
    from ._stream import stream_steps_parallel

# Where each name loaded on first use lives (see __getattr__).
_LAZY = {
    "EventStream": "_aio",
    "execute_loop_async": "_aio",
    "execute_pipeline_async": "_aio",
    "execute_steps_parallel_async": "_aio",
    "Stage": "_combinators",
    "execute_loop": "_combinators",
    "execute_pipeline": "_combinators",
    "DaskBackend": "_dask",
    "cluster_threads": "_dask",
    "BrokenPoolError": "_futures",
    "CallTimeoutError": "_futures",
    "ProcessPool": "_futures",
    "StepFailedError": "_futures",
    "JournalStore": "_journal",
    "SqliteStore": "_journal",
    "WorkflowJournal": "_journal",
    "MapResult": "_map",
    "imap": "_map",
    "map": "_map",
    "execute_steps_parallel": "_parallel",
    "Progress": "_progress",
    "progress": "_progress",
    "ReportSink": "_report",
    "write_report": "_report",
    "execute_steps_parallel_resumable": "_resumable",
    "Sandbox": "_sandbox",
    "output_schema_for": "_schema",
    "stream_steps_parallel": "_stream",
}


def shutdown() -> None:
    """Stop every idle worker process that procorch keeps warm between calls.

    The next call starts fresh workers. procorch also does this on interpreter
    exit; call it yourself to free the processes sooner. Where no call ran,
    there is nothing to stop, and the pool is not even loaded.
    """
    pool = sys.modules.get(f"{__name__}._pool")
    if pool is not None:
        pool.shutdown()


def __getattr__(name: str) -> Any:
    """Load a door on first use, then keep it as an ordinary attribute."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'procorch' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


# map and imap are public (procorch.map, procorch.imap) but stay out of __all__,
# so that "from procorch import *" does not hide the builtin map.
__all__ = [
    "DEFAULT_MAX_PARALLEL_TASKS",
    "AgentExecutor",
    "AgentStepSpec",
    "BrokenPoolError",
    "CallTimeoutError",
    "CancelToken",
    "DaskBackend",
    "ErrorKind",
    "Event",
    "EventSink",
    "EventStream",
    "Executor",
    "ExecutorError",
    "InvalidSpecError",
    "JournalError",
    "JournalSchemaError",
    "JournalStore",
    "MapResult",
    "ProcessPool",
    "Progress",
    "ReportSink",
    "RetryPolicy",
    "Sandbox",
    "SqliteStore",
    "Stage",
    "StepCrashed",
    "StepError",
    "StepFailedError",
    "StepFinished",
    "StepOutcome",
    "StepProgress",
    "StepRerun",
    "StepStarted",
    "StepTimeout",
    "StepUsage",
    "WorkflowJournal",
    "WorkflowLockedError",
    "cluster_threads",
    "execute_loop",
    "execute_loop_async",
    "execute_pipeline",
    "execute_pipeline_async",
    "execute_steps_parallel",
    "execute_steps_parallel_async",
    "execute_steps_parallel_resumable",
    "output_schema_for",
    "progress",
    "shutdown",
    "stream_steps_parallel",
    "write_report",
]

__version__ = "0.1.0"

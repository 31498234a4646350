"""procorch: run untrusted steps in worker processes and survive whatever they do."""

from ._aio import (
    EventStream,
    execute_loop_async,
    execute_pipeline_async,
    execute_steps_parallel_async,
)
from ._combinators import Stage, execute_loop, execute_pipeline
from ._dask import DaskBackend, cluster_threads
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
from ._futures import BrokenPoolError, CallTimeoutError, ProcessPool, StepFailedError
from ._guards import CancelToken, RetryPolicy
from ._journal import JournalStore, SqliteStore, WorkflowJournal
from ._map import MapResult
from ._map import imap as imap  # public, but kept out of __all__ (see below)
from ._map import map as map  # public as procorch.map, never a bare import
from ._model import AgentStepSpec, ErrorKind, StepError, StepOutcome
from ._parallel import execute_steps_parallel
from ._pool import shutdown
from ._progress import Progress, progress
from ._resumable import execute_steps_parallel_resumable
from ._sandbox import Sandbox
from ._schema import output_schema_for
from ._stream import stream_steps_parallel

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
]

__version__ = "0.1.0"

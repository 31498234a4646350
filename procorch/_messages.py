"""Every sentence a failed outcome says, once.

A failure message names the step (``step 'a' (agent 'b')``), says what
happened to it, gives the evidence (signal, exit code, pid, the limit
crossed) and, where there is one, the likely cause. The lifecycle, the
backends and the worker build their messages here, so one fault reads the
same whichever backend saw it.
"""

from __future__ import annotations

import signal

from ._model import AgentStepSpec, _describe

_SIGNAL_CAUSES = {
    signal.SIGSEGV: "a segmentation fault: native code touched memory it does not own",
    signal.SIGBUS: "a bus error: native code touched memory that cannot be reached, "
    "such as a truncated memory-mapped file",
    signal.SIGFPE: "a fatal arithmetic error in native code, such as an integer division by zero",
    signal.SIGILL: "an illegal instruction in native code",
    signal.SIGABRT: "abort() was called, usually by a failed assertion or a fatal error "
    "in native code",
    signal.SIGKILL: "something outside the process killed it; the kernel's out-of-memory "
    "killer does this to a process that uses too much memory",
    signal.SIGTERM: "something outside the process asked it to terminate",
}


def signal_name(exit_code: int | None) -> str | None:
    """``SIGSEGV`` for exit code -11; None for a normal exit or an unknown code."""
    if exit_code is None or exit_code >= 0:
        return None
    try:
        return signal.Signals(-exit_code).name
    except ValueError:
        return f"signal {-exit_code}"


def safe_text(value: object) -> str:
    """``str(value)`` that never raises and always encodes as UTF-8.

    User objects reach messages (an exception's ``__str__``, a result's
    ``__repr__``); one that raises, or a string holding a lone surrogate
    (``os.fsdecode`` of a non-UTF-8 name), must not take the report with it.
    """
    try:
        text = value if isinstance(value, str) else str(value)
    except BaseException as exc:  # a user __str__ may raise anything
        try:
            text = repr(value)
        except BaseException:
            text = f"<{type(value).__name__} whose str() raised {type(exc).__name__}>"
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def crash(spec: AgentStepSpec, pid: int | None, exit_code: int | None, where: str = "") -> str:
    """The worker running the step died while running it."""
    who = f"{_describe(spec)} crashed: its worker process (pid {pid}){where}"
    if exit_code is None:
        return f"{who} died while running it, with an unknown exit code."
    if exit_code < 0:
        name = signal_name(exit_code)
        try:
            cause = _SIGNAL_CAUSES.get(signal.Signals(-exit_code))
        except ValueError:
            cause = None
        text = f"{who} was killed by {name} (exit code {exit_code})"
        return f"{text}: {cause}." if cause else f"{text}."
    return (
        f"{who} exited with code {exit_code} while running it "
        "(os._exit() or exit() from native code)."
    )


def timed_out(spec: AgentStepSpec, limit: float, stopped: str) -> str:
    """The step ran past its own time limit; ``stopped`` says what was done about it."""
    return f"{_describe(spec)} timed out: it ran for more than its {limit:g} s limit, so {stopped}."


def soft_timed_out(spec: AgentStepSpec, limit: float, after: float, outcome: object) -> str:
    """The step ended within its grace after StepTimeout was raised in it."""
    ended = "returned anyway" if getattr(outcome, "success", False) else "ended"
    return (
        f"{_describe(spec)} timed out: it ran for more than its {limit:g} s limit, so "
        f"StepTimeout was raised in it, and it {ended} {max(0.0, after):.1f} s later, within "
        "its grace."
    )


def grace_ran_out(spec: AgentStepSpec, limit: float, grace: float, stopped: str) -> str:
    return (
        f"{_describe(spec)} timed out: it ran for more than its {limit:g} s limit, StepTimeout "
        f"was raised in it, and it was still running {grace:g} s later, so {stopped}."
    )


def call_timed_out(spec: AgentStepSpec, limit: float, stopped: str) -> str:
    return (
        f"{_describe(spec)} timed out: the call's {limit:g} s limit ran out while it was "
        f"running, so {stopped}."
    )


def cancelled_while_running(spec: AgentStepSpec, stopped: str, why: str) -> str:
    """The call was cancelled (``why``: "the call was cancelled"...) while the step ran."""
    if why == "the call was cancelled":
        return f"{_describe(spec)} was cancelled while running; {stopped}."
    return f"{_describe(spec)} was stopped while running: {why}; {stopped}."


def cancelled_before_start(spec: AgentStepSpec, why: str, retrying: bool = False) -> str:
    """A step stopped by the call's end before (this attempt of) it started."""
    when = "before it could be started again" if retrying else "before it started"
    return f"{_describe(spec)} did not run: {why} {when}."


def memory(spec: AgentStepSpec, pid: int | None, used: int, limit: int) -> str:
    return (
        f"{_describe(spec)} went over its memory cap: its worker process (pid {pid}) and its "
        f"children reached {megabytes(used)}, more than the {megabytes(limit)} allowed, so they "
        "were killed."
    )


def megabytes(size: float) -> str:
    return f"{size / 2**20:.1f} MiB"


def could_not_start(
    spec: AgentStepSpec, deaths: int, pid: int | None, code: int | None, said: str
) -> str:
    """Every worker the step was sent to died (or froze) before it began.

    ``said`` is the last worker's own words; without a worker process to name
    (``pid`` None: Dask), it is the backend's sentence of evidence instead.
    """
    if pid is None:
        message = (
            f"{_describe(spec)} could not start: {deaths} workers in a row died or stopped "
            "responding before it began."
        )
        return f"{message} {said.strip()}" if said else message
    message = (
        f"{_describe(spec)} could not start: {deaths} worker processes in a row died or stopped "
        f"responding before it began (the last, pid {pid}, with "
        f"{'an unknown exit code' if code is None else f'exit code {code}'})."
    )
    if said:
        message += f" It said: {said.strip()}"
    return message


def raised(spec: AgentStepSpec, exc: BaseException) -> str:
    return f"{_describe(spec)} raised {type(exc).__name__}: {safe_text(exc)}"


def unprintable(spec: AgentStepSpec, exc: BaseException, why: BaseException) -> str:
    """The step raised an exception whose ``str()`` itself raised ``why``."""
    return (
        f"{_describe(spec)} raised {type(exc).__name__}, but this exception cannot be printed: "
        f"its __str__ raised {type(why).__name__}: {safe_text(why)}"
    )


def not_an_outcome(spec: AgentStepSpec, result: object) -> str:
    return f"{_describe(spec)} returned {type(result).__name__}, not a StepOutcome"


def structured_mismatch(spec: AgentStepSpec, problem: str) -> str:
    return (
        f"{_describe(spec)} returned structured output that does not match its "
        f"output_schema: {problem}"
    )


def malformed_outcome(spec: AgentStepSpec, exc: BaseException) -> str:
    return f"{_describe(spec)} returned a malformed StepOutcome: {safe_text(exc)}"


def unsendable_outcome(spec: AgentStepSpec, field: str | None, exc: BaseException) -> str:
    """The outcome cannot be encoded (an int beyond 64 bits, a lone surrogate...)."""
    where = f" (its {field})" if field else ""
    return (
        f"{_describe(spec)} returned an outcome that cannot be sent back{where}: "
        f"{type(exc).__name__}: {safe_text(exc)}"
    )


def unreportable(spec: AgentStepSpec, exc: BaseException) -> str:
    return (
        f"{_describe(spec)} failed while procorch reported it: {type(exc).__name__}: "
        f"{safe_text(exc)}"
    )


def cannot_resume(spec: AgentStepSpec, workflow_id: str, why: object) -> str:
    return (
        f"{_describe(spec)} did not run: workflow {workflow_id!r} cannot be resumed, because "
        f"{why}; it was left as it is, so that no completed work is repeated."
    )


def cpu_time(spec: AgentStepSpec, pid: int | None, limit: float) -> str:
    return (
        f"{_describe(spec)} went over a limit of its sandbox: it used more than the {limit:g} s "
        f"of CPU time allowed, so the kernel stopped its worker process (pid {pid}) with SIGXCPU."
    )


def sandbox_failed(spec: AgentStepSpec, exc: BaseException) -> str:
    return (
        f"{_describe(spec)} did not run: its sandbox could not be set up in the worker: "
        f"{type(exc).__name__}: {safe_text(exc)}"
    )


def sandbox_breach(spec: AgentStepSpec, words: str, exc: BaseException | None) -> str:
    """The step ran into a limit of its sandbox (``words`` says which)."""
    cause = "" if exc is None else f" ({type(exc).__name__}: {safe_text(exc)})"
    return f"{_describe(spec)} went over a limit of its sandbox: {words}{cause}."


def executor_not_rebuilt(spec: AgentStepSpec, exc: BaseException) -> str:
    said = (
        f"{_describe(spec)} did not run: its executor could not be rebuilt in the worker "
        f"process: {type(exc).__name__}: {safe_text(exc)}"
    )
    missing = getattr(exc, "name", None) if isinstance(exc, ModuleNotFoundError) else None
    if not missing:
        return said
    top = missing.partition(".")[0]
    return (
        f"{said}. The module must be importable where the step runs: install it there "
        f"(on every Dask worker, for a cluster), or send it with the executor by calling "
        f"cloudpickle.register_pickle_by_value({top}) before the call "
        "(procorch run --dask does this for a module that is not installed)"
    )


def unreadable_report(spec: AgentStepSpec, pid: int | None, detail: str) -> str:
    """The worker's report of the step broke procorch's protocol (a fault, not a guess)."""
    return (
        f"{_describe(spec)} failed: procorch could not follow its worker's report ({detail}), "
        f"so the worker process (pid {pid}) was stopped. A step that writes to, closes or "
        "replaces file descriptors it does not own can cause this; otherwise it is a bug in "
        "procorch: please report it."
    )


def lost(spec: AgentStepSpec, detail: str) -> str:
    """procorch lost track of the step: always a bug."""
    return (
        f"{_describe(spec)} was lost by procorch: {detail}. "
        "This is a bug in procorch; please report it."
    )


# -- the Dask backend ---------------------------------------------------------------
#
# Dask reports a worker's death as KilledWorker on the tasks it held, with no
# exit code or signal (the nanny's, when procorch could ask: ``_dask_nanny``);
# procorch blames a step only on its own evidence (see ``_dask``), and these
# sentences say what that evidence was, in procorch's words: never Dask's task
# keys or its count of workers.


def dask_crash(
    spec: AgentStepSpec, pid: int | None, address: str | None, code: int | None, nanny: bool
) -> str:
    """The step was running when its Dask worker died, as when it ran before.

    ``code`` is the worker's exit code as its nanny saw it (None: unknown).
    """
    text = crash(spec, pid, code, f" on the Dask worker at {address}")
    if code is None:
        why = (
            "(the worker has no nanny to tell it)"
            if not nanny
            else "(its nanny did not tell it: procorch may not be importable there)"
        )
        text = f"{text[:-1]} {why}."
    return (
        f"{text} Its previous run had been going when its worker died too, so procorch blames "
        "the step, not the workers."
    )


def dask_rerun(address: str | None, by_dask: bool) -> str:
    """Why a step seen running on a Dask worker that died runs again, uncharged."""
    if by_dask:
        return f"its Dask worker ({address}) died while running it; Dask runs it again"
    return (
        f"its Dask worker ({address}) died while running it; one death does not prove that "
        "the step caused it, so it runs again"
    )


def dask_gave_up() -> str:
    """The evidence when Dask gave up on a step that was not seen to start."""
    return (
        "Each time, the Dask worker it was waiting on died before it began, and the "
        "scheduler gave up on it."
    )


def dask_restarting(address: str | None) -> str:
    """How a step running on a Dask worker is stopped (``StopFacts.stopped``), without waiting."""
    return (
        f"procorch asked the nanny of its Dask worker ({address}) to restart that worker, "
        "the only way to stop a running Dask task"
    )


def dask_not_restarted(address: str | None) -> str:
    """A step running on a Dask worker without a nanny: nothing can stop it."""
    return (
        f"its Dask worker ({address}) has no nanny to restart it, the only way to stop a "
        "running Dask task, so procorch asked the scheduler to retire that worker (no more "
        "work goes to it) and the step may still be running there"
    )


def dask_task_failed(spec: AgentStepSpec, exc: BaseException) -> str:
    """The step's Dask task failed in procorch's code around the step, not in the step."""
    return (
        f"{_describe(spec)} failed on the Dask cluster: its task ended with "
        f"{_exception(exc)} (procorch's code on the worker, or the cluster, failed, "
        "not the step)."
    )


def dask_task_ended(exc: BaseException) -> str:
    """The evidence when a step's Dask task failed before the step was seen to start."""
    return f"Its last Dask task ended with {_exception(exc)}"


def _exception(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {safe_text(exc)}".strip()

"""The sandbox guard: each limit breached by a step that does just that, with real processes.

Every batch has an innocent step beside the one that breaks a limit: it
succeeds. Each breach is labelled with the limit's kind and named in words.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator

import pytest
from helpers import SandboxExecutor, spec

from procorch import Sandbox, StepOutcome, execute_steps_parallel

pytestmark = pytest.mark.usefixtures("no_leaked_processes", "bounded_time")


def _run(agent: str, sandbox: Sandbox, prompt: str = "p") -> tuple[StepOutcome, StepOutcome]:
    steps = [spec("culprit", agent), spec("innocent", "ok")]
    steps[0] = steps[0].__class__("culprit", agent, "d", prompt)
    culprit, innocent = execute_steps_parallel(SandboxExecutor(), steps, sandbox=sandbox)
    assert innocent.success, innocent.output
    return culprit, innocent


@pytest.mark.parametrize(
    ("agent", "sandbox", "kind", "words"),
    [
        pytest.param(
            "busy",
            Sandbox(cpu_seconds=1),
            "cpu_time",
            "more than the 1 s of CPU time",
            marks=pytest.mark.slow,
        ),
        ("open_many", Sandbox(open_files=50), "open_files", "more than the 50 files allowed"),
        ("fork_many", Sandbox(processes=5), "processes", "more than the 5 allowed"),
        ("write_big", Sandbox(file_size=2**20), "file_size", "past the 1048576 bytes"),
    ],
)
def test_limit_breached_fails_only_its_step(
    agent: str, sandbox: Sandbox, kind: str, words: str
) -> None:
    """A step past one limit fails with that limit's kind, in words; its neighbour succeeds."""
    culprit, _ = _run(agent, sandbox)
    assert not culprit.success
    assert culprit.error is not None and culprit.error.kind == kind, culprit.output
    assert words in culprit.output
    assert "step 'culprit'" in culprit.output


def test_limits_are_off_for_the_next_call() -> None:
    """The same warm workers run an unsandboxed call afterwards without the limits."""
    _run("open_many", Sandbox(open_files=50))
    out = execute_steps_parallel(SandboxExecutor(), [spec("a", "open_many"), spec("b", "ok")])
    assert all(o.success for o in out), [o.output for o in out]


@pytest.fixture
def listener() -> Iterator[tuple[int, list[bytes]]]:
    """A server on the caller's loopback that records what reaches it."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    received: list[bytes] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            with conn:
                received.append(conn.recv(100))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1], received
    finally:
        stop.set()
        thread.join(5)
        server.close()


def test_no_network_reaches_nothing_not_even_loopback(listener: tuple[int, list[bytes]]) -> None:
    """With network=False a step cannot reach a server on the caller's loopback."""
    port, received = listener
    culprit, _ = _run("connect", Sandbox(network=False), prompt=str(port))
    assert culprit.error is not None and culprit.error.kind == "network", culprit.output
    assert "reach the network" in culprit.output
    assert received == []
    # Without the sandbox the same step gets through: the test can tell the difference.
    free, _ = _run("connect", Sandbox(), prompt=str(port))
    assert free.success, free.output


def test_scratch_dir_is_private_and_gone_after_the_step() -> None:
    """Each step starts in a fresh directory, also its TMPDIR, removed when it ends."""
    out = execute_steps_parallel(
        SandboxExecutor(),
        [spec("a", "scratch"), spec("b", "scratch")],
        sandbox=Sandbox(scratch_dir=True),
    )
    assert all(o.success for o in out), [o.output for o in out]
    cwds = {o.structured["cwd"] for o in out}
    assert len(cwds) == 2  # one directory per step
    for outcome in out:
        cwd = outcome.structured["cwd"]
        assert all(path.startswith(cwd) for path in outcome.structured["files"])
        assert not os.path.exists(cwd)


def test_env_replaces_the_callers_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """With env={}, a variable of the caller is not visible; a listed one is."""
    monkeypatch.setenv("PROCORCH_SECRET", "from-the-caller")
    hidden = execute_steps_parallel(SandboxExecutor(), [spec("a", "env")], sandbox=Sandbox(env={}))
    given = execute_steps_parallel(
        SandboxExecutor(), [spec("a", "env")], sandbox=Sandbox(env={"PROCORCH_SECRET": "listed"})
    )
    plain = execute_steps_parallel(SandboxExecutor(), [spec("a", "env")])
    assert hidden[0].structured == {"secret": "<unset>"}
    assert given[0].structured == {"secret": "listed"}
    assert plain[0].structured == {"secret": "from-the-caller"}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"cpu_seconds": 0}, r"cpu_seconds must be > 0 \(got 0\)"),
        ({"open_files": 1.5}, r"open_files must be an int \(got 1.5\)"),
        ({"env": {"A=B": "x"}}, "env must map names to strings"),
    ],
)
def test_bad_sandbox_fields_are_refused(fields: dict, message: str) -> None:
    """A sandbox field out of range is named when the Sandbox is made."""
    with pytest.raises((ValueError, TypeError), match=message):
        Sandbox(**fields)


def test_sandbox_must_be_a_sandbox() -> None:
    """A sandbox of the wrong type is refused before any step starts."""
    with pytest.raises(TypeError, match=r"sandbox must be a procorch\.Sandbox"):
        execute_steps_parallel(SandboxExecutor(), [spec("a")], sandbox={"network": False})  # type: ignore[typeddict-item]

"""The run report: one self-contained HTML page drawn from a run's events.

Data flow::

    events (live, through ReportSink; or an events JSONL file) --add--> _Attempts
        one record per step attempt: start (StepStarted.at), end (start + usage.wall),
        outcome kind, usage, error's first line, the attempt it retries
    _Attempts --lanes--> rows: each worker pid keeps its row; a fresh worker
        takes the row of one that will run nothing more (the lane it replaced)
    --> tables (failures by kind, slowest, largest, totals), rendered here
    --> the attempts as columns of inline JSON, drawn by the page's own script
        (``_report_page``) on canvases: the timeline and the concurrency

Nothing but the events goes into the page (no clock, no host, no path), and
every number is formatted here, so the same events give the same bytes: a
report drawn again from the events file written by ``--events`` equals the
one written live.
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import msgspec

from ._events import Event, StepCrashed, StepFinished, StepRerun, StepStarted
from ._report_page import PAGE
from ._usage import StepUsage

__all__ = ["ReportSink", "read_events", "write_report"]

# Outcome kinds, most serious first: where several attempts share a pixel,
# the most serious one's colour shows.
KINDS: dict[str, str] = {
    "crash": "#d62728",
    "memory": "#a0207e",
    "timeout": "#7b4fc4",
    "cpu_time": "#138d9c",
    "processes": "#138d9c",
    "open_files": "#138d9c",
    "file_size": "#138d9c",
    "network": "#138d9c",
    "internal": "#8c564b",
    "serialization": "#8c564b",
    "invalid_result": "#8c564b",
    "journal": "#8c564b",
    "exception": "#f28e2b",
    "unsuccessful": "#d9b226",
    "cancelled": "#8f8f8f",
    "interrupted": "#c4c4c4",
    "unfinished": "#1f77b4",
    "ok": "#3d9140",
}
# Kinds whose attempt ended with its worker killed or dead: marked at the instant.
_KILLED = frozenset({"crash", "memory", "timeout", "cpu_time", "processes", "internal"})
_TOP = 10  # rows of the "slowest" and "largest" tables
_SAME_WORKER_SLACK = 1e-3  # s: a worker's next step may start this much before the last ended


class _Attempt:
    __slots__ = (
        "agent",
        "attempt",
        "crashed",
        "end",
        "index",
        "kind",
        "pid",
        "prev",
        "reason",
        "row",
        "start",
        "task_id",
        "usage",
    )

    def __init__(self, event: StepStarted, prev: int) -> None:
        self.index = event.index
        self.task_id = event.task_id
        self.agent = event.agent
        self.attempt = event.attempt
        self.pid = event.pid
        self.start = event.at if event.at is not None else 0.0
        self.end: float | None = None
        self.kind = "unfinished"
        self.crashed = False
        self.reason: str | None = None
        self.usage: StepUsage | None = None
        self.prev = prev  # the attempt this one retries (its number in the list), or -1
        self.row = 0

    def close(self, kind: str, reason: str | None, usage: StepUsage | None, wall: float) -> None:
        self.kind = kind
        self.reason = reason
        self.usage = usage
        self.end = self.start + (usage.wall if usage is not None else wall)


class _Attempts:
    """Every step attempt of the events fed to ``add``, in the order they started."""

    def __init__(self) -> None:
        self.attempts: list[_Attempt] = []
        self.open: dict[tuple[int, str], list[int]] = {}  # a step's attempts, until it finishes
        self.finished: list[StepFinished] = []
        self.hint = 0
        self.untimed = 0  # starts without an instant (events of an older procorch)

    def add(self, event: Event) -> None:
        key = (event.index, event.task_id)
        if isinstance(event, StepStarted):
            mine = self.open.setdefault(key, [])
            prev = mine[-1] if mine else -1
            mine.append(len(self.attempts))
            self.attempts.append(_Attempt(event, prev))
            self.untimed += event.at is None
            if event.concurrency is not None:
                self.hint = max(self.hint, event.concurrency)
            return
        attempt = self._attempt(key, event.attempt - 1 if isinstance(event, StepRerun) else None)
        if isinstance(event, StepCrashed):
            if attempt is not None:
                attempt.crashed = True
        elif isinstance(event, StepRerun):
            if attempt is not None and attempt.end is None:
                kind = event.error_kind or "interrupted"
                attempt.close(kind, event.reason, event.usage, 0.0)
        elif isinstance(event, StepFinished):
            self.finished.append(event)
            if attempt is not None and attempt.end is None and attempt.attempt == event.attempt:
                kind = event.error_kind or ("ok" if event.success else "unsuccessful")
                attempt.close(kind, event.reason, event.usage, event.duration)
            self.open.pop(key, None)

    def _attempt(self, key: tuple[int, str], number: int | None) -> _Attempt | None:
        mine = self.open.get(key)
        if not mine:
            return None
        attempt = self.attempts[mine[-1]]
        return attempt if number is None or attempt.attempt == number else None


class ReportSink:
    """An event sink that keeps what a run report needs: pass it as ``events=``.

    ::

        report = procorch.ReportSink()
        procorch.execute_steps_parallel(executor, specs, events=report)
        report.write("run.html")

    ``forward`` also hands every event on (to a callable or anything with
    ``put``), for a caller that wants the events too. One sink may collect
    several calls: they are drawn on one timeline.
    """

    def __init__(self, forward: Any = None) -> None:
        self._attempts = _Attempts()
        self._forward: Callable[[Event], Any] | None = None
        if forward is not None:
            self._forward = forward.put if hasattr(forward, "put") else forward

    def __call__(self, event: Event) -> None:
        self._attempts.add(event)
        if self._forward is not None:
            self._forward(event)

    put = __call__

    def write(self, path: str | os.PathLike[str], title: str = "procorch run") -> None:
        """Write the report of the events so far to ``path``."""
        _write(path, render(self._attempts, title))


def read_events(path: str | os.PathLike[str]) -> list[Event]:
    """The events of a JSONL file written by ``--events`` (or ``EventLog``).

    A line that is not an event is a ``ValueError`` naming the file and line.
    A last line cut short (a run killed mid-write) is ignored.
    """
    decode = msgspec.json.Decoder(Event).decode
    events: list[Event] = []
    with open(path, "rb") as file:
        lines = file.read().split(b"\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            events.append(decode(line))
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            if number == len(lines) and isinstance(exc, msgspec.DecodeError):
                break  # the run was stopped while writing its last line
            raise ValueError(f"{os.fspath(path)}:{number}: not an event: {exc}") from None
    return events


def write_report(
    path: str | os.PathLike[str],
    events: Iterable[Event] | str | os.PathLike[str],
    title: str = "procorch run",
) -> None:
    """Write the run report of ``events`` (event objects, or an events JSONL file) to ``path``.

    The report is one HTML file that needs nothing else (no network): a
    timeline of every step attempt by worker, the concurrency over time
    against the call's, failures by kind, the slowest steps, the largest
    memory users and the totals. The same events give the same bytes.
    """
    if isinstance(events, (str, os.PathLike)):
        events = read_events(events)
    attempts = _Attempts()
    for event in events:
        attempts.add(event)
    _write(path, render(attempts, title))


def _write(path: str | os.PathLike[str], page: bytes) -> None:
    target = Path(path)
    temporary = target.with_name(f".{target.name}.part")
    temporary.write_bytes(page)
    os.replace(temporary, target)


# -- the page --------------------------------------------------------------------------


def _lanes(attempts: list[_Attempt]) -> list[list[int]]:
    """Give each attempt a row; the pids of each row, in order.

    A worker keeps its row while it runs steps one after another; a fresh
    worker (one that replaced a dead lane) takes the first row whose worker
    runs nothing more; steps running at once in one process (a Dask worker's
    threads) take rows of their own.
    """
    last_end: dict[int, float] = {}
    for attempt in attempts:
        assert attempt.end is not None
        last_end[attempt.pid] = max(last_end.get(attempt.pid, -math.inf), attempt.end)
    row_end: list[float] = []
    row_pid: list[int] = []
    row_pids: list[list[int]] = []
    pid_row: dict[int, int] = {}
    order = sorted(range(len(attempts)), key=lambda n: (attempts[n].start, n))
    for n in order:
        attempt = attempts[n]
        assert attempt.end is not None
        start, pid = attempt.start, attempt.pid
        row = pid_row.get(pid)
        if row is None or row_end[row] > start + _SAME_WORKER_SLACK:
            row = next(
                (
                    r
                    for r in range(len(row_end))
                    if row_end[r] <= start + _SAME_WORKER_SLACK
                    and last_end[row_pid[r]] <= start + _SAME_WORKER_SLACK
                ),
                None,
            )
            if row is None:
                row = len(row_end)
                row_end.append(-math.inf)
                row_pid.append(pid)
                row_pids.append([])
        if row_pid[row] != pid or not row_pids[row]:
            row_pid[row] = pid
            if pid not in row_pids[row]:
                row_pids[row].append(pid)
        pid_row[pid] = row
        row_end[row] = max(row_end[row], attempt.end)
        attempt.row = row
    return row_pids


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:,.0f} s"
    if value >= 1:
        return f"{value:.2f} s"
    if value >= 0.001:
        return f"{value * 1e3:.1f} ms"
    return f"{value * 1e6:.0f} µs"


def _bytes(value: int | None) -> str:
    if value is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value} B"


def _first_line(text: str | None) -> str:
    if not text:
        return ""
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= 300 else line[:299] + "…"


def _cpu(usage: StepUsage | None) -> float | None:
    return None if usage is None else usage.cpu


def _peak(usage: StepUsage | None) -> int | None:
    if usage is None or usage.max_rss is None:
        return None
    return max(usage.max_rss, usage.children_max_rss or 0)


def _table(headers: list[str], rows: list[list[str]], numeric: set[int]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="num">{cell}</td>' if n in numeric else f"<td>{cell}</td>"
            for n, cell in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    if not rows:
        body = f'<tr><td colspan="{len(headers)}" class="none">none</td></tr>'
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _swatch(kind: str) -> str:
    colour = KINDS.get(kind, "#000000")
    swatch = f'<span class="sw" style="background:{colour}"></span>'
    return f'<span class="kind">{swatch}{html.escape(kind)}</span>'


def _attempt_row(a: _Attempt) -> list[str]:
    return [
        html.escape(a.task_id),
        html.escape(a.agent),
        str(a.attempt),
        _swatch(a.kind),
        _seconds(a.usage.wall if a.usage is not None else None),
        _seconds(_cpu(a.usage)),
        _bytes(_peak(a.usage)),
        str(a.pid),
    ]


_ATTEMPT_HEADERS = ["task_id", "agent", "attempt", "outcome", "wall", "CPU", "peak memory", "pid"]


def _tables(attempts: list[_Attempt], finished: list[StepFinished], hint: int) -> str:
    parts: list[str] = []
    first = min((a.start for a in attempts), default=0.0)
    last = max((a.end for a in attempts if a.end is not None), default=first)
    wall = last - first
    busy = sum(a.end - a.start for a in attempts if a.end is not None)
    # Where the call's concurrency is unknown (older events), the most seen at once.
    cpus = [_cpu(a.usage) for a in attempts]
    cpu = sum(c for c in cpus if c is not None)
    unmeasured = sum(1 for c in cpus if c is None)
    failed = [f for f in finished if not f.success]
    lanes = hint or 1
    capacity = wall * lanes

    def share(part: float) -> str:
        return "-" if capacity <= 0 else f"{100 * part / capacity:.1f} %"

    totals = [
        ["steps finished", f"{len(finished):,}"],
        ["succeeded / failed", f"{len(finished) - len(failed):,} / {len(failed):,}"],
        ["step attempts", f"{len(attempts):,}"],
        ["wall (first start to last end)", _seconds(wall)],
        ["concurrency (the call's)", str(hint) if hint else "not in the events"],
        ["busy (sum of attempts' wall)", _seconds(busy)],
        ["CPU (steps and their children)", _seconds(cpu)],
        ["attempts whose CPU is unknown (crashed, killed)", f"{unmeasured:,}"],
        ["occupancy: busy / (wall x concurrency)", share(busy)],
        ["parallel efficiency: CPU / (wall x concurrency)", share(cpu)],
    ]
    parts.append("<h2>Totals</h2>" + _table(["", "this run"], totals, {1}))

    by_kind: dict[str, list[int]] = {}
    examples: dict[str, str] = {}
    for f in failed:
        kind = f.error_kind or "unsuccessful"
        by_kind.setdefault(kind, [0, 0])[0] += 1
        examples.setdefault(kind, f"{html.escape(f.task_id)}: {html.escape(_first_line(f.reason))}")
    for a in attempts:
        if a.kind != "ok" and a.kind != "unfinished":
            by_kind.setdefault(a.kind, [0, 0])[1] += 1
    kinds = sorted(by_kind, key=lambda k: (-by_kind[k][0], -by_kind[k][1], k))
    rows = [
        [_swatch(k), f"{by_kind[k][0]:,}", f"{by_kind[k][1]:,}", examples.get(k, "")] for k in kinds
    ]
    headers = ["kind", "steps (final)", "attempts", "first failed step"]
    parts.append("<h2>Failures by kind</h2>" + _table(headers, rows, {1, 2}))

    def ranked(value: Callable[[_Attempt], float | None]) -> list[_Attempt]:
        known = [(value(a), n) for n, a in enumerate(attempts) if value(a) is not None]
        known.sort(key=lambda pair: (-pair[0], pair[1]))  # type: ignore[operator]
        return [attempts[n] for _, n in known[:_TOP]]

    slowest = ranked(lambda a: None if a.end is None else a.end - a.start)
    parts.append(
        "<h2>Slowest step attempts</h2>"
        + _table(_ATTEMPT_HEADERS, [_attempt_row(a) for a in slowest], {2, 4, 5, 6, 7})
    )
    largest = ranked(lambda a: _peak(a.usage))
    parts.append(
        "<h2>Largest memory users</h2>"
        + _table(_ATTEMPT_HEADERS, [_attempt_row(a) for a in largest], {2, 4, 5, 6, 7})
    )
    return "\n".join(parts)


_encode = msgspec.json.Encoder().encode


def _round(value: float) -> float:
    return round(value, 6)


def render(state: _Attempts, title: str) -> bytes:
    """The page's bytes."""
    attempts = state.attempts
    first = min((a.start for a in attempts), default=0.0)
    last = max((a.end for a in attempts if a.end is not None), default=first)
    for a in attempts:  # an attempt the events never ended runs to the last known instant
        if a.end is None:
            a.end = max(last, a.start)
    rows = _lanes(attempts)
    agents: dict[str, int] = {}
    errors: dict[str, int] = {"": 0}
    kinds = list(KINDS)
    kind_number = {k: n for n, k in enumerate(kinds)}
    columns: dict[str, list[Any]] = {
        name: []
        for name in (
            "start", "wall", "row", "kind", "task", "agent", "attempt", "pid", "cpu", "rss",
            "err", "mark", "prev", "index",
        )
    }  # fmt: skip
    for a in attempts:
        assert a.end is not None
        columns["start"].append(_round(a.start - first))
        columns["wall"].append(_round(a.end - a.start))
        columns["row"].append(a.row)
        columns["kind"].append(kind_number.get(a.kind, kind_number["internal"]))
        columns["task"].append(a.task_id)
        columns["agent"].append(agents.setdefault(a.agent, len(agents)))
        columns["attempt"].append(a.attempt)
        columns["pid"].append(a.pid)
        cpu = _cpu(a.usage)
        columns["cpu"].append(None if cpu is None else _round(cpu))
        columns["rss"].append(_peak(a.usage))
        columns["err"].append(errors.setdefault(_first_line(a.reason), len(errors)))
        columns["mark"].append(1 if a.crashed or a.kind in _KILLED else 0)
        columns["prev"].append(a.prev)
        columns["index"].append(a.index)
    data = {
        "title": title,
        "span": _round(last - first),
        "hint": state.hint,
        "rows": [", ".join(str(pid) for pid in pids) for pids in rows],
        "kinds": [{"name": k, "color": KINDS[k]} for k in kinds],
        "agents": list(agents),
        "errors": list(errors),
        "a": columns,
    }
    # "<" only ever occurs inside JSON strings, where \u003c means the same:
    # no task_id can close the script element.
    payload = _encode(data).replace(b"<", b"\\u003c")
    summary = (
        f"{len(state.finished):,} steps finished, {len(attempts):,} attempts on "
        f"{len(rows)} {'row' if len(rows) == 1 else 'rows'}"
    )
    if state.untimed:
        summary += (
            f"; {state.untimed:,} starts carry no instant (events of an older procorch): "
            "the timeline is not to scale"
        )
    page = (
        PAGE.replace("%%TITLE%%", html.escape(title))
        .replace("%%SUMMARY%%", html.escape(summary))
        .replace("%%TABLES%%", _tables(attempts, state.finished, state.hint))
    )
    head, tail = page.split("%%DATA%%")
    return head.encode() + payload + tail.encode()

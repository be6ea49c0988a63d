"""A tiny benchmark harness: interleaved timing, percentiles and a side-by-side table.

A :class:`Group` is one metric measured for several :class:`Contender` objects
in the same run. Each contender is a factory returning a context manager that
sets the contender up (connects, starts a gateway, ...) and yields an
*operation*: a no-argument callable doing one iteration of the work. The
harness times every call of the operation with ``time.perf_counter``.

For ``kind="latency"`` the sample is the elapsed time (reported in ``unit``
after multiplying by ``scale``). For ``kind="throughput"`` the operation
returns how many bytes it moved, and the sample is MB/s (10**6 bytes/s).

All contenders of a group are set up together, warmed up, then run in blocks
of ``block`` iterations, rotating which one goes first, so slow drifts of the
machine (other load, CPU frequency, page cache) hit every contender alike.

An operation may return :class:`Then` to have work done after the clock
stops (closing the connection a connect benchmark opened, say).

A :class:`Target` compares one contender's median with another's (or with the
best of several) and prints PASS or MISS; nothing here ever raises on a missed
target.
"""

from __future__ import annotations

import contextlib
import faulthandler
import gc
import importlib
import math
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Dict, Iterator, List, Optional, Sequence, TextIO

#: One iteration of work. Latency operations may return anything; throughput
#: operations return the number of bytes they moved (an int). Either may wrap
#: its result in :class:`Then`.
Operation = Callable[[], object]
Factory = Callable[[], ContextManager[Operation]]


@dataclass(frozen=True)
class Then:
    """An operation's ``result`` plus ``after``, which the harness calls once the clock has stopped."""

    result: object
    after: Callable[[], object]


@dataclass
class Contender:
    name: str
    factory: Factory
    #: Modules that must import for this contender to run (peers are optional).
    requires: Sequence[str] = ()
    #: Shown for information; never used as a target's baseline.
    note: str = ""
    #: Says why this contender cannot run here ("" if it can), checked after ``requires``.
    unavailable: Optional[Callable[[], str]] = None


@dataclass
class Target:
    contender: str
    baseline: str
    #: lower-is-better groups: PASS if contender <= ratio * baseline;
    #: higher-is-better groups: PASS if contender >= ratio * baseline.
    ratio: float
    #: Further baselines: the best median among ``baseline`` and these is the reference.
    best_of: Sequence[str] = ()

    @property
    def baselines(self) -> List[str]:
        return [self.baseline, *self.best_of]


@dataclass
class Group:
    name: str
    title: str
    kind: str  # "latency" or "throughput"
    contenders: List[Contender]
    iterations: int
    block: int = 1
    warmup: int = 1
    unit: str = "us"
    scale: float = 1e6
    targets: List[Target] = field(default_factory=list)
    detail: str = ""

    @property
    def higher_is_better(self) -> bool:
        return self.kind == "throughput"


@dataclass
class Stats:
    n: int
    median: float
    p10: float
    p90: float
    mean: float


@dataclass
class ContenderResult:
    name: str
    stats: Optional[Stats] = None
    skipped: str = ""
    error: str = ""
    note: str = ""


@dataclass
class GroupResult:
    group: Group
    results: Dict[str, ContenderResult]
    seconds: float


def settle_allocator() -> None:
    """Put glibc malloc in the state a long-running process reaches anyway, before measuring.

    glibc serves big allocations (>= 128 KiB at first) with a fresh mmap and
    munmap, page faults included, until the first free of such a block raises
    that threshold. ``os.read(fd, 1 MiB)`` allocates 1 MiB per call, so a plain
    pipe reader runs at ~0.75 GB/s or ~2-3 GB/s on the same machine depending
    on whether something earlier in the process happened to free a big block.
    Allocating and freeing one 8 MiB block here makes every run start from the
    same (fast) state. Harmless elsewhere.
    """
    block = bytearray(8 << 20)
    del block


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) by linear interpolation between closest ranks."""
    if not sorted_values:
        return math.nan
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(samples: Sequence[float]) -> Stats:
    values = sorted(samples)
    return Stats(
        n=len(values),
        median=percentile(values, 50),
        p10=percentile(values, 10),
        p90=percentile(values, 90),
        mean=sum(values) / len(values) if values else math.nan,
    )


def missing_requirement(contender: Contender) -> str:
    """Why ``contender`` cannot run (a missing module, or what its own check says), or "" if it can."""
    for module in contender.requires:
        try:
            importlib.import_module(module)
        except Exception as e:  # ImportError, or a peer that breaks while importing
            return f"{module} is not importable ({type(e).__name__}: {e})"
    return contender.unavailable() if contender.unavailable is not None else ""


def _sample(kind: str, scale: float, operation: Operation) -> float:
    start = time.perf_counter()
    moved = operation()
    elapsed = time.perf_counter() - start
    if isinstance(moved, Then):
        moved.after()
        moved = moved.result
    if kind == "throughput":
        if not isinstance(moved, int):
            raise TypeError(f"a throughput operation must return a byte count, got {moved!r}")
        return moved / elapsed / 1e6
    return elapsed * scale


_stall_cleanups: List[Callable[[], object]] = []


def at_stall(cleanup: Callable[[], object]) -> None:
    """Have the watchdog call ``cleanup`` before it exits the process (to stop servers the run started)."""
    _stall_cleanups.append(cleanup)


class Watchdog:
    """Dumps every thread's stack and exits the process if an armed step overruns.

    A blocked call cannot be interrupted from Python, so without this a hung
    contender would hang the whole run. One daemon thread serves all steps.
    """

    def __init__(self, seconds: float, log: TextIO) -> None:
        self.seconds = seconds
        self.log = log
        self._cond = threading.Condition()
        self._what = ""
        self._deadline: Optional[float] = None
        self._closed = False
        if seconds > 0:
            threading.Thread(target=self._watch, name="bench-watchdog", daemon=True).start()

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        with self._cond:
            self._what = what
            self._deadline = time.monotonic() + self.seconds
            self._cond.notify()
        try:
            yield
        finally:
            with self._cond:
                self._deadline = None

    def close(self) -> None:
        """Stop watching (the thread ends)."""
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _watch(self) -> None:
        with self._cond:
            while True:
                if self._closed:
                    return
                if self._deadline is None:
                    self._cond.wait()
                    continue
                left = self._deadline - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                break
            what = self._what
        print(
            f"\nSTALL: {what} made no progress for {self.seconds:g} s; stacks follow, exiting",
            file=self.log,
            flush=True,
        )
        faulthandler.dump_traceback(file=self.log, all_threads=True)
        self.log.flush()
        sys.stdout.flush()
        for cleanup in _stall_cleanups:
            try:
                cleanup()
            except Exception as e:
                print(f"cleanup after the stall failed: {type(e).__name__}: {e}", file=self.log, flush=True)
        os._exit(1)


def run_group(group: Group, log: TextIO = sys.stderr, stall_timeout: float = 300.0) -> GroupResult:
    """Set up every runnable contender, warm them up, then measure them interleaved.

    A call cannot be interrupted from Python, so a contender that hangs would
    hang the whole run: if one step (a setup, or one block of iterations) takes
    longer than ``stall_timeout`` seconds (<= 0: never), every thread's stack
    is dumped to ``log`` and the process exits with status 1.
    """
    watchdog = Watchdog(stall_timeout, log)
    started = time.perf_counter()
    results = {c.name: ContenderResult(c.name, note=c.note) for c in group.contenders}
    runnable: List[Contender] = []
    for contender in group.contenders:
        why = missing_requirement(contender)
        if why:
            results[contender.name].skipped = why
            print(f"  skipping {contender.name}: {why}", file=log)
        else:
            runnable.append(contender)

    samples: Dict[str, List[float]] = {c.name: [] for c in runnable}
    managers: Dict[str, ContextManager[Operation]] = {}
    operations: Dict[str, Operation] = {}

    def fail(name: str, error: str) -> None:
        results[name].error = error
        print(f"  {name}: {error}", file=log)

    def run(name: str, count: int, keep: bool) -> None:
        operation = operations.get(name)
        if operation is None:
            return
        try:
            with watchdog.step(f"running {name} ({count} iterations)"):
                for _ in range(count):
                    value = _sample(group.kind, group.scale, operation)
                    if keep:
                        samples[name].append(value)
        except Exception as e:
            fail(name, f"failed: {type(e).__name__}: {e}")
            del operations[name]

    try:
        for contender in runnable:
            manager = contender.factory()
            try:
                with watchdog.step(f"setting up {contender.name}"):
                    operations[contender.name] = manager.__enter__()
                managers[contender.name] = manager
            except Exception as e:
                fail(contender.name, f"setup failed: {type(e).__name__}: {e}")

        names = list(operations)
        for name in names:
            run(name, group.warmup, keep=False)
        blocks = max(1, math.ceil(group.iterations / group.block))
        done = 0
        for index in range(blocks):
            count = min(group.block, group.iterations - done)
            done += count
            shift = index % len(names) if names else 0
            for name in names[shift:] + names[:shift]:
                gc.collect()  # do not bill one contender for another's garbage
                run(name, count, keep=True)
    finally:
        for name, manager in reversed(list(managers.items())):
            try:
                with watchdog.step(f"tearing down {name}"):
                    manager.__exit__(None, None, None)
            except Exception as e:
                print(f"  {name}: teardown failed: {type(e).__name__}: {e}", file=log)
        watchdog.close()

    for name, values in samples.items():
        if values and not results[name].error:
            results[name].stats = summarize(values)
    return GroupResult(group, results, time.perf_counter() - started)


# --- printing -----------------------------------------------------------------


def _fmt(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _median(result: GroupResult, name: str) -> Optional[float]:
    entry = result.results.get(name)
    if entry is None or entry.stats is None:
        return None
    return entry.stats.median


def best_baseline(result: GroupResult, target: Target) -> str:
    """The name of the target's reference: its baseline with the best median (the first if none has one)."""
    measured = [(median, name) for name in target.baselines if (median := _median(result, name)) is not None]
    if not measured:
        return target.baseline
    pick = max if result.group.higher_is_better else min
    return pick(measured)[1]


def print_group(result: GroupResult, out: TextIO = sys.stdout) -> None:
    group = result.group
    better = "higher is better" if group.higher_is_better else "lower is better"
    unit = "MB/s" if group.higher_is_better else f"{group.unit} per op"
    print(f"\n== {group.title} [{group.name}] ==", file=out)
    print(
        f"   {unit}, {better}; {group.iterations} iterations per contender after {group.warmup} warm-up, "
        f"interleaved in blocks of {group.block}; {result.seconds:.1f} s",
        file=out,
    )
    if group.detail:
        print(f"   {group.detail}", file=out)

    reference = best_baseline(result, group.targets[0]) if group.targets else ""
    ref_median = _median(result, reference) if reference else None
    width = max([len(c.name) for c in group.contenders] + [9])
    ratio_head = f"  vs {reference}" if reference else ""
    print(f"   {'contender':<{width}}  {'median':>9}  {'p10':>9}  {'p90':>9}{ratio_head}", file=out)
    for contender in group.contenders:
        entry = result.results[contender.name]
        label = f"{contender.name:<{width}}"
        if entry.stats is None:
            why = f"skipped: {entry.skipped}" if entry.skipped else f"error: {entry.error or 'no samples'}"
            print(f"   {label}  {why}", file=out)
            continue
        s = entry.stats
        ratio = ""
        if ref_median:
            ratio = f"  {s.median / ref_median:.2f}x"
        note = f"  ({entry.note})" if entry.note else ""
        print(f"   {label}  {_fmt(s.median):>9}  {_fmt(s.p10):>9}  {_fmt(s.p90):>9}{ratio}{note}", file=out)

    for target in group.targets:
        print(f"   {target_verdict(result, target)}", file=out)


def target_verdict(result: GroupResult, target: Target) -> str:
    """One line: the target, the measured ratio, PASS / MISS (or why it could not be judged)."""
    group = result.group
    op = ">=" if group.higher_is_better else "<="
    baseline = best_baseline(result, target)
    against = f"best of ({', '.join(target.baselines)}) = {baseline}" if target.best_of else baseline
    wanted = f"target: {target.contender} {op} {target.ratio:g} x {against}"
    value = _median(result, target.contender)
    base = _median(result, baseline)
    if value is None or base is None or base == 0:
        missing = target.contender if value is None else baseline
        return f"{wanted}: n/a ({missing} has no result)"
    ratio = value / base
    ok = ratio >= target.ratio if group.higher_is_better else ratio <= target.ratio
    # How far off: the factor by which the contender must improve to meet the target.
    factor = target.ratio / ratio if group.higher_is_better else ratio / target.ratio
    tail = "" if ok else f" (needs {factor:.2f}x better)"
    return f"{wanted}: measured {ratio:.2f} -> {'PASS' if ok else 'MISS'}{tail}"


def print_summary(results: Sequence[GroupResult], out: TextIO = sys.stdout) -> None:
    print("\n== summary ==", file=out)
    for result in results:
        for target in result.group.targets:
            print(f"   [{result.group.name}] {target_verdict(result, target)}", file=out)

"""How many CPU threads a loop of similar steps should use, chosen by measuring it.

On a quiet machine a decoding or training step is fastest with every core. Beside any
other busy process it is not: an OpenMP team waits at every barrier for a thread the OS
has descheduled, and steps take two to four times longer than on one thread
(bench/threads.py prints the matrix). No setting fixed in advance fits both cases, and the
load comes and goes, so `ThreadTuner` times the steps themselves: it tries each candidate
thread count for a few steps, runs the fastest, and tries again periodically, or at once
when steps slow down. Loops running at once in one process share the cores instead (torch
has one thread setting per process).
"""

from __future__ import annotations

import os
import statistics
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch


def cpu_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class ThreadTuner:
    """Chooses torch's intra-op thread count for a loop of similar steps by timing them.

    Use ``with tuner.step(): ...`` around each step (and `use` around work that should run
    with the current choice without being timed). Candidates default to 1 and every core,
    tried in that order: each gets one untimed warm-up step and ``trial`` timed ones, and
    one that is ``slower`` times the best median so far is dropped at once (under load,
    a step with every core can take twenty times longer). The fastest median then runs
    for ``period`` steps, a period that doubles (up to 16x) while trials keep the same
    choice, or until the median of its last ``trial`` steps is ``slower`` times its trial
    median (load arrived); then the candidates are tried again. The thread count set
    before the tuner is restored on `close`.
    """

    def __init__(self, candidates: Sequence[int] | None = None, trial: int = 3,
                 period: int = 100, slower: float = 1.3) -> None:
        with _LOCK:
            _ACTIVE.add(self)
        self.candidates = sorted(set(candidates or (1, cpu_cores())))
        self.trial, self.base_period, self.slower = trial, period, slower
        self.period = period
        self.previous = torch.get_num_threads()
        self.choice = self.candidates[-1]
        self.baseline = 0.0
        self.recent: list[float] = []
        self.since = 0
        self._explore()

    def _explore(self) -> None:
        # (thread count, timed?) for each step of the trial
        self.plan = [(c, i > 0) for c in self.candidates for i in range(self.trial + 1)]
        self.times: dict[int, list[float]] = {c: [] for c in self.candidates}

    @property
    def exploring(self) -> bool:
        return bool(self.plan)

    def threads(self) -> int:
        """The thread count the next step runs with."""
        shared = _shared_threads()
        if shared:
            return shared
        return self.plan[0][0] if self.plan else self.choice

    @contextmanager
    def use(self) -> Iterator[None]:
        """Run the body with the current choice (the last trial's, not a candidate under
        trial), untimed."""
        count = _shared_threads() or self.choice
        if torch.get_num_threads() != count:
            torch.set_num_threads(count)
        yield

    @contextmanager
    def step(self) -> Iterator[None]:
        """Run one step with the chosen (or tried) thread count and time it."""
        count = self.threads()
        if torch.get_num_threads() != count:
            torch.set_num_threads(count)
        start = time.perf_counter()
        yield
        self._record(count, time.perf_counter() - start)

    def _best(self) -> tuple[int, float] | None:
        medians = {c: statistics.median(t) for c, t in self.times.items() if t}
        if not medians:
            return None
        best = min(medians, key=medians.__getitem__)
        return best, medians[best]

    def _record(self, count: int, seconds: float) -> None:
        if _shared_threads():  # other loops run beside this one: timings tell nothing
            return
        if self.plan:
            _, timed = self.plan.pop(0)
            best = self._best()
            if best is not None and best[0] != count and seconds > self.slower * best[1]:
                self.plan = [p for p in self.plan if p[0] != count]  # clearly slower: drop
            elif timed:
                self.times[count].append(seconds)
            if not self.plan:
                choice, self.baseline = self._best() or (self.choice, seconds)
                same = choice == self.choice
                self.period = min(2 * self.period, 16 * self.base_period) if same else (
                    self.base_period)
                self.choice, self.recent, self.since = choice, [], 0
            return
        self.since += 1
        self.recent = [*self.recent[1 - self.trial:], seconds] if self.trial > 1 else [seconds]
        slowed = (len(self.recent) == self.trial
                  and statistics.median(self.recent) > self.slower * self.baseline)
        if slowed or self.since >= self.period:
            self._explore()

    def close(self) -> None:
        """Restore the thread count that was set before this tuner."""
        with _LOCK:
            _ACTIVE.discard(self)
        torch.set_num_threads(self.previous)


# torch's thread count is one setting for the whole process, so loops that run at once
# in several threads of it (app.py --concurrency 2) cannot each choose their own: while
# more than one tuner is open they share the cores, one thread each on a 2-core machine.
_ACTIVE: weakref.WeakSet[ThreadTuner] = weakref.WeakSet()  # a tuner dropped unclosed leaves
_LOCK = threading.Lock()


def _shared_threads() -> int:
    """Each loop's share of the cores while several tuners are open, else 0."""
    with _LOCK:
        active = len(_ACTIVE)
    return max(1, cpu_cores() // active) if active > 1 else 0

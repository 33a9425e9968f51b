"""Step 4: one trial - sample a candidate, measure it through the store, record it in the trial.

A measured candidate's model and record are published to the artifact store (once per candidate, however many
trials repeat it): the trial records ``artifact_id`` (the model), ``metrics_artifact_id`` and ``artifact_store``
(its address); ``onnx_path`` stays as the path on the machine that built it, a hint for readers of older studies.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from autosearch.candidate import sample_candidate
from autosearch.errors import AutosearchError, CandidateError, ConfigError, SearchStopped, Stopped
from autosearch.remote import TargetUnreachable
from autosearch.steps import SearchContext
from autosearch.steps.baseline import Baseline
from autosearch.store import CandidateStore

__all__ = ["FloatClock", "Objective", "Progress", "profiler_wait"]


def profiler_wait() -> tuple[float, int]:
    """(first delay in seconds, attempts) of the wait for a profiler that stopped answering: 5 s and 12, or
    ``$AUTOSEARCH_PROFILER_RETRY_S`` and ``$AUTOSEARCH_PROFILER_ATTEMPTS``; the delay doubles each attempt, up to 60 s
    (the defaults wait about 9 minutes in all)."""
    def read(name: str, default: float, kind: type) -> Any:
        raw = os.environ.get(name, "").strip()
        if not raw:
            return default
        try:
            val = kind(raw)
        except ValueError:
            val = None
        if val is None or val < (1 if kind is int else 0):
            raise ConfigError(f"${name} is {raw!r}: give a {'whole number >= 1' if kind is int else 'number of seconds >= 0'}")
        return val

    return float(read("AUTOSEARCH_PROFILER_RETRY_S", 5.0, float)), int(read("AUTOSEARCH_PROFILER_ATTEMPTS", 12, int))


@dataclass
class FloatClock:
    """The float model re-timed every few trials, so each trial's speedup divides by a float figure measured
    near it (on a loaded machine a single start-of-run figure made the unchanged float candidate read 1.6-1.9x).

    Attributes:
        path: The float model.
        feed: Its example input.
        target: Where trials are timed.
        first_ms: The baseline's figure (the clock's first reading).
        every: Re-time the float model after this many measured trials.
    """

    path: Path
    feed: Any
    target: Any
    first_ms: float
    first_at: float = 0.0
    every: int = 5
    readings: list[tuple[float, float]] = field(default_factory=list)
    _since: int = 0

    def __post_init__(self) -> None:
        self.readings.append((self.first_at or time.time(), self.first_ms))

    def tick(self) -> None:
        """Count one measured trial; re-time the float model when it is due (a failure keeps the old readings)."""
        self._since += 1
        if self._since < self.every:
            return
        self._since = 0
        try:
            self.readings.append((time.time(), self.target.profile(self.path, self.feed).median_ms))
        except CandidateError:
            pass

    def near(self, when: float | None) -> float:
        """The float latency read nearest in time to ``when`` (the latest when unknown)."""
        if when is None:
            return self.readings[-1][1]
        return min(self.readings, key=lambda r: abs(r[0] - when))[1]


@dataclass
class Objective:
    """The Optuna objective: returns the space's objectives; a failing candidate raises
    :class:`CandidateError` (a FAIL trial with ``fail_reason``), one far below the floor on a subset is pruned."""

    ctx: SearchContext
    store: CandidateStore
    baseline: Baseline
    floor: float | None
    clock: FloatClock | None = None
    also_clocks: dict[str, FloatClock] = field(default_factory=dict)  # the same, on each further target
    worker: dict[str, Any] | None = None  # {"id": host:pid[#index], "seed": the sampler's}: recorded in each trial

    def __call__(self, trial: optuna.Trial) -> tuple[float, ...]:
        try:
            return self._run(trial)
        except KeyboardInterrupt as exc:
            trial.set_user_attr("fail_reason", f"stopped by {exc.signal_name}" if isinstance(exc, Stopped)
                                else "interrupted (Ctrl-C) while this candidate was built or measured")
            raise

    def _run(self, trial: optuna.Trial) -> tuple[float, ...]:
        ctx = self.ctx
        if self.worker is not None:
            trial.set_user_attr("worker", dict(self.worker))
        cand = sample_candidate(trial, ctx.space, ctx.units)
        trial.set_user_attr("candidate", cand.to_dict())
        trial.set_user_attr("summary", cand.summary())
        trial.set_user_attr("onnx_path", str(self.store.model_path(cand)))
        try:
            rec = self._measure(trial, cand)
        except CandidateError as exc:
            trial.set_user_attr("fail_reason", str(exc))
            raise

        base_ms = self.baseline.latency_ms
        if self.clock is not None and rec.get("latency_ms") == rec.get("latency_ms"):  # not NaN (early stopped)
            if not rec.get("cached"):
                self.clock.tick()
                for c in self.also_clocks.values():
                    c.tick()
            base_ms = self.clock.near(rec.get("measured_at"))
            rec = {**rec, "speedup": base_ms / rec["latency_ms"]}
            for lbl, c in self.also_clocks.items():
                if rec.get(f"latency_ms@{lbl}"):
                    rec[f"speedup@{lbl}"] = c.near(rec.get("measured_at")) / rec[f"latency_ms@{lbl}"]
        if not rec.get("early_stopped"):
            self._publish(trial, cand)
        for k, v in rec.items():
            trial.set_user_attr(k, v)
        acc = rec["accuracy"]
        trial.set_user_attr("accuracy_drop", self.baseline.accuracy - acc)
        cons = 0.0 if self.floor is None else self.floor - acc
        if self.floor is not None:
            trial.set_constraint("accuracy_floor", cons)
        trial.set_user_attr("feasible", cons <= 0)
        trial.set_user_attr("baseline_latency_ms", base_ms)
        if rec.get("early_stopped"):
            raise optuna.TrialPruned(f"scored {acc:.4f} on a subset, below the floor {self.floor:.4f}")
        return tuple(float(rec[o]) for o in ctx.space.objectives)

    def _measure(self, trial: optuna.Trial, cand: Any) -> dict[str, Any]:
        """The store's record of the candidate; while a profiler does not answer, wait for it (announced, the delay
        doubling up to 60 s, :func:`profiler_wait`) and measure again once it does, so an outage costs no trial.
        When the wait runs out, the trial fails (``unreachable``: the URL; a later run queues it again) and the
        search stops (:class:`SearchStopped`)."""
        first, attempts = profiler_wait()
        attempt, waited = 1, 0.0
        while True:
            try:
                return self.store.measure(cand, floor=self.floor)
            except TargetUnreachable as exc:
                url = exc.url
                while True:
                    if attempt >= attempts:
                        reason = f"the profiler at {url} did not answer ({attempts} attempts over {waited:.0f} s): {exc}"
                        trial.set_user_attr("fail_reason", reason)
                        trial.set_user_attr("unreachable", url)
                        raise SearchStopped(
                            f"the profiler at {url} did not answer ({attempts} attempts over {waited:.0f} s): the search "
                            "stopped, its finished trials are kept; start the profiler and resume (the trial it stopped "
                            "is run again)") from None
                    attempt += 1
                    delay = min(first * 2 ** (attempt - 2), 60.0)
                    self.ctx.say(f"[autosearch] profiler at {url} not answering; retrying in {delay:g} s "
                                 f"(attempt {attempt} of {attempts})")
                    time.sleep(delay)
                    waited += delay
                    if self._answers(url):
                        break

    def _answers(self, url: str) -> bool:
        """Whether the profiler at ``url`` (the target, or a further one) answers now."""
        for t in (self.ctx.target, *self.ctx.also.values()):
            if getattr(t, "url", None) == url:
                try:
                    t.describe()
                except AutosearchError:
                    return False
                return True
        return True  # not a target of this search (cannot be asked): measuring again asks it

    def _publish(self, trial: optuna.Trial, cand: Any) -> None:
        """Record the artifact ids of the trial's model and record; an upload that fails fails the trial (a
        trial no other machine could read back), not the candidate: a later trial of it uploads again."""
        try:
            ids = self.store.publish(cand, trial)
        except CandidateError:
            raise
        except Exception as exc:  # a store's own errors (OSError, a cloud client's) end this trial only
            reason = f"could not upload the model to the artifact store: {type(exc).__name__}: {str(exc)[:300]}"
            trial.set_user_attr("fail_reason", reason)
            raise CandidateError(reason) from exc
        if ids:
            trial.set_user_attr("artifact_id", ids["model"])
            trial.set_user_attr("metrics_artifact_id", ids["metrics"])
            trial.set_user_attr("artifact_store", ids["store"])


@dataclass
class Progress:
    """Optuna callback: one line per finished trial, ``[k/total]`` counting this run's trials after the
    ``done`` ones before it (trial numbers also count queued and failed trials, so they are not the count)."""

    ctx: SearchContext
    total: int
    done: int = 0

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        ua, say = trial.user_attrs, self.ctx.say
        self.done += 1
        head = f"[{self.done:>3}/{max(self.total, self.done)}] trial {trial.number:<3}"
        if trial.state == optuna.trial.TrialState.COMPLETE:
            flag = "" if ua.get("feasible", True) else "  (below floor)"
            say(
                f"{head} {self.ctx.evaluator.name} {ua['accuracy']:.4f} ({-ua['accuracy_drop']:+.4f})  "
                f"{ua['latency_ms']:.3f} ms  {ua['speedup']:.2f}x  {ua['size_mb']:.2f} MB  {ua.get('summary', '')}"
                + (" [cached]" if ua.get("cached") else "")
                + flag
            )
        elif trial.state == optuna.trial.TrialState.PRUNED:
            say(f"{head} stopped early: {ua.get('summary', '')}: subset score {ua.get('accuracy', float('nan')):.4f} below floor")
        else:
            reason = str(ua.get("fail_reason", trial.system_attrs.get("fail_reason", "?")))[:300]
            say(f"{head} FAILED ({ua.get('summary', '')}): {reason}")

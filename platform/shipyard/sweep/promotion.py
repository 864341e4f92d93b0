"""ASHA as Li et al. wrote it (MLSys 2020): trials pause at each rung and the best resume.

Tune's ASHAScheduler decides the moment a trial reaches a rung: it goes on if it beats a
percentile of the results the rung holds so far, so a rung's first arrivals go on however
weak they are. Here a trial that reaches a rung pauses there. A free slot goes first to a
trial a resumed sweep left mid-way, then to the best paused trial in the top
1/reduction_factor of all its rung's results (highest rung first), and only then to a new
trial. When no new trial is left and none can be promoted, the best trial of the highest rung
goes on until one trial has trained to the end; the rest stay stopped where they paused.
A promotion is decided on the results the rung holds at the time (the paper's rule too), so
early on, while a rung holds few, some trials are promoted that its final top would not hold.

Our trials reserve only a sliver of CPU in Tune (their Train workers ask for theirs later), so
Tune would start every trial it is given: `Gate` wraps the search algorithm so that it is
asked for a new trial only when the scheduler has a slot for one. The gate also saves the
scheduler's state with the search algorithm's in every experiment snapshot, so a resumed
sweep ranks against everything its rungs held before.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search import SearchAlgorithm

STATE_FILE = "shipyard-asha-promotions.json"


@dataclass
class Rungs:
    """The results each rung holds and whom it promoted; scores are lower-is-better."""

    milestones: list[int]  # steps; the last rung's promotions train to the end
    reduction_factor: float
    scores: list[dict[str, float]] = field(default_factory=list)
    promoted: list[list[str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.scores = self.scores or [{} for _ in self.milestones]
        self.promoted = self.promoted or [[] for _ in self.milestones]

    @classmethod
    def between(
        cls, grace_period: int, reduction_factor: float, max_steps: int, checkpoint_every: int
    ) -> Rungs:
        """Rungs below max_steps at the first checkpoint at or after each of grace_period ×
        reduction_factor^k steps: a paused trial resumes from the checkpoint of its rung."""
        milestones: list[int] = []
        steps: float = grace_period
        while steps < max_steps:
            rung = math.ceil(steps / checkpoint_every - 1e-9) * checkpoint_every
            if rung < max_steps and rung not in milestones:
                milestones.append(rung)
            steps *= reduction_factor
        return cls(milestones, reduction_factor)

    def record(self, trial_id: str, step: int, score: float) -> int | None:
        """Enter a result in every rung it is the trial's first at; the highest such rung."""
        reached = None
        for rung, milestone in enumerate(self.milestones):
            if step >= milestone and trial_id not in self.scores[rung]:
                self.scores[rung][trial_id] = score
                reached = rung
        return reached

    def target_after(self, step: int) -> int:
        """The rung a trial at `step` is on its way to (len(milestones): the end)."""
        return sum(1 for milestone in self.milestones if milestone <= step)

    def candidates(self, paused: dict[str, int]) -> list[str]:
        """Paused trials (id -> rung) that rank in the top 1/reduction_factor of their rung
        and were not promoted from it yet: highest rung first, best first."""
        found = []
        for rung in reversed(range(len(self.milestones))):
            ranked = sorted(self.scores[rung], key=self.scores[rung].get)
            top = ranked[: int(len(ranked) / self.reduction_factor + 1e-9)]
            found += [
                trial_id
                for trial_id in top
                if paused.get(trial_id) == rung and trial_id not in self.promoted[rung]
            ]
        return found

    def best_of_highest_rung(self, paused: dict[str, int]) -> str | None:
        """The best paused trial among those paused highest."""
        if not paused:
            return None
        rung = max(paused.values())
        return min((t for t, r in paused.items() if r == rung), key=self.scores[rung].get)


class PromotingAsha(TrialScheduler):
    """ASHA with promotions, counting time in optimizer steps (`step` in each result)."""

    _supports_buffered_results = False  # it pauses trials at exact steps

    def __init__(
        self,
        rungs: Rungs,
        max_steps: int,
        concurrent_trials: int,
        end_runs: Callable[[str], None] | None = None,
    ):
        super().__init__()
        self.rungs, self.max_steps, self.concurrent_trials = rungs, max_steps, concurrent_trials
        self.end_runs = end_runs  # ends a paused trial's run now (see `EndingAsha`)
        self._metric, self._mode = None, None
        self.running: dict[str, int] = {}  # trial id -> the rung it trains towards
        self.paused: dict[str, int] = {}  # trial id -> the rung it waits at
        self.queued: dict[str, int] = {}  # left mid-way by an interrupted sweep: -> target
        self.one_finished = False

    def set_search_properties(self, metric: str | None, mode: str | None, **spec) -> bool:
        if (self._metric and metric) or (self._mode and mode):
            return False
        self._metric, self._mode = metric or self._metric, mode or self._mode
        return True

    # What the gate asks

    def may_start_new_trial(self) -> bool:
        """Whether a free slot is left after every trial with a claim to one."""
        return self._free_slots() > 0 and not self.queued and not self._candidates()

    # Tune's calls

    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        trial_id = trial.trial_id
        if trial.is_finished():  # a resumed sweep's finished ones (or errored)
            self._forget(trial_id)
            return
        if trial_id in self.paused:  # a resumed sweep: it keeps waiting at its rung
            self._hold(trial)
            return
        target = self.running.pop(trial_id, None)
        if target is None:
            target = self.rungs.target_after(trial.last_result.get("step", 0))
            if target == 0 and self._free_slots() > 0 and not self.queued:
                self.running[trial_id] = 0  # a new trial, let through by the gate
                return
        self.queued[trial_id] = target
        self._hold(trial)

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        trial_id, step = trial.trial_id, result.get("step")
        if trial_id not in self.running or step is None or self._metric not in result:
            return self.CONTINUE
        rung = self.rungs.record(trial_id, step, self._score(result[self._metric]))
        target = self.running[trial_id]
        if rung is None or rung < target or step >= self.max_steps:
            return self.CONTINUE
        del self.running[trial_id]
        self.paused[trial_id] = rung
        # Go on at once if it would be the next promotion anyway: a pause costs a restart.
        if trial_id in self._candidates()[: self._free_slots() - len(self.queued)]:
            self._promote(trial_id)
            return self.CONTINUE
        if self.end_runs:
            self.end_runs(trial_id)
        return self.PAUSE

    def on_trial_complete(self, tune_controller, trial: Trial, result: dict) -> None:
        if result.get("step", 0) >= self.max_steps:
            self.one_finished = True
        self._forget(trial.trial_id)

    def on_trial_error(self, tune_controller, trial: Trial) -> None:
        self._forget(trial.trial_id)

    def on_trial_remove(self, tune_controller, trial: Trial) -> None:
        self._forget(trial.trial_id)
        # Ray 2.60 saves a trial's status in the experiment state only when it is marked,
        # and stopping a trial that holds no actor (paused) does not mark it: a resumed
        # sweep would find it PAUSED and train it again. Tune hands removals the controller
        # itself, not its restricted wrapper.
        tune_controller._mark_trial_to_checkpoint(trial)

    def choose_trial_to_run(self, tune_controller) -> Trial | None:
        """A paused trial to resume into a free slot, if one has a claim to it."""
        trials = {trial.trial_id: trial for trial in tune_controller.get_trials()}
        self._release_ended(trials)
        if self._free_slots() <= 0:
            return None
        if self.queued:
            trial_id, target = next(iter(self.queued.items()))
            del self.queued[trial_id]
            self.running[trial_id] = target
            return trials[trial_id]
        waiting = {  # paused, not still saving on the way there
            trial_id: rung
            for trial_id, rung in self.paused.items()
            if trials[trial_id].status == Trial.PAUSED
        }
        candidates = self.rungs.candidates(waiting)
        if candidates:
            return trials[self._promote(candidates[0])]
        if self._settled(tune_controller, trials.values()):
            return self._finish(tune_controller, trials, waiting)
        return None

    def debug_string(self) -> str:
        return (
            f"ASHA with promotions at steps {self.rungs.milestones}: {len(self.running)} "
            f"running, {len(self.paused)} paused, {len(self.queued)} to resume."
        )

    # State the gate saves and restores

    def state(self) -> dict:
        return {
            "milestones": self.rungs.milestones,
            "scores": self.rungs.scores,
            "promoted": self.rungs.promoted,
            "running": self.running,
            "paused": self.paused,
            "queued": self.queued,
            "one_finished": self.one_finished,
        }

    def restore(self, state: dict) -> None:
        if state["milestones"] != self.rungs.milestones:
            return  # not this sweep's rungs; the job check refuses a changed sweep anyway
        self.rungs.scores, self.rungs.promoted = state["scores"], state["promoted"]
        self.running, self.paused = state["running"], state["paused"]
        self.queued, self.one_finished = state["queued"], state["one_finished"]

    # Helpers

    def _score(self, value: float) -> float:
        if not math.isfinite(value):
            return math.inf
        return -value if self._mode == "max" else value

    def _free_slots(self) -> int:
        return self.concurrent_trials - len(self.running)

    def _candidates(self) -> list[str]:
        return self.rungs.candidates(self.paused)

    def _promote(self, trial_id: str) -> str:
        rung = self.paused.pop(trial_id)
        self.rungs.promoted[rung].append(trial_id)
        self.running[trial_id] = rung + 1
        return trial_id

    def _hold(self, trial: Trial) -> None:
        # Tune files a trial under its status right after on_trial_add: a held trial waits
        # as PAUSED for choose_trial_to_run instead of starting as PENDING.
        trial.set_status(Trial.PAUSED)

    def _settled(self, tune_controller, trials) -> bool:
        """Nothing runs, nothing is being paused and no new trial will come."""
        busy = any(trial.status in (Trial.PENDING, Trial.RUNNING) for trial in trials)
        return not self.running and not busy and tune_controller.search_alg.is_finished()

    def _finish(self, tune_controller, trials: dict[str, Trial], waiting: dict[str, int]):
        """The end of the sweep: train the best trial of the highest rung on until one trial
        has finished; then stop every paused trial where it is."""
        if not self.one_finished:
            best = self.rungs.best_of_highest_rung(waiting)
            if best is not None:
                return trials[self._promote(best)]
        for trial_id in list(waiting):
            tune_controller.stop_trial(trials[trial_id])
        return None

    def _release_ended(self, trials: dict[str, Trial]) -> None:
        """Free the slots of trials Tune ended without a call here (it makes none when a
        trial's start on a reused actor fails): each would hold its slot, and the sweep
        would wait for good."""
        for trial_id in list(self.running):
            trial = trials.get(trial_id)
            if trial is None or trial.is_finished():
                del self.running[trial_id]

    def _forget(self, trial_id: str) -> None:
        for table in (self.running, self.paused, self.queued):
            table.pop(trial_id, None)


class EndingAsha(ASHAScheduler):
    """Tune's ASHAScheduler, ending a trial's run the moment it stops the trial.

    Tune ends a stopped (or paused) trial's function only when it reuses the trial's actor for
    the next trial: until then the run trains on for nothing, and holds the ranks the next
    trial waits for. `end_runs(trial_id)` ends it at once."""

    def __init__(self, end_runs: Callable[[str], None], **settings):
        super().__init__(**settings)
        self.end_runs = end_runs

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        if decision == self.STOP:
            self.end_runs(trial.trial_id)
        return decision


class Gate(SearchAlgorithm):
    """A search algorithm asked for a new trial only when `scheduler` has a slot for one."""

    def __init__(self, search: SearchAlgorithm, scheduler: PromotingAsha):
        self.search, self.scheduler = search, scheduler

    def next_trial(self) -> Trial | None:
        return self.search.next_trial() if self.scheduler.may_start_new_trial() else None

    def save_to_dir(self, dirpath: str, **kwargs) -> None:
        self.search.save_to_dir(dirpath, **kwargs)
        Path(dirpath, STATE_FILE).write_text(json.dumps(self.scheduler.state()))

    def has_checkpoint(self, dirpath: str) -> bool:
        return Path(dirpath, STATE_FILE).exists()

    def restore_from_dir(self, dirpath: str) -> None:
        if self.search.has_checkpoint(dirpath):
            self.search.restore_from_dir(dirpath)
        self.scheduler.restore(json.loads(Path(dirpath, STATE_FILE).read_text()))

    # The rest is the search algorithm's.

    @property
    def metric(self):
        return self.search.metric

    @property
    def total_samples(self) -> int:
        return self.search.total_samples

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return self.search.set_search_properties(metric, mode, config, **spec)

    def add_configurations(self, experiments) -> None:
        self.search.add_configurations(experiments)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self.search.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
        self.search.on_trial_complete(trial_id, result=result, error=error)

    def is_finished(self) -> bool:
        return self.search.is_finished()

    def set_finished(self) -> None:
        self.search.set_finished()

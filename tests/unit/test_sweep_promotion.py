"""ASHA with promotions: its rungs and its decisions at them, on Tune's own Trial objects."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from ray.tune.experiment import Trial

from shipyard.sweep.promotion import PromotingAsha, Rungs


def test_rungs_sit_at_the_grace_period_times_powers_of_the_reduction_factor():
    assert Rungs.between(9, 3, 81, checkpoint_every=3).milestones == [9, 27]
    assert Rungs.between(9, 3, 82, checkpoint_every=3).milestones == [9, 27, 81]
    assert Rungs.between(8, 2, 24, checkpoint_every=8).milestones == [8, 16]
    assert Rungs.between(10, 3, 10, checkpoint_every=1).milestones == []


def test_rungs_move_up_to_the_next_checkpoint():
    # 10, 30, 90, 270 steps; a paused trial can only resume from a checkpoint (every 50).
    assert Rungs.between(10, 3, 400, checkpoint_every=50).milestones == [50, 100, 300]
    assert Rungs.between(10, 2.5, 100, checkpoint_every=5).milestones == [10, 25, 65]


def test_a_result_counts_once_at_every_rung_it_is_the_first_past():
    rungs = Rungs.between(8, 2, 64, checkpoint_every=4)  # 8, 16, 32
    assert rungs.record("a", 4, 1.0) is None
    assert rungs.record("a", 16, 0.5) == 1  # a coarse report passes two rungs at once
    assert rungs.record("a", 20, 0.1) is None
    assert rungs.scores[:2] == [{"a": 0.5}, {"a": 0.5}]
    assert [rungs.target_after(step) for step in (0, 7, 8, 16, 40)] == [0, 0, 1, 2, 3]


def test_candidates_are_the_top_third_of_all_a_rung_holds_not_yet_promoted():
    rungs = Rungs.between(9, 3, 81, checkpoint_every=9)  # 9, 27
    for trial_id, score in [("a", 3.0), ("b", 1.0), ("c", 2.0), ("d", 4.0), ("e", 0.5)]:
        rungs.record(trial_id, 9, score)
    paused = dict.fromkeys("abcde", 0)
    # Five results: the top one (e) is promotable; b, second, is not yet.
    assert rungs.candidates(paused) == ["e"]
    rungs.record("f", 9, 5.0)  # a sixth result: the top two are
    assert rungs.candidates({**paused, "f": 0}) == ["e", "b"]
    rungs.promoted[0].append("e")
    assert rungs.candidates({**paused, "f": 0}) == ["b"]
    assert rungs.candidates({"a": 0}) == []  # b is not paused (it runs, or was stopped)


def test_a_higher_rung_promotes_first():
    rungs = Rungs.between(1, 3, 81, checkpoint_every=1)  # 1, 3, 9, 27
    for trial_id, score in [("a", 1.0), ("b", 2.0), ("c", 3.0)]:
        rungs.record(trial_id, 1, score)
        rungs.record(trial_id, 3, score)
    rungs.record("x", 1, 0.1)
    assert rungs.candidates({"a": 1, "x": 0}) == ["a", "x"]
    assert rungs.best_of_highest_rung({"b": 1, "c": 1, "x": 0}) == "b"
    assert rungs.best_of_highest_rung({}) is None


def scheduler(concurrent_trials: int = 1, mode: str = "min", ended=None) -> PromotingAsha:
    asha = PromotingAsha(
        Rungs.between(8, 2, 24, 8),
        max_steps=24,
        concurrent_trials=concurrent_trials,
        end_runs=None if ended is None else ended.append,
    )
    asha.set_search_properties("val_loss", mode)
    return asha


def added(asha: PromotingAsha, trial_id: str, **last_result) -> Trial:
    trial = Trial("run_trial", stub=True, trial_id=trial_id)
    trial.last_result.update(last_result)
    asha.on_trial_add(None, trial)
    return trial


def test_a_trial_pauses_at_its_rung_unless_it_would_be_promoted_next_anyway():
    ended: list[str] = []  # the trials whose runs the scheduler ended (paused ones)
    asha = scheduler(ended=ended)
    first = added(asha, "first")
    assert asha.on_trial_result(None, first, {"step": 4, "val_loss": 9.0}) == "CONTINUE"
    # Alone at the rung, it is not in the top half of one result: it pauses.
    assert asha.on_trial_result(None, first, {"step": 8, "val_loss": 5.0}) == "PAUSE"
    assert asha.paused == {"first": 0} and asha.may_start_new_trial()
    assert ended == ["first"]
    second = added(asha, "second")
    assert asha.running == {"second": 0}
    # Better than the first: top of two, and the slot it frees would go to it.
    assert asha.on_trial_result(None, second, {"step": 8, "val_loss": 4.0}) == "CONTINUE"
    assert asha.running == {"second": 1} and asha.rungs.promoted[0] == ["second"]
    assert ended == ["first"]  # its run goes on
    # At the next rung it stands alone again: it pauses, and the slot is a new trial's.
    assert asha.on_trial_result(None, second, {"step": 16, "val_loss": 3.0}) == "PAUSE"
    assert asha.paused == {"first": 0, "second": 1} and asha.may_start_new_trial()
    assert ended == ["first", "second"]


def test_a_worse_second_arrival_pauses_and_leaves_the_slot_to_the_first():
    asha = scheduler()
    first = added(asha, "first")
    asha.on_trial_result(None, first, {"step": 8, "val_loss": 4.0})
    second = added(asha, "second")
    assert asha.on_trial_result(None, second, {"step": 8, "val_loss": 5.0}) == "PAUSE"
    assert asha.rungs.candidates(asha.paused) == ["first"]
    assert not asha.may_start_new_trial()  # the free slot is the first one's


def test_mode_max_ranks_the_highest_metric_first():
    asha = scheduler(mode="max")
    low = added(asha, "low")
    asha.on_trial_result(None, low, {"step": 8, "val_loss": 1.0})
    high = added(asha, "high")
    assert asha.on_trial_result(None, high, {"step": 8, "val_loss": 2.0}) == "CONTINUE"


def test_no_new_trial_starts_beyond_the_concurrent_trials():
    asha = scheduler(concurrent_trials=2)
    added(asha, "a")
    assert asha.may_start_new_trial()
    added(asha, "b")
    assert not asha.may_start_new_trial()
    # A trial added without a slot (a resumed sweep's) waits, held as PAUSED.
    assert added(asha, "c").status == Trial.PAUSED and asha.queued == {"c": 0}


def test_a_trial_tune_ends_without_telling_the_scheduler_gives_its_slot_back():
    """Tune marks a trial ERROR and calls no scheduler when the trial's start on a reused
    actor fails: its slot must not stay taken, or the sweep waits for good."""
    asha = scheduler()
    first = added(asha, "first")
    asha.on_trial_result(None, first, {"step": 8, "val_loss": 5.0})
    first.set_status(Trial.PAUSED)
    second = added(asha, "second")
    assert asha.on_trial_result(None, second, {"step": 8, "val_loss": 4.0}) == "CONTINUE"
    assert not asha.may_start_new_trial()
    second.set_status(Trial.ERROR)  # unannounced
    tune = SimpleNamespace(
        get_trials=lambda: [first, second], search_alg=SimpleNamespace(is_finished=lambda: False)
    )
    assert asha.choose_trial_to_run(tune) is None  # first is not in its rung's top half
    assert asha.running == {} and asha.may_start_new_trial()


@pytest.mark.parametrize("how", ["paused", "running"])
def test_a_resumed_sweep_gets_the_rungs_back_and_holds_its_unfinished_trials(how):
    asha = scheduler()
    first = added(asha, "first")
    asha.on_trial_result(None, first, {"step": 8, "val_loss": 5.0})  # pauses at rung 0
    second = added(asha, "second")
    asha.on_trial_result(None, second, {"step": 8, "val_loss": 4.0})  # promoted, running
    saved = json.loads(json.dumps(asha.state()))

    resumed = scheduler()
    resumed.restore(saved)
    assert resumed.rungs.scores == asha.rungs.scores
    trial_id = {"paused": "first", "running": "second"}[how]
    trial = added(resumed, trial_id, step=8)
    assert trial.status == Trial.PAUSED
    if how == "running":  # it was on its way to rung 1: it resumes first, to go there
        assert resumed.queued == {"second": 1} and not resumed.may_start_new_trial()
    else:
        assert resumed.paused == {"first": 0}
    finished = Trial("run_trial", stub=True, trial_id="done")
    finished.set_status(Trial.TERMINATED)
    resumed.on_trial_add(None, finished)
    assert finished.status == Trial.TERMINATED

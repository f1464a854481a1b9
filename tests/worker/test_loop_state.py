"""The training loop's small state objects (launcher.worker.loop_state), each on its own: resume position,
early stopping, the metrics window, the progress board's sender and the test-only fault hook."""

from __future__ import annotations

import pytest
import torch

from launcher.worker.loop_state import (
    Board,
    EarlyStopping,
    FaultHook,
    MetricsWindow,
    ResumeState,
    StepHook,
    step_hook,
)


def test_resume_state_reads_what_a_checkpoint_holds_and_skips_only_consumed_batches():
    # the client state a checkpoint carries, written out by hand
    held = {"epoch": 2, "step": 7, "next_epoch": 2, "next_micro": 3, "best_value": 0.5, "bad_evals": 1}
    state = ResumeState.from_dict(held)
    assert (state.step, state.next_epoch, state.next_micro, state.best_value, state.bad_evals) == (7, 2, 3, 0.5, 1)
    assert state.to_dict() == {**held, "epoch_micro": None}  # a checkpoint from before the count
    counted = {**held, "epoch_micro": 19}  # after the first whole epoch counted its micro-batches
    assert ResumeState.from_dict(counted).epoch_micro == 19 and ResumeState.from_dict(counted).to_dict() == counted
    assert [state.consumed(2, m) for m in range(5)] == [True, True, True, False, False]
    assert not state.consumed(1, 0) and not state.consumed(3, 0)
    fresh = ResumeState()
    assert not any(fresh.consumed(e, m) for e in (1, 2) for m in range(3))


def test_early_stopping_counts_evaluations_without_an_improvement_beyond_min_delta():
    es = EarlyStopping("max", {"patience": 2, "min_delta": 0.01})
    assert [es.update(v) for v in (0.5, 0.505, 0.52, 0.52, 0.51)] == [False, False, False, False, True]
    assert es.best == 0.52 and es.bad == 2
    assert "did not improve for 2 evaluations" in es.reason("f1")
    low = EarlyStopping("min", {"patience": 1, "min_delta": 0.0})
    assert [low.update(v) for v in (2.0, 1.5, 1.7)] == [False, False, True]
    assert low.best == 1.5


def test_without_early_stopping_the_best_is_tracked_and_training_never_stops():
    es = EarlyStopping("max", None)
    assert not any(es.update(v) for v in (0.9, 0.1, 0.1, 0.1, 0.1))
    assert es.best == 0.9 and es.bad == 4


def test_metrics_window_reports_mean_losses_median_step_and_all_ranks_throughput_then_resets():
    w = MetricsWindow()
    w.add_batch(4, 40, {"loss": torch.tensor(1.0), "l2_sp": torch.tensor(0.5)})
    w.add_batch(4, 60, {"loss": torch.tensor(3.0), "l2_sp": torch.tensor(1.5)})
    for t in (0.3, 0.1, 0.2):
        w.add_step_time(t)
    stats = w.read(world=2)
    assert stats["train_loss"] == pytest.approx(2.0)
    assert stats["train_loss_l2_sp"] == pytest.approx(1.0)
    assert stats["train_step_s"] == pytest.approx(0.2)
    assert stats["train_samples_per_s"] == pytest.approx(8 * 2 / 0.6)
    assert stats["train_tokens_per_s"] == pytest.approx(100 * 2 / 0.6)
    empty = w.read(world=2)
    assert empty["train_loss"] == 0.0 and empty["train_step_s"] == 0.0 and empty["train_samples_per_s"] == 0.0


class _Actor:  # stands in for the progress board actor: records what `push.remote` was called with
    def __init__(self):
        self.events = []
        self.push = self

    def remote(self, event):
        self.events.append(event)


def test_board_sends_from_rank_0_only_and_tags_the_trial():
    actor = _Actor()
    Board(actor, 1, "t0").push({"kind": "step"})
    assert actor.events == []
    Board(actor, 0, "t0").push({"kind": "step", "step": 3})
    assert actor.events == [{"trial": "t0", "kind": "step", "step": 3}]
    Board(None, 0, "").push({"kind": "step"})  # no board (a sweep trial without one): nothing to do


def test_fault_hook_comes_only_from_its_env_var_for_its_rank(monkeypatch, tmp_path):
    monkeypatch.delenv("ZEROSHIP_FAULT", raising=False)
    assert type(step_hook(0)) is StepHook
    monkeypatch.setenv("ZEROSHIP_FAULT", "hang:1:5")
    assert type(step_hook(0)) is StepHook
    hung = step_hook(1)
    assert isinstance(hung, FaultHook) and (hung.step, hung.marker) == (5, None)
    marker = tmp_path / "died"
    monkeypatch.setenv("ZEROSHIP_FAULT", f"0:3:{marker}")
    crash = step_hook(0)
    assert isinstance(crash, FaultHook) and (crash.step, crash.marker) == (3, str(marker))
    crash.after_step(2)  # not its step: returns
    marker.write_text("x")  # it already happened once: the restarted worker runs on
    assert type(step_hook(0)) is StepHook


def test_a_stretched_linear_schedule_is_continuous_and_ends_at_zero_at_the_last_step():
    import torch

    from launcher.worker.engine import Schedule

    for planned, exact, at in ((100, 130, 50), (100, 70, 50), (100, 100, 50), (40, 90, 3)):
        sched = Schedule("linear", 10, planned)
        before = sched(at)
        sched.stretch(at, exact)
        assert sched(at) == pytest.approx(before)  # no jump where the count became exact
        assert sched(exact) == 0.0 and sched(exact - 1) > 0.0  # 0 at the last step, not before
        peak = max(range(at, exact + 1), key=sched)  # a stretch inside the warmup stretches the warmup too
        assert all(sched(s) >= sched(s + 1) for s in range(peak, exact))
    # torch's LambdaLR drives it step by step, and its state_dict carries the stretch to a resumed run
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    sched = Schedule("linear", 0, 20)
    lr = torch.optim.lr_scheduler.LambdaLR(opt, sched)
    for _ in range(10):
        opt.step()
        lr.step()
    sched.stretch(10, 30)
    saved = lr.state_dict()
    resumed = Schedule("linear", 0, 20)  # as a restarted worker builds it, from the plan
    lr2 = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), resumed)
    lr2.load_state_dict(saved)
    assert [resumed(s) for s in range(10, 31)] == [sched(s) for s in range(10, 31)]
    while lr.last_epoch < 30:
        opt.step()
        lr.step()
    assert lr.get_last_lr()[0] == 0.0


def test_a_stretched_cosine_schedule_ends_at_zero_and_constant_stays_constant():
    from launcher.worker.engine import Schedule

    cos = Schedule("cosine", 0, 50)
    cos.stretch(25, 80)
    assert cos(25) == pytest.approx(0.5) and cos(80) == pytest.approx(0.0, abs=1e-12)
    const = Schedule("constant", 5, 50)
    const.stretch(20, 90)
    assert {const(s) for s in range(20, 100)} == {1.0}

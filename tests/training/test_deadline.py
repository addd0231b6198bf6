"""trainer.stop_before: a run stops on its own with a resumable interrupt checkpoint when the time left is
less than its last save, its longest step and a margin need; the resumed run ends as one never stopped."""

from __future__ import annotations

import time

import pytest
import torch

from noether.core.config import ConfigError
from noether.training.run import train
from noether.training.trainers.deadline import MARGIN_SECONDS, Deadline
from tests.conftest import tiny_config

CHECKPOINT = {"kind": "noether.core.callbacks.CheckpointCallback", "every_n_epochs": 1, "save_optim": True}


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_the_time_left_must_cover_the_last_save_the_longest_step_and_the_margin():
    clock = Clock(1000.0)
    deadline = Deadline(2000.0, clock)
    deadline.step_started()
    clock.now = 1050.0  # a 50 s step
    assert deadline.reason_to_stop(last_save_seconds=None) is None  # 950 s left, 80 s needed
    assert deadline.reason_to_stop(last_save_seconds=869.0) is None  # 950 >= 869 + 50 + 30
    reason = deadline.reason_to_stop(last_save_seconds=871.0)
    assert reason is not None and "950 s left, a save and a step need ~951 s" in reason
    deadline.step_started()
    clock.now = 1060.0  # a shorter step does not lower the estimate
    assert deadline.reason_to_stop(last_save_seconds=None) is None
    clock.now = 2000.0 - 50 - MARGIN_SECONDS + 1
    assert deadline.reason_to_stop(last_save_seconds=None) is not None


def test_slurm_reads_the_job_end_time(monkeypatch):
    end = int(time.time()) + 3600
    monkeypatch.setenv("SLURM_JOB_END_TIME", str(end))
    assert Deadline.from_config("slurm").end_time == end
    monkeypatch.delenv("SLURM_JOB_END_TIME")
    with pytest.raises(ConfigError, match="'slurm' needs SLURM_JOB_END_TIME"):
        Deadline.from_config("slurm")
    monkeypatch.setenv("SLURM_JOB_END_TIME", "Unknown")
    with pytest.raises(ConfigError, match="SLURM_JOB_END_TIME is 'Unknown', not a Unix time"):
        Deadline.from_config("slurm")


def test_a_deadline_that_has_passed_is_refused_before_training(tmp_path):
    with pytest.raises(ConfigError, match=r"trainer.stop_before: 20\d\d-.* UTC has passed"):
        train(tiny_config(tmp_path, stop_before=time.time() - 1))


def test_a_run_stops_before_its_deadline_with_an_interrupt_checkpoint_and_resumes_exactly(tmp_path, monkeypatch):
    whole = train(tiny_config(tmp_path / "whole", callbacks=[CHECKPOINT]))
    expected = torch.load(whole.checkpoint_dir / "classifier_cp=last_model.th", weights_only=True)["state_dict"]

    # less time left than the margin alone: the run stops after its first update
    monkeypatch.setenv("SLURM_JOB_END_TIME", str(int(time.time() + MARGIN_SECONDS / 2)))
    stopped = train(tiny_config(tmp_path / "stopped", callbacks=[CHECKPOINT], stop_before="slurm"))
    log = stopped.log_file.read_text()
    assert "stopping on the deadline" in log and "after update 1" in log
    interrupts = sorted(path.name for path in stopped.checkpoint_dir.glob("*signal_interrupt_trainer.th"))
    assert interrupts == ["classifier_cp=E0_U1_S128.signal_interrupt_trainer.th"]

    resumed = train(tiny_config(tmp_path / "stopped", callbacks=[CHECKPOINT]), resume="auto")
    again = torch.load(resumed.checkpoint_dir / "classifier_cp=last_model.th", weights_only=True)["state_dict"]
    assert expected.keys() == again.keys() and all(torch.equal(expected[key], again[key]) for key in expected)

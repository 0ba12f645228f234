"""The serial worker with a stand-in execute function: ordering, positions, cancel, bounds, owners."""

import threading
import time

import pytest

from zimage_ui.engine.jobs import ClientBusy, Job, JobCancelled, JobFailed, JobResult, JobState, QueueFull
from zimage_ui.engine.worker import SerialWorker
from zimage_ui.validation import RunRequest

from ..support import wait_until

REQ = RunRequest("x", "", "turbo", 4, 0.0, 256, 256, 1, 1)


class Gate:
    """An execute function that runs step by step only when the test lets it."""

    def __init__(self):
        self.release = threading.Event()
        self.started: list[str] = []

    def __call__(self, job: Job) -> JobResult:
        self.started.append(job.id)
        for step in range(1, job.request.steps + 1):
            if job.cancel_requested:
                raise JobCancelled(job.id)
            self.release.wait(5)
            job.mark_step(step, job.request.steps)
        return JobResult([], [job.request.seed], job.request, (), [], "t", "t", {}, 0)


@pytest.fixture
def gate():
    g = Gate()
    w = SerialWorker(g, max_queue=2, jobs_per_client=1)
    w.start()
    yield g, w
    g.release.set()
    w.stop(0)


def test_jobs_run_in_order_one_at_a_time(gate):
    g, w = gate
    jobs = [w.submit(Job(REQ))]
    wait_until(lambda: jobs[0].state == JobState.RUNNING)
    jobs += [w.submit(Job(REQ)) for _ in range(2)]
    assert [w.position(j) for j in jobs] == [0, 1, 2]
    g.release.set()
    for j in jobs:
        assert j.wait(5).seeds == [1]
    assert g.started == [j.id for j in jobs]


def test_queue_full_is_its_own_error(gate):
    g, w = gate
    first = w.submit(Job(REQ))
    wait_until(lambda: first.state == JobState.RUNNING)
    w.submit(Job(REQ))
    w.submit(Job(REQ))
    with pytest.raises(QueueFull) as info:
        w.submit(Job(REQ))
    assert info.value.retry_after_s >= 1


def test_cancel_queued_leaves_at_once_and_positions_move_up(gate):
    g, w = gate
    running = w.submit(Job(REQ))
    wait_until(lambda: running.state == JobState.RUNNING)
    second, third = w.submit(Job(REQ)), w.submit(Job(REQ))
    w.cancel(second)
    assert second.state == JobState.CANCELLED and w.position(third) == 1
    with pytest.raises(JobCancelled):
        second.wait(1)
    g.release.set()
    third.wait(5)
    assert second.id not in g.started


def test_cancel_running_stops_at_next_step(gate):
    g, w = gate
    job = w.submit(Job(REQ))
    wait_until(lambda: job.state == JobState.RUNNING)
    w.cancel(job)
    g.release.set()
    with pytest.raises(JobCancelled):
        job.wait(5)
    assert job.step < REQ.steps


def test_one_job_per_owner_and_cancel_owner(gate):
    g, w = gate
    w.submit(Job(REQ, owner="tab-a"))
    with pytest.raises(ClientBusy):
        w.submit(Job(REQ, owner="tab-a"))
    other = w.submit(Job(REQ, owner="tab-b"))
    assert w.cancel_owner("tab-b") == 1 and other.state == JobState.CANCELLED


def test_eta_is_known_once_the_timer_has_a_measurement(gate):
    g, w = gate
    running = w.submit(Job(REQ))
    wait_until(lambda: running.state == JobState.RUNNING)
    waiting = w.submit(Job(REQ))
    assert w.eta(waiting) is None
    w.timer.record(REQ, step_seconds=0.5, overhead_seconds=1.0)
    assert w.eta(waiting) == pytest.approx(2 * (4 * 0.5 + 1.0))
    assert "position 1" in w.status(waiting).text


def test_a_failing_job_does_not_kill_the_worker():
    calls = []

    def execute(job):
        calls.append(job.id)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return JobResult([], [1], job.request, (), [], "t", "t", {}, 0)

    w = SerialWorker(execute)
    w.start()
    try:
        bad, good = w.submit(Job(REQ)), w.submit(Job(REQ))
        with pytest.raises(JobFailed, match="boom"):
            bad.wait(5)
        assert good.wait(5).seeds == [1]
    finally:
        w.stop(0)


class Paced:
    """An execute function whose steps take ``step_s`` each (a machine faster than the timer has learnt)."""

    def __init__(self, step_s: float):
        self.step_s = step_s

    def __call__(self, job: Job) -> JobResult:
        for step in range(1, job.request.steps + 1):
            if job.cancel_requested:
                raise JobCancelled(job.id)
            time.sleep(self.step_s)
            job.mark_step(step, job.request.steps)
        return JobResult([], [job.request.seed], job.request, (), [], "t", "t", {}, 0)


def test_eta_follows_the_running_jobs_own_steps_not_the_learnt_average():
    """After a busy period the timer has learnt steps 10x slower than they now take: the running job's time left,
    and the queue's behind it, come from the steps it has measured, and count down between steps."""
    req = RunRequest("x", "", "turbo", 20, 0.0, 256, 256, 1, 1)
    w = SerialWorker(Paced(0.1), max_queue=2, jobs_per_client=1)
    w.timer.record(req, step_seconds=1.0, overhead_seconds=0.0)  # what the slow period taught it
    w.start()
    try:
        running = w.submit(Job(req))
        waiting = w.submit(Job(req))
        wait_until(lambda: running.step >= 6)
        asked = time.monotonic()
        eta_running, eta_waiting = w.eta(running), w.eta(waiting)
        countdown = []  # two readings within one step
        while not countdown and running.step < 18:
            step, first = running.step, w.eta(running)
            time.sleep(0.02)
            if running.step == step:
                countdown = [first, w.eta(running)]
        running.wait(10)
        truth_running = running.finished - asked
        waiting.wait(10)
        truth_waiting = waiting.finished - asked
    finally:
        w.stop(0)
    assert 0.5 * truth_running < eta_running < 2 * truth_running, (eta_running, truth_running)
    assert 0.5 * truth_waiting < eta_waiting < 2 * truth_waiting, (eta_waiting, truth_waiting)
    assert countdown and countdown[1] < countdown[0], countdown  # it counts down with time, not only at each step

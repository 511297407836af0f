"""The durable queue: order, atomic claims, cancel, crash recovery, event replay."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from graphflow.service.queue import CANCELLED, COMPLETED, FAILED, PENDING, RUNNING, JobQueue, NewJob


def job(priority: int = 0, models: tuple[str, ...] = ()) -> NewJob:
    return NewJob({"graphflow": 1, "nodes": {}}, {}, {}, priority=priority, models=models)


def test_jobs_are_claimed_by_priority_then_in_submit_order(tmp_path: Path) -> None:
    queue = JobQueue(tmp_path / "q.db")
    low, high_first, high_second = queue.submit([job(0)])[0], queue.submit([job(5)])[0], queue.submit([job(5)])[0]
    claimed = [queue.claim("w").id for _ in range(3)]  # type: ignore[union-attr]
    assert claimed == [high_first, high_second, low]
    assert queue.claim("w") is None


def test_a_worker_prefers_a_job_whose_models_it_holds_within_the_top_priority(tmp_path: Path) -> None:
    queue = JobQueue(tmp_path / "q.db")
    cold, warm, urgent = queue.submit([job(0, ("tiny:sdxl",)), job(0, ("tiny:sd15",))])[0:2] + \
        queue.submit([job(1, ("tiny:sdxl",))])
    assert queue.claim("w", held={"tiny:sd15"}).id == urgent  # type: ignore[union-attr]
    assert queue.claim("w", held={"tiny:sd15"}).id == warm  # type: ignore[union-attr]
    assert queue.claim("w", held={"tiny:sd15"}).id == cold  # type: ignore[union-attr]


def test_concurrent_claims_never_hand_out_one_job_twice(tmp_path: Path) -> None:
    queue = JobQueue(tmp_path / "q.db")
    ids = queue.submit([job() for _ in range(200)])
    taken: list[str] = []
    lock = threading.Lock()

    def claimer() -> None:
        while (claimed := queue.claim("w")) is not None:
            with lock:
                taken.append(claimed.id)

    threads = [threading.Thread(target=claimer) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(taken) == sorted(ids)


def test_cancel_pending_at_once_and_running_by_flag_of_that_job_only(tmp_path: Path) -> None:
    queue = JobQueue(tmp_path / "q.db")
    first, second, third = queue.submit([job(), job(), job()])
    assert queue.claim("w").id == first  # type: ignore[union-attr]
    assert queue.claim("w").id == second  # type: ignore[union-attr]
    assert queue.cancel(first).status == RUNNING  # type: ignore[union-attr]
    assert queue.cancel_requested(first) and not queue.cancel_requested(second)
    assert queue.cancel(third).status == CANCELLED  # type: ignore[union-attr]
    assert queue.claim("w") is None
    assert queue.cancel("nope") is None


def test_delete_and_clear_history_keep_running_and_pending_jobs(tmp_path: Path) -> None:
    queue = JobQueue(tmp_path / "q.db")
    done, running, pending = queue.submit([job(), job(), job()])
    queue.claim("w")
    queue.finish(done, COMPLETED, result="abc")
    queue.claim("w")
    assert queue.delete(running) == RUNNING and queue.get(running) is not None
    assert queue.clear_history() == 1
    assert queue.get(done) is None and queue.events(job_id=done) == []
    assert queue.delete(pending) == PENDING and queue.get(pending) is None


def test_events_replay_after_an_id_in_order(tmp_path: Path) -> None:
    queue = JobQueue(tmp_path / "q.db")
    [one] = queue.submit([job()])
    queue.claim("w")
    marks = [queue.add_event(one, "node_progress", {"step": step}) for step in range(5)]
    queue.finish(one, COMPLETED)
    replay = queue.events(after=marks[1], job_id=one)
    assert [event.kind for event in replay] == ["node_progress"] * 3 + ["job_completed"]
    assert [event.data.get("step") for event in replay[:3]] == [2, 3, 4]
    assert [event.kind for event in queue.events(job_id=one)][:2] == ["job_queued", "job_started"]


HOLDER = """
import sys, time
from graphflow.service.queue import JobQueue
queue = JobQueue(sys.argv[1])
job = queue.claim("doomed")
print(job.id, flush=True)
time.sleep(60)
"""


def test_kill_9_while_running_then_recover_marks_it_failed_and_pending_jobs_still_run(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    queue = JobQueue(path)
    first, second = queue.submit([job(), job()])
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == first
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    restarted = JobQueue(path)
    assert restarted.recover() == 1
    assert restarted.get(first).status == FAILED  # type: ignore[union-attr]
    assert "stopped" in restarted.get(first).error["message"]  # type: ignore[union-attr,index]
    assert restarted.get(second).status == PENDING  # type: ignore[union-attr]
    assert restarted.claim("w").id == second  # type: ignore[union-attr]


def test_recover_with_requeue_puts_running_jobs_back_in_front(tmp_path: Path) -> None:
    queue = JobQueue(tmp_path / "q.db")
    first, _ = queue.submit([job(), job()])
    queue.claim("w")
    assert JobQueue(tmp_path / "q.db").recover(requeue=True) == 1
    assert queue.claim("w").id == first  # type: ignore[union-attr]

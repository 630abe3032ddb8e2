"""Latest-only slot and worker thread: newest wins, replacements are counted, errors never stop the worker."""
import threading
import time

from sal_ros.nodes.stats import NodeStats, Throttle
from sal_ros.nodes.worker import LatestSlot, Worker


def test_slot_keeps_only_the_newest_and_counts_replacements():
    slot = LatestSlot()
    assert slot.put(1) is False
    assert slot.put(2) is True
    assert slot.put(3) is True
    assert slot.take(timeout=0) == (True, 3)
    assert slot.take(timeout=0) == (False, None)
    assert (slot.accepted, slot.replaced) == (3, 2)


def test_slot_close_wakes_a_waiting_taker():
    slot = LatestSlot()
    result = []
    taker = threading.Thread(target=lambda: result.append(slot.take(timeout=10)))
    taker.start()
    slot.close()
    taker.join(5)
    assert result == [(False, None)]


def test_worker_processes_newest_while_busy_and_survives_errors():
    started, gate = threading.Event(), threading.Event()
    done = {5: threading.Event(), 7: threading.Event()}
    seen, errors = [], []
    failed = threading.Event()

    def handle(item):
        if item == 0:
            started.set()
            gate.wait(10)  # busy on the first frame while more arrive
        if item == "boom":
            raise RuntimeError("bad frame")
        seen.append(item)
        if item in done:
            done[item].set()

    def on_error(exc):
        errors.append(exc)
        failed.set()

    worker = Worker("test_worker", handle, on_error).start()
    worker.submit(0)
    assert started.wait(5)
    dropped = sum(worker.submit(i) for i in range(1, 6))
    gate.set()
    assert done[5].wait(5)
    worker.submit("boom")
    assert failed.wait(5)
    worker.submit(7)  # the worker is still alive after the error
    assert done[7].wait(5)
    worker.stop()
    assert seen == [0, 5, 7]
    assert dropped == 4  # 2..5 each replaced a waiting frame
    assert worker.slot.replaced == 4
    assert [type(e) for e in errors] == [RuntimeError]


def test_stats_snapshot_and_throttle():
    stats = NodeStats(window=3)
    stats.count("processed")
    stats.count("error.model", 2)
    for ms in (1.0, 2.0, 30.0, 4.0):
        stats.time("total", ms)
    snap = stats.snapshot(extra=1)
    assert snap["counts"] == {"error.model": 2, "processed": 1}
    assert snap["timings"]["total"] == {"median_ms": 4.0, "p90_ms": 24.8, "max_ms": 30.0, "n": 3}
    assert "model=2" in stats.summary_line()
    throttle = Throttle(period_s=60)
    assert throttle.ready("a") and not throttle.ready("a") and throttle.ready("b")


def test_worker_setup_runs_on_its_thread_before_any_item():
    seen = []
    worker = Worker("model_thread", lambda item: seen.append((item, threading.current_thread().name)),
                    lambda exc: None, setup=lambda: seen.append(("setup", threading.current_thread().name)))
    worker.start()  # returns once setup is done
    assert seen == [("setup", "model_thread")]
    worker.submit("frame")
    for _ in range(100):
        if len(seen) == 2:
            break
        time.sleep(0.02)
    worker.stop()
    assert seen == [("setup", "model_thread"), ("frame", "model_thread")]


def test_worker_setup_error_is_raised_by_start_and_ends_the_thread():
    def broken():
        raise RuntimeError("checkpoint not found: x.pt")

    worker = Worker("model_thread", lambda item: None, lambda exc: None, setup=broken)
    try:
        worker.start()
    except RuntimeError as exc:
        assert "checkpoint not found" in str(exc)
    else:
        raise AssertionError("start() returned after a failed setup")
    worker._thread.join(2.0)
    assert not worker._thread.is_alive() and worker.slot.closed


def test_stop_does_not_wait_past_its_timeout_for_a_busy_item_and_waits_only_once():
    """Ctrl-C with a frame in the model: the node's shutdown must not wait for the model (launch escalates to
    SIGTERM after 5 s); the frame's late failure (its publishers destroyed) is not reported as an error."""
    import time

    release, errors = threading.Event(), []

    def handle(item):
        release.wait()
        raise RuntimeError("publisher destroyed")

    worker = Worker("sal_test_busy", handle, errors.append).start()
    worker.submit(1)
    assert worker.busy.wait(10)
    assert worker.stop(timeout=0.2) is False  # still in handle()
    t0 = time.monotonic()
    assert worker.stop(timeout=60) is False  # the second call (destroy_node) does not wait its 60 s again
    assert time.monotonic() - t0 < 30 and not release.is_set()
    release.set()
    worker._thread.join(10)
    assert not worker._thread.is_alive() and errors == []

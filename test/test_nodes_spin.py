"""Ctrl-C can shut the context down at any point of the executor's loop: spin_until_shutdown must end quietly
wherever it lands, and still raise real errors. The shutdown is placed deterministically inside wait-set
construction (after the executor's own context check) by a waitable that shuts the context down when counted."""
import threading

import pytest

from conftest import require_rclpy


def _shutting_waitable(node, when):
    from rclpy.waitable import NumberOfEntities, Waitable

    class ShutsDownWhenCounted(Waitable):
        """Counted by the executor after its context check, just before it builds the wait set."""

        def __init__(self):
            super().__init__(callback_group=node.default_callback_group)
            self.counted = 0

        def __enter__(self):
            return None

        def __exit__(self, *exc):
            return None

        def get_num_entities(self):
            self.counted += 1
            if self.counted == when:
                node.context.shutdown()
            return NumberOfEntities()

        def is_ready(self, wait_set):
            return False

        def take_data(self):
            return None

        async def execute(self, taken_data):
            return None

        def add_to_wait_set(self, wait_set):
            pass

    return ShutsDownWhenCounted()


@pytest.mark.parametrize("executor_kind", ["single", "multi"])
def test_shutdown_between_context_check_and_wait_ends_the_spin_quietly(executor_kind):
    rclpy = require_rclpy()
    from rclpy.executors import MultiThreadedExecutor, SingleThreadedExecutor
    from rclpy.impl.implementation_singleton import rclpy_implementation as _rclpy

    from sal_ros.tools.run import spin_until_shutdown

    def spin(guarded: bool):
        context = rclpy.Context()
        rclpy.init(context=context)
        node = rclpy.create_node(f"sal_spin_race_{'guarded' if guarded else 'bare'}", context=context)
        executor = (SingleThreadedExecutor if executor_kind == "single" else MultiThreadedExecutor)(context=context)
        waitable = _shutting_waitable(node, when=2)
        node.add_waitable(waitable)
        executor.add_node(node)
        try:
            done = threading.Event()
            result = {}

            def run():
                try:
                    spin_until_shutdown(executor) if guarded else executor.spin()
                except Exception as exc:  # noqa: BLE001 - the unguarded spin's error is what we look at
                    result["error"] = exc
                done.set()

            threading.Thread(target=run, daemon=True).start()
            assert done.wait(20), "spin did not end after the context was shut down"
            assert waitable.counted >= 2
            return result.get("error")
        finally:
            executor.shutdown()
            node.destroy_node()
            rclpy.try_shutdown(context=context)

    # What rclpy itself does: the race surfaces as an RCLError (the CI failure of `sal-ros run` on Ctrl-C) ...
    assert isinstance(spin(guarded=False), _rclpy.RCLError)
    # ... which spin_until_shutdown takes for the shutdown it is.
    assert spin(guarded=True) is None


def test_spin_until_shutdown_raises_when_the_context_is_still_up():
    rclpy = require_rclpy()
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.impl.implementation_singleton import rclpy_implementation as _rclpy

    from sal_ros.tools.run import spin_until_shutdown

    context = rclpy.Context()
    rclpy.init(context=context)
    executor = SingleThreadedExecutor(context=context)

    class BrokenSpin:  # a real executor whose spin fails for another reason while the context is fine
        context = executor.context

        @staticmethod
        def spin():
            raise _rclpy.RCLError("some other rcl failure")

    try:
        with pytest.raises(_rclpy.RCLError, match="other rcl failure"):
            spin_until_shutdown(BrokenSpin)
    finally:
        executor.shutdown()
        rclpy.try_shutdown(context=context)


HANGING_TEARDOWN = """
import ctypes, sys, time
import rclpy
from rclpy.node import Node
from rclpy.signals import SignalHandlerOptions
from sal_ros.tools.run import start_and_spin

class HangsOnDestroy(Node):
    def __init__(self):
        super().__init__("sal_hangs_on_destroy")
        self.create_timer(0.2, lambda: print("spinning", flush=True))

    def destroy_node(self):
        print("destroying", flush=True)
        if sys.argv[2] == "holds-gil":  # as rclpy's destroy_node inside Fast DDS did in CI: no Python thread runs
            ctypes.PyDLL(None).sleep(3600)
        time.sleep(3600)  # a teardown step that never returns (the CI saw a recorder ignore SIGINT for 5 s)

rclpy.init(signal_handler_options=SignalHandlerOptions.NO)
start_and_spin(lambda: [HangsOnDestroy()], "sal_hang_test", teardown_deadline_s=float(sys.argv[1]))
"""


@pytest.mark.parametrize("hang", ["releases-gil", "holds-gil"])
def test_a_teardown_step_that_hangs_cannot_keep_the_process_past_its_deadline(tmp_path, hang):
    """Ctrl-C ends the node process with 0 even when a teardown step never returns, and the log says where it
    was stuck: without the deadline this process would wait for SIGKILL. A step that holds the GIL stops every
    Python thread; the process still ends with 0, and faulthandler's stacks name the step."""
    import signal
    import subprocess
    import sys

    from conftest import REPO, wait_until

    require_rclpy()
    log = tmp_path / "log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-c", HANGING_TEARDOWN, "1.0", hang], stdout=out, stderr=subprocess.STDOUT,
                                cwd=REPO)
    try:
        wait_until(lambda: "spinning" in log.read_text(), "the node spinning", progress=lambda: log.stat().st_size,
                   check=lambda: proc.poll() is None or pytest.fail(log.read_text()))
        proc.send_signal(signal.SIGINT)
        wait_until(lambda: proc.poll() is not None, "the process to end after SIGINT",
                   progress=lambda: log.stat().st_size, stall_s=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert proc.returncode == 0, text
    assert "destroying" in text, text
    if hang == "releases-gil":
        assert "teardown not done 1 s after the shutdown signal, stuck in" in text, text
        assert "destroy_node" in text.split("stuck in", 1)[1], text  # names the step it was stuck in
    else:  # the Python timer could not run: faulthandler's dump names the step
        assert "teardown not done" not in text and "Timeout (0:00:01.400000)!" in text, text
        assert "in destroy_node" in text.split("Timeout", 1)[1], text

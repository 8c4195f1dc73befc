"""First contact: a request DDS never delivered is sent again (akidb_ros.ros.first_contact).

The loss is real here, not simulated: a request sent while no service exists has no matched
reader and is dropped by DDS, exactly like one sent before a new service's reader has matched
the client's writer (the race seen in a full test run).
"""
import threading
import time

import rclpy
from rclpy.context import Context
from rclpy.executors import SingleThreadedExecutor
from ros_support import NodeProcess

from akidb_ros.ros.cli import EmbeddingClient
from akidb_ros.ros.first_contact import FirstContact
from akidb_ros.srv import Embed, ListModels


def test_a_request_the_node_never_received_is_sent_again_and_answered():
    with EmbeddingClient('/first_contact', node_name='akidb_fc_client') as c:
        fc = c.clients['embed']
        assert isinstance(fc, FirstContact) and not fc.service_is_ready()
        fut = fc.call_async(Embed.Request(inputs=['sent before anyone listens']))
        node = NodeProcess(namespace='/first_contact')
        try:
            node.wait_ready()
            c.executor.spin_until_future_complete(fut, timeout_sec=30)
            assert fut.done(), node.output
            resp = fut.result()
            assert resp.success and resp.dimension == 384 and len(resp.embeddings) == 1
            assert fc.answered and fc.copies_sent >= 1
            assert not fc._calls                    # nothing left to re-send
            # after first contact a call is a plain rclpy call: nothing added to the hot path
            plain = fc.call_async(Embed.Request(inputs=['second call']))
            assert not fc._calls
            c.executor.spin_until_future_complete(plain, timeout_sec=30)
            assert plain.result().success
            sent = fc.copies_sent
            time.sleep(1.2)                         # no copy of an answered call goes out
            assert fc.copies_sent == sent
        finally:
            node.stop()


class _SlowListModels:
    """A real rclpy service (own context and thread) that answers each call after ``delay_s``."""

    def __init__(self, name: str, delay_s: float):
        self.context = Context()
        rclpy.init(context=self.context, args=[])
        self.node = rclpy.create_node('akidb_fc_slow_server', context=self.context)
        self.calls = 0
        self.delay_s = delay_s
        self.srv = self.node.create_service(ListModels, name, self._answer)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.running = True
        self.thread = threading.Thread(target=self._spin, daemon=True)
        self.thread.start()

    def _answer(self, request, response):
        self.calls += 1
        time.sleep(self.delay_s)
        response.default_model = f'answer {self.calls}'
        return response

    def _spin(self):
        while self.running and self.context.ok():
            self.executor.spin_once(timeout_sec=0.05)

    def close(self):
        self.running = False
        self.thread.join(5)
        self.executor.shutdown(timeout_sec=1)
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)


def _client(name: str):
    context = Context()
    rclpy.init(context=context, args=[])
    node = rclpy.create_node('akidb_fc_test_client', context=context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    return context, node, executor, node.create_client(ListModels, name)


def test_a_slow_first_answer_wins_once_and_a_withdrawn_call_stops_its_copies():
    server = _SlowListModels('/fc_slow/list_models', delay_s=0.8)
    context, node, executor, raw = _client('/fc_slow/list_models')
    try:
        assert raw.wait_for_service(timeout_sec=20)
        fc = FirstContact(raw, resend_s=0.2)
        # first contact made (a request sent right now could meet the race itself: its copy
        # would be answered out of turn), then re-armed: from here nothing is lost, only slow
        warm = fc.call_async(ListModels.Request())
        executor.spin_until_future_complete(warm, timeout_sec=20)
        assert warm.done() and fc.answered
        deadline = time.monotonic() + 20        # the warm-up's copies reach the server...
        while server.calls < 1 + fc.copies_sent and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(server.delay_s + 0.3)        # ...and the last one is answered (ignored)
        fc.reset()
        fc.copies_sent = 0
        n0 = server.calls
        fut = fc.call_async(ListModels.Request())
        second = fc.call_async(ListModels.Request())     # answered 0.8 s after the first
        executor.spin_until_future_complete(fut, timeout_sec=20)
        # the first copy was only slow: copies went out meanwhile, the first answer counts
        assert fut.result().default_model == f'answer {n0 + 1}'
        assert fc.copies_sent >= 1 and fc.answered
        # the service has matched us: the call still waiting sends no more copies (it would
        # have at 1.4 s), it only waits for its answer
        sent = fc.copies_sent
        executor.spin_until_future_complete(second, timeout_sec=20)
        assert second.result().default_model == f'answer {n0 + 2}'
        assert fc.copies_sent == sent and not fc._calls
        executor.spin_once(timeout_sec=3)       # later answers of the copies: ignored
        assert fut.result().default_model == f'answer {n0 + 1}'
        # a caller that gives up: no more copies, rclpy forgets the ones sent
        fc.reset()
        gone = fc.call_async(ListModels.Request())
        fc.forget(gone)
        sent = fc.copies_sent
        time.sleep(0.6)
        assert fc.copies_sent == sent and not fc._calls and not raw._pending_requests
        assert not gone.done()
    finally:
        executor.shutdown(timeout_sec=1)
        node.destroy_node()
        rclpy.try_shutdown(context=context)
        server.close()

"""The Ray data plane's links: messages arrive whole, in order, tensors bit
for bit in their dtype; a peer without the key is refused; hops are timed."""

from __future__ import annotations

import queue

import pytest
import torch

from compute.types import SamplingParams
from pipeline.channel import Inbox, Link
from pipeline.stage_loop import STOP
from pipeline.types import FreeSequence, Run

KEY = b"k" * 32


def test_messages_arrive_in_order_with_their_tensors_bit_for_bit():
    received: queue.SimpleQueue = queue.SimpleQueue()
    inbox = Inbox("127.0.0.1", KEY, received.put)
    link = Link(inbox.address, KEY)
    run = Run(7, 3, None, 10, (5, 6), True, SamplingParams(temperature=0.7, seed=1))
    tensors = [torch.randn(1, 3, 64), torch.randn(1, 2, 8).bfloat16(), torch.randn(2, 5).half(),
               torch.randn(4, 6)[:, ::2], torch.tensor(1.5), torch.empty(1, 0, 4)]
    sent = [[(run, t)] for t in tensors] + [FreeSequence(3), STOP]
    for message in sent:
        link.send(message)
    got = [received.get(timeout=10) for _ in sent]
    for message, back in zip(sent[:len(tensors)], got):
        assert back[0][0] == run
        assert back[0][1].dtype == message[0][1].dtype and torch.equal(back[0][1], message[0][1])
    assert got[-2:] == [FreeSequence(3), STOP]
    hops = inbox.hops.as_dict()
    assert hops["messages"] == len(sent) and 0 <= hops["wait_ms_p50"] <= hops["wait_ms_p99"] and hops["bytes_per_message"] > 0
    link.close()
    inbox.close()


def test_a_peer_without_the_key_is_refused():
    received: queue.SimpleQueue = queue.SimpleQueue()
    inbox = Inbox("127.0.0.1", KEY, received.put)
    with pytest.raises(Exception):  # multiprocessing's AuthenticationError, or the connection cut
        Link(inbox.address, b"x" * 32).send(STOP)
    good = Link(inbox.address, KEY)  # the inbox still takes the right peer
    good.send(STOP)
    assert received.get(timeout=10) == STOP
    with pytest.raises(queue.Empty):
        received.get(timeout=0.2)
    inbox.close()


def test_take_reads_on_the_calling_thread_from_every_connection_in_order():
    inbox = Inbox("127.0.0.1", KEY)
    first, second = Link(inbox.address, KEY), Link(inbox.address, KEY)  # a neighbour that reconnected
    first.send("a1")
    second.send("b1")
    first.send("a2")
    got = []
    while len(got) < 3:
        got += inbox.take()
    assert sorted(got) == ["a1", "a2", "b1"] and got.index("a1") < got.index("a2")
    first.close()  # a sender gone is dropped; the others go on
    second.send("b2")
    assert inbox.take() == ["b2"]
    inbox.close()
    assert inbox.take() == []
    second.close()

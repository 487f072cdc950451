"""EvaluateStage._commit when its transaction fails: the stage raises the error (the caller
recovers or stops), counts the transaction as failed, and leaves no send future whose failure
asyncio would later report as "Future exception was never retrieved", without a broker."""

from __future__ import annotations

import asyncio
import gc

from aiokafka import TopicPartition
from aiokafka.errors import ProducerFenced
from prometheus_client import CollectorRegistry

from armguard.daemon.engine import Output
from armguard.daemon.evaluate import EvaluateStage
from armguard.daemon.experiments import parse_experiments
from armguard.daemon.health import Health
from armguard.daemon.metrics import Metrics
from armguard.daemon.settings import Settings

EXPERIMENTS = parse_experiments(
    """
experiments:
  - id: a
    control: control
    arms: {control: 0.5, treatment: 0.5}
""",
    where="inline.yaml",
)


class _FencedProducer:
    """What _commit uses of AIOKafkaProducer, fenced as the transaction ends: every send's
    future fails, then the commit raises (as aiokafka does when a newer producer took over)."""

    def __init__(self) -> None:
        self.futures: list[asyncio.Future[None]] = []
        self.offsets_sent = False

    def transaction(self) -> _FencedProducer:
        return self

    async def __aenter__(self) -> _FencedProducer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for f in self.futures:
            f.set_exception(ProducerFenced())
        raise ProducerFenced()

    async def send(
        self, topic: str, value: bytes, *, key: bytes, partition: int | None = None, headers=None
    ):
        future = asyncio.get_running_loop().create_future()
        self.futures.append(future)
        return future

    async def send_offsets_to_transaction(self, offsets: dict, group_id: str) -> None:
        self.offsets_sent = True


async def _run_callbacks_scheduled_so_far() -> None:
    """Let the loop run every callback already scheduled (call_soon is FIFO)."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    loop.call_soon(done.set_result, None)
    await done


async def test_a_failed_transaction_raises_and_retrieves_its_sends_failures():
    loop = asyncio.get_running_loop()
    reported: list[dict] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    registry = CollectorRegistry()
    settings = Settings(kafka={"bootstrap_servers": "127.0.0.1:1"})
    stage = EvaluateStage(settings, EXPERIMENTS, Metrics(registry), Health())
    producer = _FencedProducer()
    stage._producers[0] = producer
    outputs = [
        Output("killswitch", b"a", b"{}", "kill"),
        Output("decisions", b"a", b"{}", "kill"),
        Output("state", b"a", b"{}"),
    ]
    try:
        raised = None
        try:
            await stage._commit(0, outputs, {TopicPartition("armguard.summaries", 0): 1})
        except ProducerFenced as exc:  # (not pytest.raises: its traceback would keep the futures)
            raised = type(exc)
        assert raised is ProducerFenced
        assert producer.offsets_sent and len(producer.futures) == 3
        assert all(f.done() for f in producer.futures)  # failed (not read here: that retrieves)
        failed = registry.get_sample_value(
            "armguard_transactions_total", {"stage": stage.name, "outcome": "failed"}
        )
        assert failed == 1.0
        # The futures' own record of an unretrieved failure: what asyncio reports when they go.
        producer.futures.clear()
        await _run_callbacks_scheduled_so_far()
        gc.collect()
        assert [c["message"] for c in reported] == []
    finally:
        loop.set_exception_handler(None)

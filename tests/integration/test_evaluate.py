"""The evaluate stage against the real broker: kill switch, operator commands, crashes, takeover.

The daemon runs as a real `armguard run` subprocess with ingest disabled; the tests write summary
records (the ingest stage's output format) to its summaries topic, so the input is exactly known.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import orjson
import pytest
from aiokafka.admin import AIOKafkaAdminClient

from armguard.daemon import commands as cmds
from armguard.daemon.kafka import ensure_topics
from armguard.daemon.settings import Settings
from tests.support.daemon import (
    HMAC_KEY,
    DaemonProcess,
    committed_total,
    produce,
    read_json,
    read_topic,
    topic_env,
    wait_for,
)
from tests.support.summaries import RANKER_EXPERIMENTS, regression_stream

pytestmark = pytest.mark.integration

EXPERIMENTS = RANKER_EXPERIMENTS


class Setup:
    def __init__(self, bootstrap, tmp_path, suffix):
        self.bootstrap = bootstrap
        self.suffix = suffix
        self.env = {**topic_env(suffix), "ARMGUARD_INGEST__ENABLED": "false"}
        tmp_path.mkdir(parents=True, exist_ok=True)
        self.experiments = tmp_path / "experiments.yaml"
        self.experiments.write_text(EXPERIMENTS)
        self.tmp = tmp_path
        t = {
            k.split("__", 1)[1].lower(): v
            for k, v in self.env.items()
            if k.startswith("ARMGUARD_TOPICS__")
        }
        t["telemetry"] = orjson.loads(t["telemetry"])
        self.topics = Settings(topics=t).topics
        self.group = self.env["ARMGUARD_EVALUATE__GROUP_ID"]
        self.daemons: list[DaemonProcess] = []

    async def create_topics(self):
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await admin.start()
        try:
            settings = Settings(topics=self.topics.model_dump())
            await ensure_topics(admin, settings, partitions=2, replication_factor=1)
        finally:
            await admin.close()

    def daemon(self, name="daemon") -> DaemonProcess:
        d = DaemonProcess(self.bootstrap, self.experiments, self.env, self.tmp / f"{name}.log")
        self.daemons.append(d)
        return d

    async def feed(self, records):
        await produce(self.bootstrap, self.topics.summaries, [(b"ranker", v) for v in records])

    async def processed(self, n):
        async def check():
            return await committed_total(self.bootstrap, self.group, self.topics.summaries) >= n

        await wait_for(check, f"the daemon to commit {n} summaries", limit_s=90)

    async def killswitch(self):
        return await read_json(self.bootstrap, self.topics.killswitch)

    async def decisions(self):
        return await read_json(self.bootstrap, self.topics.decisions)

    def cli(self, *args, timeout=60, key=HMAC_KEY):
        env = {
            **os.environ,
            "ARMGUARD_KAFKA__BOOTSTRAP_SERVERS": self.bootstrap,
            "ARMGUARD_COMMANDS__HMAC_KEY": key,
            **self.env,
        }
        return subprocess.run(
            [sys.executable, "-m", "armguard.daemon.cli", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def close(self):
        for d in self.daemons:
            if d.alive():
                d.proc.kill()
                d.proc.wait()


@pytest.fixture
async def setup(kafka_bootstrap, tmp_path, unique):
    s = Setup(kafka_bootstrap, tmp_path, unique)
    await s.create_topics()
    yield s
    s.close()


async def test_regression_kills_only_the_bad_arm_once_and_metrics_show_it(setup):
    d = setup.daemon().start()
    await asyncio.to_thread(d.wait_ready)
    records = regression_stream(21, n_batches=40, bad_arm="t1", start_batch_bad=5)
    await setup.feed(records)
    await setup.processed(len(records))

    events = await setup.killswitch()
    assert len(events) == 1
    ev = events[0]
    assert ev["type"] == "armguard.killswitch.v1" and ev["subject"] == "ranker"
    assert ev["data"]["arms"] == {"control": "running", "t1": "killed", "t2": "running"}
    assert ev["data"]["decision"]["arm"] == "t1"
    decisions = await setup.decisions()
    assert any(x["data"]["decision"]["shadow"] for x in decisions)
    assert all(x["data"]["decision"]["arm"] == "t1" for x in decisions)

    status, body = d.get("/metrics")
    assert status == 200
    text = body.decode()
    assert 'armguard_killswitch_events_total{action="kill",experiment="ranker"} 1.0' in text
    assert 'armguard_transactions_total{outcome="committed",stage="evaluate"}' in text
    assert "armguard_guardrail_state{" in text
    assert d.stop() == 0
    assert "armguard stopped" in d.log.read_text()


async def test_unusable_summaries_are_skipped_and_counted_not_silent(setup):
    d = setup.daemon().start()
    await asyncio.to_thread(d.wait_ready)
    records = regression_stream(23, n_batches=30, bad_arm="t1", start_batch_bad=5)
    bad = [
        b"not json",
        orjson.dumps({"v": 2, "experiment": "ranker", "arms": ["control"], "count": [1, 2]}),
        orjson.dumps({"v": 9, "experiment": "ranker"}),
    ]
    other = orjson.dumps({**orjson.loads(records[0]), "experiment": "not-configured"})
    # The unusable records sit among good ones; the good ones still decide.
    await setup.feed([*records[:3], *bad, other, *records[3:]])
    # A good record of the experiment under another key: it would make two owners.
    await produce(setup.bootstrap, setup.topics.summaries, [(b"not-ranker", records[5])])
    await setup.processed(len(records) + len(bad) + 2)
    assert [e["data"]["arms"]["t1"] for e in await setup.killswitch()] == ["killed"]

    status, body = d.get("/metrics")
    assert status == 200
    text = body.decode()
    summaries = setup.topics.summaries
    assert (
        f'armguard_records_skipped_total{{reason="invalid_summary",topic="{summaries}"}} 4.0'
        in text
    )
    assert (
        f'armguard_records_skipped_total{{reason="unknown_experiment",topic="{summaries}"}} 1.0'
        in text
    )
    assert d.stop() == 0
    assert "4 invalid and 1 of unknown experiments skipped" in d.log.read_text()


async def test_operator_commands_resume_override_and_forgery(setup):
    d = setup.daemon().start()
    await asyncio.to_thread(d.wait_ready)
    records = regression_stream(22, n_batches=60, bad_arm="t1", start_batch_bad=2)
    await setup.feed(records[:20])
    await setup.processed(20)
    assert [e["data"]["arms"]["t1"] for e in await setup.killswitch()] == ["killed"]

    # An operator resumes the arm: the daemon applies it and never undoes it.
    done = await asyncio.to_thread(
        setup.cli, "resume", "ranker", "--arm", "t1", "--reason", "fixed", "--user", "alice"
    )
    assert done.returncode == 0, done.stderr + done.stdout
    assert "applied" in done.stdout
    await setup.feed(records[20:])
    await setup.processed(60)
    states = [e["data"]["arms"]["t1"] for e in await setup.killswitch()]
    assert states == ["killed", "running"]

    # A forged command (wrong key) is rejected and audited, not applied.
    forged = cmds.sign(
        cmds.new_command("kill", "ranker", arm="t2", user="mallory", issued_at=time.time()),
        b"guess",
    )
    await produce(setup.bootstrap, setup.topics.commands, [(b"ranker", orjson.dumps(forged))])

    async def rejected():
        return [x for x in await setup.decisions() if x["data"].get("kind") == "command_rejected"]

    (rej,) = await wait_for(rejected, "the forged command to be audited")
    assert rej["data"]["reason"] == "bad_signature"
    assert [e["data"]["arms"]["t2"] for e in await setup.killswitch()] == ["running", "running"]
    assert not any(
        x["data"].get("decision", {}).get("operator", {})
        and x["data"]["decision"]["operator"].get("user") == "mallory"
        for x in await setup.decisions()
        if x["data"].get("kind") == "command"
    )

    # A CLI with the wrong key is rejected too, and says so; with the right key it applies.
    wrong = await asyncio.to_thread(
        setup.cli, "kill", "ranker", "--arm", "t2", "--user", "eve", key="nope"
    )
    assert wrong.returncode == 1 and "rejected: bad_signature" in wrong.stdout
    right = await asyncio.to_thread(setup.cli, "kill", "ranker", "--arm", "t2", "--user", "bob")
    assert right.returncode == 0 and "applied" in right.stdout
    status = await asyncio.to_thread(setup.cli, "status", "ranker")
    assert status.returncode == 0
    assert "t2=killed" in status.stdout and "error-proportion" in status.stdout
    assert d.stop() == 0


async def _run_uninterrupted(setup, records):
    d = setup.daemon("reference").start()
    await asyncio.to_thread(d.wait_ready)
    await setup.feed(records)
    await setup.processed(len(records))
    assert d.stop() == 0
    return await setup.killswitch(), await setup.decisions()


def _norm(events, suffix):
    """Events as bytes, with the run's topic-name suffix taken out (the runs use other topics)."""
    return [orjson.dumps(e).replace(suffix.encode(), b"<run>") for e in events]


@pytest.mark.slow
async def test_kill_9_at_ten_moments_gives_the_same_topics(kafka_bootstrap, tmp_path, unique):
    records = regression_stream(23, n_batches=50, bad_arm="t2", start_batch_bad=8, per_arm=300)
    ref = Setup(kafka_bootstrap, tmp_path / "ref", f"{unique}r")
    await ref.create_topics()
    try:
        expected_ks, expected_dec = await _run_uninterrupted(ref, records)
    finally:
        ref.close()
    assert len(expected_ks) == 1 and expected_dec

    s = Setup(kafka_bootstrap, tmp_path / "crash", f"{unique}c")
    await s.create_topics()
    try:
        chunks = [records[i : i + 5] for i in range(0, 50, 5)]
        for i, chunk in enumerate(chunks):
            d = s.daemon(f"run{i}").start()
            await asyncio.to_thread(d.wait_ready)
            await s.feed(chunk)
            if i % 2 == 0:
                # Kill while the chunk is being fetched or inside its transaction.
                d.kill9()
            else:
                # Kill right after the chunk's transaction committed.
                await s.processed(5 * (i + 1))
                d.kill9()
        final = s.daemon("final").start()
        await asyncio.to_thread(final.wait_ready)
        await s.processed(50)
        assert final.stop() == 0
        got_ks, got_dec = await s.killswitch(), await s.decisions()
    finally:
        s.close()
    assert _norm(got_ks, s.suffix) == _norm(expected_ks, ref.suffix)
    assert _norm(got_dec, s.suffix) == _norm(expected_dec, ref.suffix)
    assert len({e["id"] for e in got_dec}) == len(got_dec)


@pytest.mark.slow
async def test_two_instances_one_killed_the_other_takes_over(setup):
    records = regression_stream(24, n_batches=40, bad_arm="t1", start_batch_bad=10)
    a = setup.daemon("a").start()
    b = setup.daemon("b").start()
    await asyncio.gather(asyncio.to_thread(a.wait_ready), asyncio.to_thread(b.wait_ready))
    await setup.feed(records[:8])  # healthy part: state builds up on whichever owns "ranker"
    await setup.processed(8)
    assert await setup.killswitch() == []

    # Kill the instance that owns the experiment (the one exporting its guardrail state).
    def owns(d):
        return (
            "armguard_guardrail_state{" in d.get("/metrics")[1].decode()
            and 'experiment="ranker"' in d.get("/metrics")[1].decode()
        )

    owner, other = (a, b) if owns(a) else (b, a)
    assert owns(owner) and not owns(other)
    owner.kill9()
    b = other
    await setup.feed(records[8:])
    await setup.processed(40)
    events = await setup.killswitch()
    assert len(events) == 1 and events[0]["data"]["arms"]["t1"] == "killed"
    # The survivor restored the state: the decision rests on all 40 summaries' telemetry.
    tel = events[0]["data"]["offsets"]["telemetry"]
    assert tel and tel[0]["first"] == 0
    assert b.alive()
    assert b.stop() == 0


async def test_operator_override_silences_a_guardrail_until_it_expires(setup):
    d = setup.daemon().start()
    await asyncio.to_thread(d.wait_ready)
    now = time.time()
    # t2 regresses on errors only (latency healthy), from the first batch, in event time "now".
    records = regression_stream(25, n_batches=40, bad_arm="t2", lat_bad=1.0, t_start=now)
    for guardrail in ("error-proportion",):
        done = await asyncio.to_thread(
            setup.cli,
            "override",
            "ranker",
            "--guardrail",
            guardrail,
            "--duration",
            "60s",
            "--reason",
            "known noisy metric",
            "--user",
            "carol",
        )
        assert done.returncode == 0 and "applied" in done.stdout, done.stdout + done.stderr
    await setup.feed(records[:10])  # 50 s of event time: inside the override
    await setup.processed(10)
    assert await setup.killswitch() == []
    status = await asyncio.to_thread(setup.cli, "status", "ranker")
    assert "overridden" in status.stdout
    await setup.feed(records[10:])  # past the 60 s: the standing breach fires now
    await setup.processed(40)
    events = await setup.killswitch()
    assert len(events) == 1 and events[0]["data"]["arms"]["t2"] == "killed"
    assert events[0]["data"]["decision"]["guardrail"] == "error-proportion"
    assert d.stop() == 0


async def test_an_unreadable_snapshot_is_dead_lettered_and_the_kill_stands(setup):
    """A state snapshot the daemon cannot restore (corrupted, or written by a newer version
    after a roll-back) neither stops the stage at every restart nor silently resets the
    experiment: the kill stands, the snapshot goes to the dead-letter topic with the reason,
    and a readable snapshot replaces it."""
    records = regression_stream(25, n_batches=40, bad_arm="t1", start_batch_bad=5)
    a = setup.daemon("a").start()
    await asyncio.to_thread(a.wait_ready)
    await setup.feed(records[:30])
    await setup.processed(30)
    assert [e["data"]["arms"]["t1"] for e in await setup.killswitch()] == ["killed"]
    assert a.stop() == 0

    (*_, last) = await read_topic(setup.bootstrap, setup.topics.state)
    snap = orjson.loads(last.value)
    runners = snap["internal"]["runners"]
    runners[next(iter(runners))]["detector"] = {"broken": True}
    bad = orjson.dumps(snap)
    await produce(setup.bootstrap, setup.topics.state, [(b"ranker", bad)])

    b = setup.daemon("b").start()
    await asyncio.to_thread(b.wait_ready)

    async def dead_lettered():
        return [r for r in await read_topic(setup.bootstrap, setup.topics.deadletter)]

    (dl,) = await wait_for(dead_lettered, "the unreadable snapshot in the dead-letter topic")
    headers = dict(dl.headers)
    assert dl.key == b"ranker" and dl.value == bad
    assert headers["armguard.reason"] == b"unreadable_snapshot"
    assert headers["armguard.source.topic"] == setup.topics.state.encode()
    envelope = orjson.loads(headers["armguard.envelope"])
    assert envelope["source"]["offset"] == dl_offset(
        await read_topic(setup.bootstrap, setup.topics.state), bad
    )
    assert "KeyError" in envelope["detail"] and "kept: desired" in envelope["detail"]
    # The salvaged state was written back at once, readable, with the kill in it.
    (*_, latest) = await read_topic(setup.bootstrap, setup.topics.state)
    fresh = orjson.loads(latest.value)
    assert latest.value != bad and fresh["desired"]["arms"]["t1"] == "killed"

    await setup.feed(records[30:])
    await setup.processed(40)
    assert [e["data"]["arms"]["t1"] for e in await setup.killswitch()] == ["killed"]
    status, body = b.get("/metrics")
    assert status == 200
    state_topic = setup.topics.state
    assert (
        f'armguard_records_deadlettered_total{{reason="unreadable_snapshot",topic="{state_topic}"}}'
        " 1.0" in body.decode()
    )
    assert b.alive() and b.stop() == 0
    log = b.log.read_text()
    assert "the state snapshot of experiment ranker could not be restored (KeyError" in log


def dl_offset(state_records, value):
    (rec,) = [r for r in state_records if r.value == value]
    return rec.offset

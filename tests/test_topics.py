"""The project's topics exist with the configs they need, whoever created them first."""

from __future__ import annotations

import logging
import threading
import time

import pytest
from kafka import KafkaAdminClient
from kafka.admin import ConfigResource, ConfigResourceType, NewTopic

from recsys.settings import KafkaSettings, TopicSettings
from recsys.topics import ensure_topics, ensure_topics_when_reachable, topic_configs

pytestmark = pytest.mark.kafka


def _policy(bootstrap: str, topic: str) -> str:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        found = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic, {"cleanup.policy": None})], config_filter="all")
    finally:
        admin.close()
    (per_topic,) = found.values()
    entry = per_topic[topic]["cleanup.policy"]
    return entry["value"] if isinstance(entry, dict) else entry


def test_every_topic_is_created_and_candidates_is_compacted(kafka_bootstrap: str, unique: str, caplog: pytest.LogCaptureFixture) -> None:
    configs = topic_configs(TopicSettings(actions=f"a-{unique}", dlq=f"d-{unique}", user_updates=f"u-{unique}",
                                          items=f"i-{unique}", candidates=f"c-{unique}", popular=f"p-{unique}"),
                            KafkaSettings().tombstone_retention_ms)
    assert sorted(ensure_topics(kafka_bootstrap, configs, partitions=2)) == sorted(configs)
    assert _policy(kafka_bootstrap, f"c-{unique}") == "compact"
    assert _policy(kafka_bootstrap, f"a-{unique}") == "delete"
    # the tombstone retention the server's snapshot age is held to (serving/store.py)
    assert configs[f"c-{unique}"]["delete.retention.ms"] == str(KafkaSettings().tombstone_retention_ms)
    with caplog.at_level(logging.WARNING, logger="recsys.topics"):
        assert ensure_topics(kafka_bootstrap, configs, partitions=2) == []  # idempotent
    assert not caplog.records  # topics with the right configs are left alone
    with caplog.at_level(logging.WARNING, logger="recsys.topics"):
        assert ensure_topics(kafka_bootstrap, configs, partitions=4) == []  # a count raised later: said, not applied
    assert f"topic a-{unique} has 2 partitions, not kafka.partitions=4" in caplog.text


def test_a_candidates_topic_the_broker_auto_created_is_made_compacted(kafka_bootstrap: str, unique: str) -> None:
    topic = f"c-{unique}"
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        admin.create_topics([NewTopic(topic, 1, 1)])  # what a first send would have made
    finally:
        admin.close()
    assert _policy(kafka_bootstrap, topic) == "delete"
    assert ensure_topics_when_reachable(kafka_bootstrap, {topic: {"cleanup.policy": "compact"}}, partitions=1)
    assert _policy(kafka_bootstrap, topic) == "compact"


def test_a_config_the_broker_refuses_is_an_error_not_a_silent_plain_log(kafka_bootstrap: str, unique: str) -> None:
    topic = f"c-{unique}"
    ensure_topics(kafka_bootstrap, {topic: {}}, partitions=1)
    with pytest.raises(RuntimeError, match="could not set"):
        ensure_topics(kafka_bootstrap, {topic: {"cleanup.policy": "bogus"}}, partitions=1)


def test_waiting_for_a_broker_ends_when_told_to_stop() -> None:
    # A SIGTERM during the wait sets `stopping`: the backoff sleep (a minute here) must end then.
    stopping = threading.Event()
    threading.Timer(1.0, stopping.set).start()
    started = time.monotonic()
    assert not ensure_topics_when_reachable("localhost:1", {"x": {}}, 1, stopping=stopping,
                                            initial_s=60.0, attempt_s=0.5)
    assert time.monotonic() - started < 30.0


def test_a_topic_the_cluster_refuses_to_create_is_an_error_not_a_wait_for_ever(kafka_bootstrap: str, unique: str) -> None:
    """A replication factor above the brokers there are (`RECSYS_STREAMS__REPLICATION_FACTOR=3`
    on one broker): the process used to log "not usable yet" for ever, up and doing nothing."""
    from kafka.errors import InvalidReplicationFactorError

    stopping = threading.Event()
    bound = threading.Timer(60.0, stopping.set)  # a bound on the old code's wait: the test fails rather than hangs
    bound.start()
    try:
        with pytest.raises(InvalidReplicationFactorError):
            ensure_topics_when_reachable(kafka_bootstrap, {f"r-{unique}": {}}, 1, replication_factor=3, stopping=stopping,
                                         initial_s=0.1, max_s=0.2, refused_for_s=1.0)
    finally:
        bound.cancel()

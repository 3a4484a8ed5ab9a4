"""The project's Kafka topics and the configs they must have, made so by whoever starts first.

A topic left to the broker's auto-creation gets the broker's defaults: `candidates` would then
be a plain 7-day log instead of a compacted one, and a server started after a week would find
no list for a user who has one, and `items` would lose the catalogue a shard built later reads
from it. The local stack creates every topic up front; in a deployment (docker-compose) each
process makes sure of the topics it reads or writes before it touches a record: `recsys streams`
of `actions`, `actions.dlq` and `user-updates` (Faust creates only its changelog, and an
`actions` auto-created with the broker's partition count stops it: PartitionsMismatch), the
worker of `candidates`, `popular`, `items` and `items.dlq`, `recsys index --follow` of `items` and
`items.dlq`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Mapping

from recsys.settings import Settings, TopicSettings

log = logging.getLogger(__name__)

COMPACTED = {"cleanup.policy": "compact"}
POPULAR_KEY = "popular"  # key (and user_id) of the one `candidates`-format record on topics.popular


def topic_configs(t: TopicSettings, tombstone_retention_ms: int) -> dict[str, dict[str, str]]:
    """Every topic the project uses -> the configs it needs (beyond the broker's defaults)."""
    # Set, not left to the broker: the server refuses snapshots older than it (serving/store.py).
    compacted = {**COMPACTED, "delete.retention.ms": str(tombstone_retention_ms)}
    return {t.actions: {}, t.dlq: {}, t.user_updates: {}, t.items: dict(compacted), t.items_dlq: {},
            t.candidates: dict(compacted), t.popular: dict(compacted)}


def ensure_topics(bootstrap: str, configs: Mapping[str, Mapping[str, str]], partitions: int,
                  replication_factor: int = 1, *, timeout_s: float = 30.0) -> list[str]:
    """Create the topics of `configs` that are missing, and set the required configs of those
    that exist without them (a `candidates` the broker auto-created before this ran); returns
    the topics created."""
    from kafka import KafkaAdminClient
    from kafka.admin import ConfigResource, ConfigResourceType, NewTopic
    from kafka.errors import TopicAlreadyExistsError

    admin = KafkaAdminClient(bootstrap_servers=bootstrap.split(","), bootstrap_timeout_ms=int(timeout_s * 1000))
    try:
        existing = set(admin.list_topics())
        created = []
        for name, config in configs.items():
            if name in existing:
                continue
            try:
                admin.create_topics([NewTopic(name, partitions, replication_factor, topic_configs=dict(config))])
                created.append(name)
            except TopicAlreadyExistsError:  # a concurrent creator won the race
                existing.add(name)
        def wrong_configs() -> dict[str, dict[str, object]]:
            """Topic -> {key: value it has} for every required config it lacks."""
            checked = [ConfigResource(ConfigResourceType.TOPIC, name, dict.fromkeys(config))
                       for name, config in configs.items() if config and name in existing]
            if not checked:
                return {}
            # {resource type: {topic: {key: {"value": ...}}}}; the type's spelling varies by version
            found = {name: have for per_type in admin.describe_configs(checked, config_filter="all").values()
                     for name, have in per_type.items()}
            wrong = {}
            for resource in checked:
                have = found.get(resource.name, {})
                bad = {k: _value(have.get(k)) for k, v in configs[resource.name].items() if _value(have.get(k)) != v}
                if bad:
                    wrong[resource.name] = bad
            return wrong

        # Partitions are never changed here: adding some moves users to other partitions, whose
        # state (sequences, offsets) is elsewhere. Said, so that a raised setting is not taken for applied.
        older = [n for n in configs if n in existing and n not in created]
        for topic in admin.describe_topics(older) if older else ():
            have = len(topic.get("partitions") or ())
            if have and have != partitions:
                log.warning("topic %s has %d partitions, not kafka.partitions=%d: left as it is (set the count "
                            "before a deployment's first start)", topic.get("name", topic.get("topic")), have, partitions)
        wrong = wrong_configs()
        for name, bad in wrong.items():
            log.warning("topic %s has %s; setting %s", name, bad, {k: configs[name][k] for k in bad})
            admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, name, {k: configs[name][k] for k in bad})])
        if wrong and (still := wrong_configs()):  # alter_configs reports a refusal in its answer, not by raising
            raise RuntimeError(f"could not set the required topic configs (an ACL?): {still}")
        return created
    finally:
        admin.close()


def ensure_topics_when_reachable(bootstrap: str, configs: Mapping[str, Mapping[str, str]], partitions: int,
                                 replication_factor: int = 1, *, stopping: threading.Event | None = None,
                                 initial_s: float = 0.5, max_s: float = 10.0, attempt_s: float = 5.0,
                                 refused_for_s: float = 120.0) -> bool:
    """`ensure_topics`, waiting out a broker that is not up yet (a deployment starts its
    processes in any order); False if `stopping` was set first.

    Each attempt gives the broker `attempt_s` to answer and the wait between attempts ends as
    soon as `stopping` is set, so a SIGTERM while waiting is obeyed within seconds, inside
    docker's 10 s grace rather than after it. An answer Kafka calls final (a replication
    factor above the brokers there are, an ACL refusal) is raised once it has lasted
    `refused_for_s`: a starting KRaft broker gives the same answer for a few seconds (no
    broker registered yet), but a setting the cluster cannot meet would otherwise be waited on
    for ever, the process up and doing nothing, never restarted by its supervisor."""
    from kafka.errors import KafkaError

    stopping = stopping or threading.Event()
    delay = initial_s
    refused_since: float | None = None
    while not stopping.is_set():
        try:
            ensure_topics(bootstrap, configs, partitions, replication_factor, timeout_s=attempt_s)
            return True
        except KafkaError as exc:
            if getattr(exc, "retriable", True) is False:
                refused_since = refused_since if refused_since is not None else time.monotonic()
                if time.monotonic() - refused_since >= refused_for_s:
                    raise
            else:
                refused_since = None
            log.warning("Kafka at %s not usable yet (%s: %s); retrying in %.1f s", bootstrap, type(exc).__name__, exc, delay)
            stopping.wait(delay)
            delay = min(delay * 2, max_s)
    return False


def ensure_own_topics(settings: Settings, names: Iterable[str], stopping: threading.Event | None = None) -> bool:
    """`ensure_topics_when_reachable` for the named project topics, with their configs, the
    partition count and the replication factor the settings give."""
    configs = topic_configs(settings.topics, settings.kafka.tombstone_retention_ms)
    return ensure_topics_when_reachable(settings.kafka.bootstrap_servers, {name: configs[name] for name in names},
                                        settings.kafka.partitions, settings.streams.replication_factor, stopping=stopping)


def _value(entry: object) -> object:
    """A config's value from describe_configs' answer (a dict with "value", or the value)."""
    return entry.get("value") if isinstance(entry, dict) else entry

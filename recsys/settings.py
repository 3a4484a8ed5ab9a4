"""The one typed settings object for every component.

Values come, highest priority first, from: keyword arguments, environment variables
(`RECSYS_<SECTION>__<FIELD>`, e.g. `RECSYS_KAFKA__BOOTSTRAP_SERVERS=host:9092`), a TOML file
named by `RECSYS_CONFIG`, then the defaults below. Each section belongs to one component;
the README lists every field.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

CACHE_DIR = Path(os.environ.get("RECSYS_CACHE", Path.home() / ".cache" / "recsys"))


class Section(BaseModel):
    """One section of the settings. A key it does not have (a typo in RECSYS_SERVING__HOTS or in
    the TOML file) is an error: ignored, the setting would silently keep its default."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="before")
    @classmethod
    def _empty_is_not_unset(cls, value: object, info: ValidationInfo) -> object:
        # `RECSYS_SERVING__TLS_CERT=${CERT}` of an unset variable gives "": as a path it would be
        # ".", as a secret no secret. An optional setting is left out to be unset, never empty.
        if value == "" and type(None) in get_args(cls.model_fields[info.field_name].annotation):
            raise ValueError("empty: leave the setting out to unset it")
        return value


class KafkaSettings(Section):
    """The event log: where clients connect, and how the local broker is run."""

    bootstrap_servers: str = "localhost:9092"  # what every client connects to (localhost:<port> when only port is given)
    # 4.1 is the newest line the Python clients (aiokafka 0.14, kafka-python 3.0) are tested with.
    version: str = "4.1.1"
    scala_version: str = "2.13"  # Scala build of the kafka_<scala> artifact
    jars_dir: Path = CACHE_DIR / "kafka"  # downloaded broker classpath, shared across clones
    data_dir: Path = Path("var/kafka")  # KRaft log + pid file of the local broker
    port: int = 9092  # local broker's client listener (the clients follow it unless bootstrap_servers is set)
    controller_port: int = 9093  # local broker's KRaft controller listener
    heap: str = "-Xmx512m -Xms256m"  # the broker is small; the machine is shared
    start_timeout_s: float = 90.0  # until a metadata request succeeds
    partitions: int = Field(4, ge=1)  # partitions of the topics the project creates
    # kafka-python 3 was seen stuck forever after a group leader's second join (the inference
    # worker's and the items follower's consumers both guard against it):
    # commits refused as "rebalance in progress" this long replace the consumer with a fresh one
    rejoin_after_s: float = 30.0
    # A read to a topic's end (the items follower's catch-up) that gets no record this long
    # fails instead of waiting for ever on a broker that went away.
    read_stall_s: float = 30.0
    # How long the compacted topics keep a tombstone (their delete.retention.ms): a reader that
    # starts further behind than this, e.g. a server from an older snapshot, misses deletions.
    tombstone_retention_ms: int = Field(24 * 3600 * 1000, gt=0)

    @model_validator(mode="after")
    def _clients_follow_the_port(self) -> KafkaSettings:
        # Moving the local broker (RECSYS_KAFKA__PORT, as its "port in use" error suggests)
        # must move its clients too: they would go on reaching whatever answers on 9092.
        if "port" in self.model_fields_set and "bootstrap_servers" not in self.model_fields_set:
            self.bootstrap_servers = f"localhost:{self.port}"
        return self


class TopicSettings(Section):
    """Topic names (the data-flow diagram in the README)."""

    actions: str = "actions"  # raw action events (msgpack), key = user id
    dlq: str = "actions.dlq"  # rejected events with the reason and the original bytes
    user_updates: str = "user-updates"  # fresh sequence snapshots, key = user id
    candidates: str = "candidates"  # compacted per-user candidates, key = user id
    # compacted catalogue, key = item id: its latest record per item is the item (new shards read it all)
    items: str = "items"
    items_dlq: str = "items.dlq"  # refused `items` records, in the actions.dlq format
    # compacted: each surface's most popular eligible items as the vector store has them (the
    # server's fallback for unknown users), one `candidates`-format record, key "popular"
    popular: str = "popular"


class EventSettings(Section):
    """What a valid action event is; shared by the streams, the model and the worker."""

    surfaces: list[str] = ["home", "search", "related"]  # where actions happen; the model has one embedding per surface
    actions: list[str] = ["click", "save", "hide"]  # the outcome types
    max_event_bytes: int = 4096  # larger raw events go to the DLQ (checked before unpacking)
    max_id_length: int = 256  # string ids longer than this (utf-8 bytes) are rejected
    # events further ahead than this of the record's Kafka timestamp (or of the wall clock, if
    # sooner) are rejected; at most streams.lateness_ms (see Settings)
    max_future_ms: int = 5 * 60 * 1000
    # 1990-01-01: anything older is a unit mistake (seconds sent as ms); MovieLens starts 1995.
    min_ts_ms: int = 631_152_000_000
    max_fields: int = 64  # entries of any msgpack map / array in an event (unpack limit)
    max_nesting: int = 8  # nesting depth of values under unknown keys (kept, so bounded)


class StreamsSettings(Section):
    """The Faust app that keeps per-user sequences."""

    app_id: str = "recsys-streams"  # Faust app id = consumer group; names the changelog topic
    store: str = "memory://"  # table store; memory:// replays the changelog at start, rocksdb:// needs rocksdict
    data_dir: Path = Path("var/streams")  # Faust table state (rocksdb) and the worker's local files
    max_sequence_len: int = Field(50, ge=1)  # events kept per user
    max_age_ms: int = Field(90 * 24 * 3600 * 1000, ge=0)  # events older than this (vs the newest) fall off
    lateness_ms: int = Field(5 * 60 * 1000, ge=0)  # out-of-order events up to this old are inserted in order
    # users whose last event was folded this long ago leave the table and its changelog
    # (streams/forget.py; 0 = never): at max_age_ms their events would fall off behind a new one anyway
    forget_idle_ms: int = Field(90 * 24 * 3600 * 1000, ge=0)
    sweep_every_s: float = Field(600.0, ge=0)  # a sweep for idle users starts at most this often
    sweep_batch: int = Field(1000, ge=1)  # table keys a sweep examines per flush window
    # items a user hid (train.negative_actions) that stay out of their candidates after the
    # hide has left the sequence; the newest hides kept (the worker keeps as many of a record's:
    # give both the same value)
    max_hidden: int = Field(200, ge=0)
    flush_interval_s: float = Field(0.05, ge=0)  # user-updates are coalesced per user within this window
    max_batch_events: int = Field(5000, ge=1)  # a flush window also closes after this many events (binds only in catch-up: 100k events/s at 50 ms)
    delivery: str = "window"  # window: Faust's consumer hands `actions` over a window at a time (streams/delivery.py); stream: stock Faust per-event stream
    producer_max_batch_bytes: int = 512 * 1024  # producer batch per partition; Faust's 16 KiB default costs ~30% of ingest throughput
    web_host: str = "127.0.0.1"  # Faust's web server bind address (0.0.0.0 in containers)
    web_port: int = 6066  # Faust's web server (/metrics)
    broker_max_poll_records: int = 500  # lower avoids stuck consumers after rebalances
    session_timeout_s: float = 30.0  # a worker silent this long is dropped and its partitions reassigned
    # Static group membership (KIP-345): a worker restarted with the same id takes its partitions
    # back at once, without waiting out the session timeout. Unique per worker; None = dynamic.
    instance_id: str | None = None
    replication_factor: int = Field(1, ge=1)  # of every topic the processes create (changelog, actions, DLQs, user-updates, candidates, popular, items)
    dlq_max_key_bytes: int = 1024  # the DLQ record's Kafka key is the original key cut to this (its value says key_size, key_truncated); a key can be ~1 MiB
    dlq_max_original_bytes: int = 512 * 1024  # at most this much of the DLQ record's (cut) key + the original value (broker limit ~1 MiB)
    stats_interval_s: float = 30.0  # how often the worker logs its counters
    loglevel: str = "info"  # the worker's log level


class ModelSettings(Section):
    """The generative retriever's shape; saved inside every checkpoint and ONNX file."""

    dim: int = 64  # embedding width (items, queries)
    n_layers: int = 2  # transformer blocks
    n_heads: int = 2  # attention heads per block
    max_len: int = 50  # history tokens the model reads
    num_queries: int = 4  # M: generated embeddings per (surface, outcome)
    dropout: float = 0.2  # embeddings, attention, residual branches; ~0.5 suits tiny data sets
    item_mlp: bool = False  # residual MLP fusing id and content in the item tower (PinRec)
    head_mult: int = 4  # width of the query head's MLP, in multiples of dim
    init_temperature: float = 0.05  # initial softmax temperature of cosine scores (learned)


class TrainSettings(Section):
    """Training and offline evaluation of the generative retriever (`recsys train|evaluate`)."""

    out_dir: Path = Path("var/train")  # ckpt_best.pt (the final model), per stage <stage>_last.pt (resume) and _best.pt, curves PNGs, train.log
    seed: int = 0  # torch / numpy seeds: a run is reproducible on the same machine
    device: str = "auto"  # auto (cuda when present) | cuda | cpu
    num_threads: int = 2  # torch CPU threads; the dev machine has 2 shared cores
    amp: bool = True  # mixed precision: bf16 on CUDA cards and CPUs (AMX/AVX512-BF16) that have it, fp32 elsewhere
    epochs: int = 200  # upper bound; early stopping usually ends sooner
    batch_size: int = 128  # training windows per step
    lr: float = 1e-3  # peak AdamW learning rate
    min_lr: float = 1e-4  # cosine decay floor
    warmup_steps: int = 200  # linear warm-up
    weight_decay: float = 0.0  # on matrices only
    grad_clip: float = 1.0  # global gradient-norm clip (0 = off)
    # Targets per position: the next `window` engaged items (PinRec's future window). Every one
    # of the M query slots must get targets: with a window of 1 only slot 0 would ever train.
    window: int = 10
    # How the M query slots share the window: mixture (of softmaxes, each slot ranks alone and
    # the worker gives each an equal share of the list) | joint (one softmax over the logsumexp
    # of the slots' scores; the worker ranks the union of their hits by it) | offset (slot m:
    # m-th block; needs window >= M) | wta (each target trains its best slot)
    slots: str = "mixture"
    loss: str = "auto"  # full (softmax over every item) | sampled (in-batch + random, log-Q) | auto
    # auto picks the full softmax up to this catalogue size. A batch's logits are (batch_size x
    # max_len x M) x items floats: at the defaults 25,600 rows x 20k items = 2 GB (200k: 20 GB).
    full_softmax_max_items: int = 20_000
    n_negatives: int = 2048  # random negatives per step for the sampled softmax
    outcome_dropout: float = 0.25  # share of targets trained unconditioned (outcome 0)
    surface_dropout: float = 0.1  # share of targets trained with surface 0 ("any surface")
    id_dropout: float = 0.1  # share of items embedded from content only (needs features)
    negative_actions: list[str] = ["hide"]  # never targets; hard negatives when fine-tuning
    hard_negative_weight: float = 5.0  # a hard negative counts this many times in the softmax
    eval_every: int = 5  # epochs between validation runs
    # early stopping / best checkpoint on this validation metric: recall@K or ndcg@K
    eval_metric: str = Field("ndcg@10", pattern=r"^(recall|ndcg)@[1-9][0-9]*$")
    patience: int = 6  # validation runs without improvement before stopping
    eval_batch: int = 512  # users per evaluation batch
    max_minutes: float = 0.0  # stop training after this wall time, all stages together, resumed runs included (0 = no limit)
    finetune_epochs: int = 10  # per-surface fine-tuning of the head
    finetune_lr: float = 3e-4  # learning rate of per-surface fine-tuning
    datasets_dir: Path = Path("../shared/datasets")  # public data: benchmarks, and `recsys train/evaluate --dataset ml100k|beauty`


class InferenceSettings(Section):
    """The ONNX Runtime worker: from user-updates to candidates."""

    model_dir: Path = Path("var/model")  # user_model.onnx, item_encoder.onnx, items.npz, meta.json
    group_id: str = "recsys-inference"  # consumer group on user-updates; add workers to scale
    max_batch: int = Field(256, ge=1)  # users per micro-batch
    max_wait_ms: float = 10.0  # how long a micro-batch waits to fill
    # Users failing one after another with none served between: past this many the worker stops
    # (uncommitted) instead of skipping them, as for a batch whose users all fail
    max_failed_in_a_row: int = 20
    provider: str = "auto"  # auto | cuda | cpu
    # ONNX Runtime intra-op threads of the model's session (0 = one per core). 1: the worker
    # shares a few cores with Kafka, Faust and the server; one thread each measured better there.
    ort_threads: int = 1
    candidates_per_surface: int = 100  # top-N written per surface
    merge_cosine: float = 0.98  # generated embeddings closer than this are merged (not a joint model's)
    # Users whose model input has fewer events than this get one query per outcome (its first
    # generated embedding, the outcome's whole budget) instead of M: on MovieLens several queries
    # cost light users recall and pay off only for long histories. 0: every user gets M.
    # `python -m benchmarks.multitoken` picks it on validation users for each data set.
    multi_query_min_history: int = 0
    # Each ANN query asks for this many times its share of the budget (not the whole budget);
    # a surface whose merge ran past the end of a list that was cut is searched again in full.
    # (A joint model's queries always ask for the whole budget.)
    limit_headroom: float = 2.0
    # The headroom adapts to the model (inference/worker.py: next_headroom): doubled while too
    # many lists are searched again, back down slowly to limit_headroom while none is.
    limit_headroom_max: float = 16.0  # the most the adaptive headroom grows to
    max_short_share: float = 0.05  # share of a batch's lists searched again above which it doubles
    # A vector-store call that fails transiently (store down, connection refused, engine I/O
    # error) is retried with a doubling back-off; its batch waits uncommitted, so nothing is lost.
    store_retry_initial_s: float = 0.1  # first back-off after a failed vector-store call
    store_retry_max_s: float = 5.0  # cap of the doubling back-off between store retries
    # A history item the vector store does not know (deleted, or not indexed yet) encodes as a
    # zero vector and is not asked of the store again for this long: one store call per
    # micro-batch for the same unknown ids would cost a round-trip each time (a server backend).
    unknown_item_retry_s: float = 30.0
    # A history item indexed after the model's export is fetched from the vector store and kept
    # this long, then fetched again: such an item re-embedded from new content features reaches
    # the model's input within this time, not never. (An exported item re-embedded is replaced
    # at once by this process's items follower; not after a restart, nor by a separate indexer.)
    fetched_item_ttl_s: float = 300.0
    # Most fetched and unknown ids remembered at once (each kind; least recently used dropped
    # first), so the worker's memory stays bounded however many items arrive after export.
    fetched_items_max: int = 262_144
    # How often the worker publishes each surface's most popular eligible items (from the vector
    # store, so eligibility and popularity updates of the `items` topic count) to topics.popular.
    popular_every_s: float = 30.0
    # How often the worker (and an items follower) reads the store's catalogue marker: once another
    # `recsys index` starts on a shared store (it clears the marker first) or reloads it, they stop
    # within this long.
    catalogue_check_every_s: float = Field(5.0, gt=0)
    # Longest a worker may spend between polls (a batch waiting out a store outage) before the
    # group hands its partitions to another worker. A batch computed past it is not sent.
    max_poll_interval_s: float = Field(300.0, gt=0)
    # Each surface splits its budget across outcomes by its business goal. Set per surface
    # (RECSYS_INFERENCE__OUTCOME_WEIGHTS__HOME__SAVE=1 replaces home's whole); a configured
    # surface not given keeps its default, if it has one; a surface without weights aims at clicks.
    outcome_weights: dict[str, dict[str, float]] = {
        "home": {"save": 0.7, "click": 0.3},
        "search": {"click": 0.8, "save": 0.2},
        "related": {"click": 0.5, "save": 0.5},
    }


class VectorStoreSettings(Section):
    """Where item embeddings live and how they are searched."""

    backend: str = "edge"  # edge (embedded Qdrant Edge) | server (qdrant-client)
    path: Path = Path("var/qdrant")  # Qdrant Edge shard directory
    # Qdrant server URL, e.g. http://qdrant:6333 (backend=server); ":memory:" = local mode (tests)
    url: str | None = None
    api_key: str | None = None  # Qdrant server API key (backend=server)
    prefer_grpc: bool = True  # server: batch queries over gRPC are cheaper than REST/JSON
    timeout_s: int = 30  # server: per-request timeout
    collection: str = "items"  # server: the collection's name (an Edge shard is its path)
    # The HNSW and indexing settings are the collection's (or shard's) from its creation on:
    # changing them later does not change a store that exists.
    hnsw_m: int = 16  # HNSW graph degree
    hnsw_ef_construct: int = 100  # HNSW build-time beam width
    search_ef: int = 128  # HNSW ef at query time (at least the query's limit)
    exact_below: int = 20_000  # catalogues smaller than this are searched exactly
    # Edge below exact_below: search an in-RAM numpy copy with BLAS (false: ask Qdrant)
    numpy_exact: bool = True
    upsert_batch: int = 4096  # points per update call (bounds the request/WAL entry size)
    indexing_threshold_kb: int = 10_000  # Edge segments above this (KB) get HNSW on optimize()
    max_search_threads: int | None = None  # Edge search threads, Qdrant's pool and the exact path's (None = one per CPU)
    indexer_group_id: str = "recsys-indexer"  # group following `items`: this [+ "." + the Edge shard's id] + "." + the model version [+ "." + the load id]
    dead_letter_timeout_s: float = 30.0  # how long the items follower waits for items.dlq's acks before it stops
    indexer_poll_ms: int = 500  # how long one poll of `items` waits for records
    indexer_max_records: int = 512  # items embedded and upserted per batch
    optimize_every: int = 50_000  # new items before the follower rebuilds Edge's HNSW (0 = never)


class ServingSettings(Section):
    """The gRPC GetCandidates server (serving/): limits, fallback, security, processes."""

    host: str = "127.0.0.1"  # bind address; 0.0.0.0 / [::] to serve other machines
    port: int = 50051  # 0 = any free port (one worker only)
    group_id: str = "recsys-serving"  # client id prefix; the server reads all partitions, no group
    default_limit: int = 100  # candidates returned when a request says limit = 0
    max_limit: int = 500  # larger limits are INVALID_ARGUMENT; stored lists are cut to this
    max_batch: int = 100  # requests in one BatchGetCandidates; more is INVALID_ARGUMENT
    # LRU bound of the materialised store: ~4.8 KiB per user (3 x 100 items) + ~2.0 KiB per served
    # list, ~11 KiB a user whose three lists were served: ~5.2 GiB at the default (serving_memory.json)
    max_users: int = 500_000
    max_message_bytes: int = 1 << 20  # gRPC receive and send cap
    max_concurrent_rpcs: int = 1000  # more in flight at once get RESOURCE_EXHAUSTED
    max_streams_per_connection: int = 100  # HTTP/2 concurrent streams per client connection
    keepalive_time_ms: int = 60_000  # server pings idle connections to find dead peers
    fallback_size: int = 100  # popularity fallback list length per surface
    fallback_refresh_s: float = 10.0  # how often items.npz is checked for a newer model
    tls_cert: Path | None = None  # PEM; with tls_key turns TLS on
    tls_key: Path | None = None  # PEM private key of tls_cert
    auth_token: str | None = None  # when set, requests need `authorization: Bearer <token>` (an empty one is refused)
    workers: int = 1  # server processes sharing the port (SO_REUSEPORT); ~3k q/s per process
    uvloop: bool = True  # run the event loop on uvloop when installed (~15% less CPU per call)
    follow: bool = True  # read the `candidates` topic (False: serve a snapshot / fallback only)
    snapshot_path: Path | None = None  # load the store at start and follow `candidates` from where it was read to; save it at shutdown (1 worker; once caught up with the topics)
    poll_ms: int = 100  # how long one fetch of `candidates` waits for records
    poll_max_records: int = 500  # records applied per fetch (bounds time away from requests)
    apply_yield_every: int = Field(32, gt=0)  # records applied between two turns of the event loop's RPCs
    # follow `items` too: an item withdrawn from a surface leaves the lists already published
    # (else it stays in them until each of those users acts again)
    follow_items: bool = True
    max_fetch_bytes: int = 8 << 20  # Kafka fetch size cap per partition and per request
    metadata_retry_s: float = 1.0  # back-off after a failed fetch from Kafka
    metadata_refresh_ms: int = 5000  # how soon a newly created topic / partition is followed
    # after SIGTERM: health says NOT_SERVING but calls are answered this long (a load balancer
    # polling health moves away; e.g. above its probe period behind one), then refused
    drain_s: float = Field(0.0, ge=0)
    shutdown_grace_s: float = 5.0  # in-flight calls get this long after SIGTERM

    @field_validator("auth_token")
    @classmethod
    def _token_usable(cls, token: str | None) -> str | None:
        # An empty secret (`${TOKEN}` of an unset variable) would turn authentication off
        # without a word; one with whitespace (a mounted secret's newline) could never match.
        if token is not None and (not token or token != token.strip() or not token.isprintable()):
            raise ValueError("serving.auth_token must be non-empty printable text without surrounding "
                             "whitespace (unset it to serve without authentication)")
        return token


# RECSYS_* variables that are not settings: the config file, the cache of scripts/bootstrap.sh,
# the test suite's switches and the benchmarks' load generator.
RUN_SWITCHES = frozenset({"RECSYS_CONFIG", "RECSYS_CACHE", "RECSYS_SLOW_TESTS", "RECSYS_REQUIRE_COMPOSE",
                          "RECSYS_REQUIRE_OPENSSL", "RECSYS_GHZ"})


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="RECSYS_",
        env_nested_delimiter="__",
        toml_file=os.environ.get("RECSYS_CONFIG"),
        extra="forbid",  # an unknown TOML section; unknown variables: _known_sections and each Section
    )

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    topics: TopicSettings = Field(default_factory=TopicSettings)
    events: EventSettings = Field(default_factory=EventSettings)
    streams: StreamsSettings = Field(default_factory=StreamsSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    inference: InferenceSettings = Field(default_factory=InferenceSettings)
    vector_store: VectorStoreSettings = Field(default_factory=VectorStoreSettings)
    serving: ServingSettings = Field(default_factory=ServingSettings)

    @model_validator(mode="before")
    @classmethod
    def _known_sections(cls, data: object) -> object:
        # pydantic-settings ignores a variable whose section does not exist (RECSYS_KAFAK__PORT),
        # so the setting would silently keep its default; a misspelt field is caught by Section.
        unknown = sorted(k for k in os.environ
                         if k.upper().startswith("RECSYS_") and "__" in k and k[7:].split("__", 1)[0].lower() not in cls.model_fields)
        if unknown:
            raise ValueError(f"{', '.join(unknown)}: no such settings section (sections: {', '.join(cls.model_fields)})")
        # One underscore where two belong (RECSYS_KAFKA_PORT) is not a setting at all.
        stray = sorted(k for k in os.environ if k.upper().startswith("RECSYS_") and "__" not in k
                       and k.upper() not in RUN_SWITCHES)
        if stray:
            raise ValueError(f"{', '.join(stray)}: not a setting; settings are RECSYS_<SECTION>__<FIELD> "
                             f"(two underscores), e.g. RECSYS_KAFKA__PORT")
        return data

    @model_validator(mode="after")
    def _outcome_weights_per_surface(self) -> Settings:
        # Given weights replace the defaults surface by surface: a nested override used to
        # replace the whole map and leave search and related with none. Defaults go only to
        # configured surfaces, so a deployment with surfaces of its own gets none for the
        # default ones (the worker refuses weights for surfaces it does not serve).
        default = InferenceSettings.model_fields["outcome_weights"].default
        given = self.inference.outcome_weights if "outcome_weights" in self.inference.model_fields_set else {}
        weights = {s: default[s] for s in self.events.surfaces if s in default and s not in given} | given
        if weights != self.inference.outcome_weights:
            self.inference = self.inference.model_copy(update={"outcome_weights": weights})
        return self

    @model_validator(mode="after")
    def _future_within_lateness(self) -> Settings:
        # An accepted event up to max_future_ms ahead becomes the user's newest; with a shorter
        # lateness, the user's correctly timed events that follow would all be dead-lettered
        # as too late until the clock caught up with it.
        if self.events.max_future_ms > self.streams.lateness_ms:
            raise ValueError(f"events.max_future_ms ({self.events.max_future_ms}) must not exceed "
                             f"streams.lateness_ms ({self.streams.lateness_ms}): an event accepted from a "
                             "clock that runs ahead would make the user's next events too late")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if config := os.environ.get("RECSYS_CONFIG"):
            if not Path(config).is_file():  # pydantic-settings would read a missing file as empty
                raise FileNotFoundError(f"RECSYS_CONFIG={config}: no such file")
            sources.append(TomlConfigSettingsSource(settings_cls, config))
        return tuple(sources)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()


_BOUNDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


def _default_text(source: str, value: object) -> str:
    """A field's default as written (`1 << 20`, not 1048576: still readable, and the same on
    every machine), with a `Field(...)`'s bounds said after it instead of its call."""
    import ast

    if value is None:
        return ""
    if isinstance(value, ast.Call) and getattr(value.func, "id", None) == "Field" and value.args:
        bounds = [f"{_BOUNDS[k.arg]} {ast.get_source_segment(source, k.value)}" for k in value.keywords if k.arg in _BOUNDS]
        text = ast.get_source_segment(source, value.args[0]) or ""
        return text + (f" ({', '.join(bounds)})" if bounds else "")
    return ast.get_source_segment(source, value) or ""


def documented_fields() -> list[tuple[str, str, str]]:
    """(environment variable, default, the comment beside the field) for every setting.

    Read from this module's source, so the README table (`recsys config --markdown`) can
    never drift from the code; tests check the README lists every variable.
    """
    import ast
    import inspect
    import sys

    source = inspect.getsource(sys.modules[__name__])
    lines = source.splitlines()
    classes = {node.name: node for node in ast.parse(source).body if isinstance(node, ast.ClassDef)}
    rows: list[tuple[str, str, str]] = []
    for section, info in Settings.model_fields.items():
        node = classes[info.annotation.__name__]  # type: ignore[union-attr]
        for stmt in node.body:
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            text = "\n".join(lines[stmt.lineno - 1 : stmt.end_lineno])
            inline = text.rsplit("#", 1)[1].strip() if "  # " in text else ""
            first = stmt.lineno - 1  # and the whole comment block right above the field: its caveats
            while first > 0 and lines[first - 1].strip().startswith("#"):
                first -= 1
            block = " ".join(line.strip().lstrip("#").strip() for line in lines[first : stmt.lineno - 1])
            comment = " ".join(part for part in (block, inline) if part)
            default = _default_text(source, stmt.value)
            env = f"RECSYS_{section.upper()}__{stmt.target.id.upper()}"
            rows.append((env, " ".join((default or "").split()), comment))
    return rows

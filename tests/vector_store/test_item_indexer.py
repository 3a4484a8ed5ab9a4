"""The indexer's write path without Kafka: decoding `items` values, new vs known items, the
bulk load from items.npz (`recsys index`), and the ONNX item encoder's wiring."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any
from pathlib import Path

import msgpack
import numpy as np
import onnx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from vs_helpers import clustered
from onnx import TensorProto, helper, numpy_helper

from recsys.settings import VectorStoreSettings, get_settings
from vector_store import ItemRecord
from vector_store.edge import EdgeStore
from inference.runtime import MixedModelDirectory
from vector_store.indexer import (
    ITEM_REASONS,
    BadItemMessage,
    ItemMessage,
    ItemTable,
    OnnxItemEncoder,
    decode_item,
    index_item_table,
    index_items,
    load_table,
    main,
)

SURFACES = ("home", "search", "related")
DIM = 8


def _embed_by_id(items: Sequence[ItemMessage]) -> np.ndarray:
    """A stand-in item encoder: a fixed random vector per id (the model is not under test)."""
    rows = []
    for item in items:
        seed = abs(hash(str(item.item_id))) % 2**32
        rows.append(np.random.default_rng(seed).normal(size=DIM))
    return np.asarray(rows, dtype=np.float32)


def test_decode_item() -> None:
    value = msgpack.packb({"item_id": "sku-1", "features": [1, 2.5], "surfaces": ["home"],
                           "created_at": 1_700_000_000_000, "popularity": 3, "extra": "ignored"})
    want = ItemMessage("sku-1", (1.0, 2.5), ("home",), 1_700_000_000_000, 3.0)
    assert decode_item(value, 256) == want
    assert decode_item(msgpack.packb({"item_id": 7}), 256) == ItemMessage(7)  # popularity None: not sent
    assert decode_item(msgpack.packb({"item_id": "é" * 128}), 256) == ItemMessage("é" * 128)  # 256 bytes
    bad = [
        None, b"\xc1", msgpack.packb([1, 2]), msgpack.packb({"item_id": True}),
        msgpack.packb({"item_id": ""}), msgpack.packb({"item_id": "x" * 300}),
        msgpack.packb({"item_id": "   "}),  # blank, as streams refuses it
        msgpack.packb({"item_id": "é" * 130}),  # 130 characters but 260 bytes: over, as in streams
        msgpack.packb({"item_id": 1, "features": [1, "a"]}),
        msgpack.packb({"item_id": 1, "features": [float("nan")]}),
        msgpack.packb({"item_id": 1, "features": [1e39]}),  # finite, but inf in float32
        msgpack.packb({"item_id": 1, "surfaces": "home"}),
        msgpack.packb({"item_id": 1, "created_at": 1.5}),
        msgpack.packb({"item_id": 1, "created_at": 2**63}),  # a uint64: Qdrant's payload ints are int64
        msgpack.packb({"item_id": 1, "popularity": float("inf")}),
    ]
    for value in bad:
        with pytest.raises(BadItemMessage) as refused:
            decode_item(value, 256)
        assert refused.value.reason in ITEM_REASONS
    typo = msgpack.packb({"item_id": 1, "surfaces": ["home", "Search"]})
    assert decode_item(typo, 256).surfaces == ("home", "Search")  # no surfaces to check against
    with pytest.raises(BadItemMessage, match="Search") as refused:
        decode_item(typo, 256, SURFACES)  # it would be eligible on search nowhere
    assert refused.value.reason == "unknown surface"


_FEATURE = st.one_of(
    st.floats(width=64), st.integers(min_value=-(2**63), max_value=2**64 - 1), st.booleans(),
    st.sampled_from([3.4028234663852886e38, -3.4028234663852886e38, 3.4028235e38 * 1.0000001]),
    st.none(), st.text(max_size=2),
)


@given(st.lists(_FEATURE, max_size=8))
def test_features_are_refused_exactly_when_one_is_not_a_float32_number(features: list[object]) -> None:
    f32_max = float(np.finfo(np.float32).max)
    ok = all(type(f) in (int, float) and abs(f) <= f32_max for f in features)  # type: ignore[arg-type]
    value = msgpack.packb({"item_id": 1, "features": features})
    if ok:
        assert decode_item(value, 256).features == tuple(float(f) for f in features)  # type: ignore[arg-type]
    else:
        with pytest.raises(BadItemMessage, match="finite float32"):
            decode_item(value, 256)


def test_new_items_are_embedded_known_items_keep_their_vector(tmp_path: Path) -> None:
    with EdgeStore(VectorStoreSettings(path=tmp_path / "shard")) as store:
        # The collection need not exist yet: the first embedding fixes its width.
        first = [ItemMessage(1, popularity=0.5), ItemMessage("a", surfaces=("search",))]
        stats = index_items(store, first, _embed_by_id, SURFACES)
        assert (stats.embedded, stats.payload_only) == (2, 0)
        assert store.records([1])[1] == ItemRecord(1, SURFACES, 0, 0.5)  # missing surfaces = all
        v1 = store.retrieve([1])[1]

        def fail(items: Sequence[ItemMessage]) -> np.ndarray:
            raise AssertionError(f"{[i.item_id for i in items]} should not be re-embedded")

        # A known item without features: payload update only (later message per id wins).
        updates = [ItemMessage(1, popularity=0.7),
                   ItemMessage("1", surfaces=("home",), popularity=0.9)]
        stats = index_items(store, updates, fail, SURFACES)
        assert (stats.embedded, stats.payload_only) == (0, 1)
        assert store.records([1])[1] == ItemRecord("1", ("home",), 0, 0.9)
        np.testing.assert_allclose(store.retrieve([1])[1], v1, atol=1e-6)
        # With content features it is re-embedded, and whoever reads items as vectors is told.
        told: list[tuple[list[str], np.ndarray]] = []
        stats = index_items(store, [ItemMessage("a", features=(1.0,))],
                            lambda items: np.ones((len(items), DIM), np.float32), SURFACES,
                            on_embedded=lambda ids, vectors: told.append((ids, vectors)))
        assert stats.embedded == 1 and [ids for ids, _ in told] == [["a"]]
        np.testing.assert_allclose(store.retrieve(["a"])["a"], np.full(DIM, DIM**-0.5), atol=1e-6)
        assert store.count() == 2


def test_a_payload_update_leaves_a_vector_written_after_it_read_the_store(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process's bulk load (a new model) rewrites the item's vector between the
    follower's read and its write: the follower's payload-only update must not undo it."""
    with EdgeStore(VectorStoreSettings(path=tmp_path / "shard")) as store:
        index_items(store, [ItemMessage(1)], _embed_by_id, SURFACES)
        new = np.full((1, DIM), DIM**-0.5, np.float32)
        loaded: list[bool] = []
        for name in ("records", "retrieve"):
            def then_a_bulk_load(ids: Sequence[object], read: Any = getattr(store, name)) -> Any:
                found = read(ids)
                if not loaded:
                    loaded.append(True)
                    store.update_vectors([1], new)
                return found
            monkeypatch.setattr(store, name, then_a_bulk_load)
        stats = index_items(store, [ItemMessage(1, surfaces=("home",), popularity=0.7)], _embed_by_id, SURFACES)
        monkeypatch.undo()
        assert loaded and stats.payload_only == 1
        assert store.records([1])[1] == ItemRecord(1, ("home",), 0, 0.7)
        np.testing.assert_allclose(store.retrieve([1])[1], new[0], atol=1e-6)


def test_a_payload_update_in_the_same_poll_keeps_the_items_features(tmp_path: Path) -> None:
    """A new item's features, then a payload-only update for it: one poll or two, the vector
    is embedded from the features (not the featureless "unknown item" vector)."""
    def embed(items: Sequence[ItemMessage]) -> np.ndarray:
        out = np.zeros((len(items), DIM), np.float32)
        for row, item in zip(out, items, strict=True):
            row[0 if item.features else 1] = 1.0
        return out

    # ... and a record without a popularity after one with it keeps it, one poll or several.
    m = [ItemMessage("n", features=(1.0,), popularity=0.7), ItemMessage("n", popularity=0.4),
         ItemMessage("n", surfaces=("home",))]
    vectors = []
    for k, polls in enumerate(([m], [m[:1], m[1:]], [m[:2], m[2:]], [m[:1], m[1:2], m[2:]])):
        with EdgeStore(VectorStoreSettings(path=tmp_path / f"shard{k}")) as store:
            for batch in polls:
                index_items(store, batch, embed, SURFACES)
            vectors.append(store.retrieve(["n"])["n"])
            assert store.records(["n"])["n"] == ItemRecord("n", ("home",), 0, pytest.approx(0.4)), polls
    for v in vectors:
        np.testing.assert_allclose(v, vectors[0], atol=1e-6)
    assert vectors[0][0] == pytest.approx(1.0)


def test_a_follower_catching_up_indexes_the_state_a_live_one_would_reach() -> None:
    """CatchUp thins an item's records to its newest, carrying what older ones gave and the
    newest lacks: features from one, the last popularity from another."""
    from types import SimpleNamespace

    from vector_store.indexer import CatchUp

    messages = [ItemMessage("x", features=(1.0,), popularity=5.0), ItemMessage("x", popularity=9.0),
                ItemMessage("x", surfaces=("home",)), ItemMessage("y", surfaces=("search",))]
    records = [SimpleNamespace(partition=0, offset=k, key=str(m.item_id).encode(), value=m)
               for k, m in enumerate(messages)]
    catch_up = CatchUp.scan(records, lambda rec: rec.value)
    got = [catch_up.thin(rec, rec.value) for rec in records]
    want_x = ItemMessage("x", features=(1.0,), surfaces=("home",), popularity=9.0)
    assert got == [want_x, None, ItemMessage("x", surfaces=("home",), popularity=9.0), messages[3]]
    live = SimpleNamespace(partition=0, offset=9, key=b"x", value=ItemMessage("x"))
    assert catch_up.thin(live, live.value) == ItemMessage("x")  # past the range: as it came


def test_a_follower_restarted_mid_catch_up_keeps_a_superseded_records_popularity() -> None:
    """An item's popularity on a record superseded by a newer one without it: thinning skipped
    that record, a commit passed it, and after a restart the newest alone was indexed, the
    popularity lost (a live follower keeps it). Now it is indexed at that record's offset."""
    from types import SimpleNamespace

    from vector_store.indexer import CatchUp

    messages = [ItemMessage("x", popularity=5.0), ItemMessage("y", features=(2.0,)), ItemMessage("x", surfaces=("home",))]
    records = [SimpleNamespace(partition=0, offset=k, key=str(m.item_id).encode(), value=m)
               for k, m in enumerate(messages)]
    catch_up = CatchUp.scan(records, lambda rec: rec.value)
    final_x = ItemMessage("x", surfaces=("home",), popularity=5.0)
    assert [catch_up.thin(rec, rec.value) for rec in records] == [final_x, messages[1], final_x]
    # Never an older record's features, which the newer ones replaced (a state the item never
    # had): the popularity goes with the newest's own features there, the final state with the
    # last features at their record.
    messages = [ItemMessage("z", features=(1.0,), popularity=5.0), ItemMessage("z", features=(2.0,)),
                ItemMessage("z", surfaces=("home",))]
    records = [SimpleNamespace(partition=0, offset=k, key=b"z", value=m) for k, m in enumerate(messages)]
    catch_up = CatchUp.scan(records, lambda rec: rec.value)
    assert [catch_up.thin(rec, rec.value) for rec in records] == [
        ItemMessage("z", surfaces=("home",), popularity=5.0), ItemMessage("z", features=(2.0,), surfaces=("home",), popularity=5.0),
        ItemMessage("z", surfaces=("home",), popularity=5.0)]
    messages = [ItemMessage("w", features=(1.0,), popularity=5.0), ItemMessage("w", features=(2.0,))]  # newest has features
    records = [SimpleNamespace(partition=0, offset=k, key=b"w", value=m) for k, m in enumerate(messages)]
    catch_up = CatchUp.scan(records, lambda rec: rec.value)
    final_w = ItemMessage("w", features=(2.0,), popularity=5.0)
    assert [catch_up.thin(rec, rec.value) for rec in records] == [final_w, final_w]


def _write_model(model_dir: Path, n: int, n_features: int, *, version: str = "v1", seed: int = 9) -> ItemTable:
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "meta.json").write_text(json.dumps({"version": version}), encoding="utf-8")
    ids = np.array([f"i{k}" for k in range(n)])
    emb = clustered(n, DIM, seed=seed)
    pop = np.linspace(1, 0, n, dtype=np.float32)
    np.savez(model_dir / "items.npz", ids=ids, embeddings=emb, popularity=pop,
             features=np.zeros((n, n_features), np.float32))
    return ItemTable([str(i) for i in ids], emb, pop)


def test_bulk_load_keeps_eligibility_learned_from_the_topic_and_takes_the_table_s_popularity(tmp_path: Path) -> None:
    table = _write_model(tmp_path / "model", 300, 0)
    with EdgeStore(VectorStoreSettings(path=tmp_path / "shard", upsert_batch=64)) as store:
        store.ensure_collection(DIM)
        store.upsert([ItemRecord("i3", ("search",), 5, 0.01)], np.ones((1, DIM), np.float32))
        assert index_item_table(store, table, SURFACES) == 300
        assert store.count() == 300
        assert store.records(["i3"])["i3"] == ItemRecord("i3", ("search",), 5, pytest.approx(table.popularity[3]))
        np.testing.assert_allclose(store.retrieve(["i3"])["i3"], table.embeddings[3], atol=1e-6)
        want = ItemRecord("i4", SURFACES, 0, pytest.approx(table.popularity[4]))
        assert store.records(["i4"])["i4"] == want
        (hits,) = store.query_batch(table.embeddings[10:11], 1)
        assert hits[0][0] == "i10"


def test_a_retrained_model_s_load_brings_its_popularity(tmp_path: Path) -> None:
    """The `popular` lists (the fallback of unknown users) come from the store's popularity: a
    retrained model's counts must replace the first model's, not be kept for good."""
    with EdgeStore(VectorStoreSettings(path=tmp_path / "shard")) as store:
        vectors = np.eye(3, DIM, dtype=np.float32)
        index_item_table(store, ItemTable(["a", "b", "c"], vectors, np.array([100, 10, 1], np.float32)), SURFACES)
        index_item_table(store, ItemTable(["a", "b", "c"], vectors, np.array([1, 10, 100], np.float32)), SURFACES)
        assert [i for i, _ in store.top_popular("home", 3)] == ["c", "b", "a"]


def test_an_items_record_without_popularity_keeps_the_stored_one(tmp_path: Path) -> None:
    """The new model's follower replays `items` after its load: records that never carry a
    popularity (a catalogue feed without counts) must not reset the load's to 0."""
    with EdgeStore(VectorStoreSettings(path=tmp_path / "shard")) as store:
        index_item_table(store, ItemTable(["a", "b"], np.eye(2, DIM, dtype=np.float32), np.array([7, 9], np.float32)),
                         SURFACES)
        updates = [ItemMessage("a", surfaces=("home",)), ItemMessage("b", features=(1.0,)), ItemMessage("new"),
                   ItemMessage("b", surfaces=("search",), features=(1.0,), popularity=2.0)]
        stats = index_items(store, updates[:3], _embed_by_id, SURFACES)
        assert (stats.embedded, stats.payload_only) == (2, 1)
        got = store.records(["a", "b", "new"])
        assert [got[i].popularity for i in ("a", "b", "new")] == [7, 9, 0]
        assert got["a"].surfaces == ("home",)
        index_items(store, updates[3:], _embed_by_id, SURFACES)  # a record that says it: taken
        assert store.records(["b"])["b"] == ItemRecord("b", ("search",), 0, 2.0)


@pytest.fixture
def index_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, VectorStoreSettings]]:
    """`recsys index` (`main`) pointed at a model directory and an Edge shard of the test's own."""
    model_dir, shard = tmp_path / "model", VectorStoreSettings(path=tmp_path / "shard")
    monkeypatch.setenv("RECSYS_VECTOR_STORE__PATH", str(shard.path))
    monkeypatch.setenv("RECSYS_INFERENCE__MODEL_DIR", str(model_dir))
    get_settings.cache_clear()
    yield model_dir, shard
    get_settings.cache_clear()


def test_recsys_index_loads_each_model_table_once_and_wholly(index_dirs: tuple[Path, VectorStoreSettings]) -> None:
    model_dir, shard = index_dirs

    def stored_i7() -> np.ndarray:
        with EdgeStore(shard) as store:
            return store.retrieve(["i7"])["i7"]

    # A load cut short (or the follower's upserts before any load): points, no marker.
    first = _write_model(model_dir, 50, 0)
    with EdgeStore(shard) as store:
        index_item_table(store, ItemTable(first.ids[:10], first.embeddings[:10], first.popularity[:10]), SURFACES)
    assert main([]) == 0
    with EdgeStore(shard) as store:
        assert store.count() == 50 and store.catalogue_version() == "v1"
    # The same model again: no second load, even if its file changed under it.
    _write_model(model_dir, 50, 0, seed=10)
    assert main([]) == 0
    np.testing.assert_allclose(stored_i7(), first.embeddings[7], atol=1e-6)
    # A new model's export: loaded, though the store is full.
    second = _write_model(model_dir, 50, 0, version="v2", seed=11)
    assert main([]) == 0
    np.testing.assert_allclose(stored_i7(), second.embeddings[7], atol=1e-6)
    assert main(["--reindex"]) == 0
    # A newer model whose vocabulary lost items: their v2 vectors, from another space, go.
    third = _write_model(model_dir, 30, 0, version="v3", seed=12)
    assert main([]) == 0
    with EdgeStore(shard) as store:
        assert store.count() == 30 and store.catalogue_version() == "v3"
        assert sorted(store.item_ids()) == sorted(third.ids)
        (hits,) = store.query_batch(second.embeddings[40:41], 50)
        assert "i40" not in {i for i, _ in hits}


def test_a_roll_back_after_a_load_cut_short_removes_the_other_model_s_items(index_dirs: tuple[Path, VectorStoreSettings]) -> None:
    """A new model's load dies after writing some of its items; the operator goes back to the
    model before it. The marker of that load is gone, but the store knows which model began it:
    its items leave (else they are served with vectors from another space). A cut-short load of
    the same model keeps the items outside its table: its own follower embedded them."""
    model_dir, shard = index_dirs
    first = _write_model(model_dir, 20, 0, version="v1")
    assert main([]) == 0
    with EdgeStore(shard) as store:  # v2's load, cut short after its new item "z"
        store.mark_catalogue(None, loading="v2")
        store.upsert([ItemRecord("z", SURFACES)], first.embeddings[:1])
    assert main([]) == 0  # v1 again
    with EdgeStore(shard) as store:
        assert store.catalogue_version() == "v1" and store.catalogue_loading() is None
        assert sorted(store.item_ids()) == sorted(first.ids)
        # v1's own load cut short, after its follower had embedded a new item "f"
        store.mark_catalogue(None, loading="v1")
        store.upsert([ItemRecord("f", SURFACES)], first.embeddings[:1])
    assert main([]) == 0
    with EdgeStore(shard) as store:
        assert store.catalogue_version() == "v1" and "f" in store.item_ids()


def test_a_load_cut_short_while_dropping_the_other_model_s_items_is_not_taken_for_it(
    index_dirs: tuple[Path, VectorStoreSettings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """v2's load dies after deleting the v1 items its table lacks, before writing anything: the
    marker named v1 as wholly loaded, so going back to v1 skipped its load and served a
    catalogue short of those items for good. Now v1 is loaded again, and v2's restart drops
    them again."""
    model_dir, shard = index_dirs
    first = _write_model(model_dir, 20, 0, version="v1")
    assert main([]) == 0
    second = _write_model(model_dir, 12, 0, version="v2", seed=5)

    def load_dying_after_the_first_delete() -> None:
        with EdgeStore(shard) as store, pytest.raises(OSError, match="died"):
            real_delete = store.delete

            def dies_after_deleting(ids: list[str]) -> None:
                real_delete(ids)
                raise OSError("died")
            monkeypatch.setattr(store, "delete", dies_after_deleting)
            load_table(store, ItemTable.load(model_dir), "v2", SURFACES)

    load_dying_after_the_first_delete()
    with EdgeStore(shard) as store:
        assert store.catalogue_version() is None and store.count() == 12
    _write_model(model_dir, 20, 0, version="v1")  # the roll-back
    assert main([]) == 0
    with EdgeStore(shard) as store:
        assert store.catalogue_version() == "v1" and sorted(store.item_ids()) == sorted(first.ids)
    _write_model(model_dir, 12, 0, version="v2", seed=5)
    load_dying_after_the_first_delete()  # v2 again, cut short again
    assert main([]) == 0  # v2's restart
    with EdgeStore(shard) as store:
        assert store.catalogue_version() == "v2" and sorted(store.item_ids()) == sorted(second.ids)


def _tiny_encoder(path: Path, table: np.ndarray, w: np.ndarray) -> None:
    """item_emb = table[id_bucket] + features @ w: the encoder's contract, in four nodes."""
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "id_bucket"], ["by_id"], axis=0),
            helper.make_node("MatMul", ["features", "w"], ["by_content"]),
            helper.make_node("Add", ["by_id", "by_content"], ["item_emb"]),
        ],
        "item_encoder",
        [helper.make_tensor_value_info("id_bucket", TensorProto.INT64, ["N"]),
         helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", w.shape[0]])],
        [helper.make_tensor_value_info("item_emb", TensorProto.FLOAT, ["N", table.shape[1]])],
        initializer=[numpy_helper.from_array(table, "table"), numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)


def test_onnx_item_encoder(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    table = rng.normal(size=(5, DIM)).astype(np.float32)
    w = rng.normal(size=(3, DIM)).astype(np.float32)
    _tiny_encoder(tmp_path / "item_encoder.onnx", table, w)
    buckets = {"known": 2}
    encoder = OnnxItemEncoder(tmp_path, lambda ids: np.array([buckets.get(str(i), 0) for i in ids]))
    assert encoder.feature_dim == 3
    out = encoder([ItemMessage("known"), ItemMessage("new", features=(1.0, 0.0, 2.0))])
    np.testing.assert_allclose(out[0], table[2], rtol=1e-5)
    np.testing.assert_allclose(out[1], table[0] + w[0] + 2 * w[2], rtol=1e-5)
    with pytest.raises(BadItemMessage, match="model expects 3"):
        encoder([ItemMessage("x", features=(1.0,))])
    # An unseen id with nothing to embed it from would get the "unknown" row, like every other.
    with pytest.raises(BadItemMessage, match="not in the model's vocabulary") as refused:
        encoder([ItemMessage("unseen")])
    assert refused.value.reason == "cannot embed"


def test_a_model_without_content_features_refuses_unseen_ids_whatever_they_carry(tmp_path: Path) -> None:
    """Such a model's encoder still takes a one-wide (zero) features input: read as one
    feature, every unseen id got the "unknown" row plus nothing, one vector for them all."""
    rng = np.random.default_rng(3)
    table = rng.normal(size=(3, DIM)).astype(np.float32)
    _tiny_encoder(tmp_path / "item_encoder.onnx", table, np.zeros((1, DIM), np.float32))
    (tmp_path / "meta.json").write_text(json.dumps({"version": "v1", "uses_content_features": False}))
    encoder = OnnxItemEncoder(tmp_path, _known_ok2)
    assert encoder.feature_dim == 0
    for features in ((0.3,), (5.0,), None):
        with pytest.raises(BadItemMessage, match="the model has no content features"):
            encoder([ItemMessage("new", features=features)])
    # A known id is embedded by its id; features it carries (for another model) are not read.
    np.testing.assert_allclose(encoder([ItemMessage("ok2", features=(7.0, 8.0))])[0], table[1], rtol=1e-6)


def _known_ok2(ids: Sequence[object]) -> np.ndarray:
    """The tiny encoder's vocabulary: "ok2" owns bucket 1, every other id is unknown (0)."""
    return np.array([1 if i == "ok2" else 0 for i in ids], np.int64)


def test_items_the_encoder_rejects_are_skipped_alone(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    _tiny_encoder(tmp_path / "item_encoder.onnx", rng.normal(size=(2, DIM)).astype(np.float32),
                  rng.normal(size=(2, DIM)).astype(np.float32))
    encoder = OnnxItemEncoder(tmp_path, _known_ok2)
    refused: list[tuple[object, str]] = []
    with EdgeStore(VectorStoreSettings(path=tmp_path / "shard")) as store:
        batch = [ItemMessage("ok1", features=(1.0, 2.0)), ItemMessage("bad", features=(1.0,)),
                 ItemMessage("ok2"), ItemMessage("unseen")]
        stats = index_items(store, batch, encoder, SURFACES, lambda item, e: refused.append((item.item_id, e.reason)))
        assert (stats.embedded, stats.skipped) == (2, 2)
        assert set(store.retrieve(["ok1", "bad", "ok2", "unseen"])) == {"ok1", "ok2"}
    assert refused == [("bad", "cannot embed"), ("unseen", "cannot embed")]


def test_an_item_the_encoder_turns_non_finite_is_skipped_alone(tmp_path: Path) -> None:
    """The store refuses NaN/inf vectors for the whole batch; only the item that made one goes."""
    rng = np.random.default_rng(2)
    _tiny_encoder(tmp_path / "item_encoder.onnx", rng.normal(size=(2, DIM)).astype(np.float32),
                  np.full((2, DIM), 1e38, np.float32))  # 1e38 x 10 overflows float32
    encoder = OnnxItemEncoder(tmp_path, _known_ok2)
    with EdgeStore(VectorStoreSettings(path=tmp_path / "shard")) as store:
        batch = [ItemMessage("ok1", features=(0.0, 0.0)), ItemMessage("huge", features=(10.0, 0.0)),
                 ItemMessage("ok2")]
        stats = index_items(store, batch, encoder, SURFACES)
        assert (stats.embedded, stats.skipped) == (2, 1)
        assert set(store.retrieve(["ok1", "huge", "ok2"])) == {"ok1", "ok2"}


def test_model_id_bucket_follows_the_exported_vocabulary(tmp_path: Path) -> None:
    """Training ids own buckets 1..N in items.npz order; anything else is bucket 0."""
    import json

    from inference.hashing import id_hashing_meta
    from vector_store.indexer import model_id_bucket

    table = _write_model(tmp_path, 3, 0)
    (tmp_path / "meta.json").write_text(json.dumps({"id_hashing": id_hashing_meta(table.ids)}))
    buckets = model_id_bucket(tmp_path)(["i2", "i0", "never-seen", "i1"])
    assert buckets.tolist() == [3, 1, 0, 2]
    meta = id_hashing_meta(table.ids)
    del meta["vocab_ids"]  # not inline: read from items.npz
    (tmp_path / "meta.json").write_text(json.dumps({"id_hashing": meta}))
    assert model_id_bucket(tmp_path)(["i1"]).tolist() == [2]


def test_recsys_index_refuses_a_table_of_another_export(index_dirs: tuple[Path, VectorStoreSettings]) -> None:
    """items.npz from v2's export beside v1's meta.json (an export cut short, or under way):
    loaded, v2's vectors would be marked as v1's whole catalogue, and never loaded again."""
    model_dir, shard = index_dirs
    table = _write_model(model_dir, 10, 0, version="v1")
    np.savez(model_dir / "items.npz", ids=np.array(table.ids), embeddings=table.embeddings,
             popularity=table.popularity, version=np.array("v2"))
    with pytest.raises(MixedModelDirectory, match="meta.json is model v1, but {'items.npz': 'v2'}"):
        main([])
    assert not shard.path.exists()

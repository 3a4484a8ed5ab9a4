"""ONNX export: ONNX Runtime (CPU EP) reproduces PyTorch within 1e-4 (fp32) on random and real
batches, batch 1 and the maximum sequence length included; the artifacts match the contract."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from gr_helpers import HELD_OUT, features_of

from inference.checkpoint import Checkpoint
from inference.data import EventLog, Split, eval_histories
from inference.evaluate import item_matrix
from inference.export import EXPORT_FILES, export_model
from inference.hashing import id_bucket_fn
from inference.items import ItemTable
from inference.model import USER_INPUTS, GenerativeRetriever

Trained = tuple[GenerativeRetriever, Checkpoint, Path]
TOL = 1e-4


@pytest.fixture(scope="module")
def exported(tiny_model: Trained, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, info, _ = tiny_model
    out = tmp_path_factory.mktemp("model")
    export_model(model, info, out)
    return out


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _torch(model: GenerativeRetriever, feeds: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        return model(*(torch.from_numpy(feeds[name]) for name in USER_INPUTS)).numpy()


def random_feeds(model: GenerativeRetriever, B: int, T: int, Q: int, seed: int) -> dict[str, np.ndarray]:
    """Left-padded random histories of random lengths (1..T), realistic epoch seconds."""
    cfg = model.cfg
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, T + 1, size=B)
    lengths[0] = T  # at least one full row
    valid = np.arange(T)[None, :] >= (T - lengths)[:, None]
    emb = rng.normal(size=(B, T, cfg.dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
    ts = 1.75e9 + np.cumsum(rng.integers(1, 10_000, size=(B, T)), axis=1).astype(np.float64)
    return {
        "item_emb": np.where(valid[..., None], emb, 0.0).astype(np.float32),
        "action": np.where(valid, rng.integers(1, cfg.n_actions + 1, size=(B, T)), 0).astype(np.int64),
        "surface": np.where(valid, rng.integers(1, cfg.n_surfaces + 1, size=(B, T)), 0).astype(np.int64),
        "event_ts": np.where(valid, ts, 0.0),
        "request_ts": ts[:, -1] + rng.integers(0, 100_000, size=B),
        "target_surface": rng.integers(0, cfg.n_surfaces + 1, size=(B, Q)).astype(np.int64),
        "target_outcome": rng.integers(0, cfg.n_actions + 1, size=(B, Q)).astype(np.int64),
    }


@pytest.mark.parametrize(("B", "T", "Q"), [(1, 1, 1), (5, 16, 2), (64, 9, 4)])
def test_the_serving_forward_computes_what_training_optimises(tiny_model: Trained, B: int, T: int, Q: int) -> None:
    """Serving computes less than training does (the last block for the newest position only,
    each query row through its target surface's MLP only): the numbers must not differ."""
    model, _, _ = tiny_model
    feeds = {k: torch.from_numpy(v) for k, v in random_feeds(model, B, T, Q, seed=B + T).items()}
    served = _torch(model, {k: v.numpy() for k, v in feeds.items()})
    model.head.train()  # the head's training path, without its dropout; encode: every position
    try:
        for m in model.head.modules():
            if isinstance(m, torch.nn.Dropout):
                m.eval()
        with torch.no_grad():
            h = model.encode(feeds["item_emb"], feeds["action"], feeds["surface"], feeds["event_ts"])[:, -1]
            gap = (feeds["request_ts"] - feeds["event_ts"][:, -1])[:, None].expand(B, Q).reshape(-1)
            trained = model.head(h.repeat_interleave(Q, 0), feeds["target_surface"].reshape(-1),
                                 feeds["target_outcome"].reshape(-1), gap).reshape(served.shape)
    finally:
        model.eval()
    np.testing.assert_allclose(served, trained.numpy(), atol=1e-5)


@pytest.mark.parametrize(("B", "T", "Q"), [(1, 1, 1), (1, 16, 3), (5, 16, 2), (7, 4, 1), (64, 9, 4)])
def test_user_model_matches_pytorch_on_random_batches(tiny_model: Trained, exported: Path, B: int, T: int, Q: int) -> None:
    model, _, _ = tiny_model
    assert T <= model.cfg.max_len
    feeds = random_feeds(model, B, T, Q, seed=B * 100 + T)
    (onnx_out,) = _session(exported / "user_model.onnx").run(["queries"], feeds)
    ref = _torch(model, feeds)
    assert onnx_out.shape == (B, Q, model.cfg.num_queries, model.cfg.dim)
    assert np.abs(onnx_out - ref).max() <= TOL
    np.testing.assert_allclose(np.linalg.norm(onnx_out, axis=-1), 1.0, atol=1e-5)


def test_user_model_matches_pytorch_on_real_batches(tiny_model: Trained, exported: Path, planted_log: EventLog, planted_split: Split) -> None:
    """Histories from the log, fed exactly as the worker does: rows of items.npz."""
    model, _, _ = tiny_model
    table = ItemTable.load(exported / "items.npz")
    pad = np.concatenate([np.zeros((1, table.embeddings.shape[1]), np.float32), table.embeddings])
    session = _session(exported / "user_model.onnx")
    for rows in (planted_split.test[:1], planted_split.test[:50]):
        h = eval_histories(planted_log, rows, model.cfg.max_len)  # T = max_len
        assert h.item.shape[1] == model.cfg.max_len
        n = len(rows)
        feeds = {
            "item_emb": pad[h.item],
            "action": h.action,
            "surface": h.surface,
            "event_ts": h.ts,
            "request_ts": planted_log.ts[rows],
            "target_surface": np.tile(np.arange(1, 4), (n, 1)).astype(np.int64),
            "target_outcome": np.tile(np.array([2, 1, 0]), (n, 1)).astype(np.int64),
        }
        (onnx_out,) = session.run(["queries"], feeds)
        assert np.abs(onnx_out - _torch(model, feeds)).max() <= TOL


def test_user_model_signature_is_the_contract(tiny_model: Trained, exported: Path) -> None:
    """Inputs, dtypes and the dynamic axes are what meta.json and the worker expect."""
    session = _session(exported / "user_model.onnx")
    inputs = {i.name: i for i in session.get_inputs()}
    assert tuple(inputs) == USER_INPUTS
    types = {name: i.type for name, i in inputs.items()}
    assert types == {
        "item_emb": "tensor(float)",
        "action": "tensor(int64)",
        "surface": "tensor(int64)",
        "event_ts": "tensor(double)",
        "request_ts": "tensor(double)",
        "target_surface": "tensor(int64)",
        "target_outcome": "tensor(int64)",
    }
    assert all(isinstance(d, str) for d in inputs["item_emb"].shape[:2])  # dynamic B and T
    assert inputs["item_emb"].shape[2] == tiny_model[0].cfg.dim
    assert [o.name for o in session.get_outputs()] == ["queries"]


def test_item_encoder_matches_pytorch_and_items_npz(tiny_model: Trained, exported: Path, planted_log: EventLog) -> None:
    model, _, _ = tiny_model
    meta = json.loads((exported / "meta.json").read_text())
    session = _session(exported / "item_encoder.onnx")
    table = ItemTable.load(exported / "items.npz")
    buckets = id_bucket_fn(meta)(list(table.ids))
    np.testing.assert_array_equal(buckets, np.arange(1, len(table.ids) + 1))
    (emb,) = session.run(["item_emb"], {"id_bucket": buckets, "features": table.features})
    assert np.abs(emb - table.embeddings).max() <= TOL
    assert np.abs(table.embeddings - item_matrix(model, planted_log.features).numpy()).max() <= TOL
    # Batch of one, an unknown id: the content path alone, same as PyTorch.
    held = sorted(HELD_OUT)[:1]
    bucket = id_bucket_fn(meta)([f"i{held[0]}"])
    assert bucket.tolist() == [0]
    feats = features_of(held)
    (one,) = session.run(["item_emb"], {"id_bucket": bucket, "features": feats})
    with torch.no_grad():
        ref = model.items(torch.from_numpy(bucket), torch.from_numpy(feats)).numpy()
    assert np.abs(one - ref).max() <= TOL


def test_artifacts_carry_version_and_contract(tiny_model: Trained, exported: Path) -> None:
    model, info, _ = tiny_model
    meta = json.loads((exported / "meta.json").read_text())
    assert meta["version"] == info.version
    assert meta["surfaces"] == ["home", "search", "related"]
    assert meta["actions"] == ["click", "save", "hide"]
    assert meta["config"]["max_len"] == model.cfg.max_len
    assert meta["num_queries"] == model.cfg.num_queries
    assert meta["config"]["joint_queries"] is False  # how the worker merges the queries
    assert meta["logit_scale"] == pytest.approx(float(model.scale().detach()))  # what a joint model's merge needs
    assert meta["feature_dim"] == model.cfg.feature_dim
    assert list(meta["user_model"]["inputs"]) == list(USER_INPUTS)
    assert meta["id_hashing"]["n_buckets"] == len(info.item_ids) + 1
    for name in ("user_model.onnx", "item_encoder.onnx"):
        props = {p.key: p.value for p in onnx.load(str(exported / name)).metadata_props}
        assert props["version"] == info.version
        assert json.loads(props["model_config"])["dim"] == model.cfg.dim
    table = ItemTable.load(exported / "items.npz")
    assert table.version == info.version
    np.testing.assert_allclose(np.linalg.norm(table.embeddings, axis=1), 1.0, atol=1e-5)
    assert table.popularity.sum() == pytest.approx(1.0, abs=1e-4)
    assert sorted(p.name for p in exported.iterdir()) == sorted(EXPORT_FILES)  # no staging left behind


def test_a_directory_holding_parts_of_two_exports_is_refused(tiny_model: Trained, exported: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """An export cut short after renaming its first files (or read between two renames) leaves
    the older meta.json over newer parts: loaded, the worker would mix two models silently."""
    import shutil

    from inference import export as export_module
    from inference.runtime import MixedModelDirectory, ModelRuntime

    model, info, _ = tiny_model
    mixed = tmp_path / "model"
    shutil.copytree(exported, mixed)
    newer = Checkpoint(**{**info.__dict__, "version": info.version + "-newer"})
    real_replace = export_module.os.replace

    def cut_short(src: object, dst: object) -> None:
        if Path(str(dst)) == mixed / "meta.json":  # its last rename into the directory
            raise OSError("killed before meta.json")
        real_replace(src, dst)

    monkeypatch.setattr(export_module.os, "replace", cut_short)
    with pytest.raises(OSError, match="killed"):
        export_model(model, newer, mixed)
    monkeypatch.undo()
    with pytest.raises(MixedModelDirectory, match=r"meta.json is model .* but .*user_model.onnx"):
        ModelRuntime.load(mixed, "cpu")
    export_model(model, newer, mixed)  # the export run again completes it
    assert ModelRuntime.load(mixed, "cpu").version == newer.version


def test_a_model_that_reads_one_event_exports(tmp_path: Path) -> None:
    """max_len = 1: a static sequence axis (torch.export's Dim cannot have min = max = 1)."""
    from inference.model import ModelConfig
    from inference.runtime import ModelRuntime

    cfg = ModelConfig(n_buckets=11, n_actions=3, n_surfaces=3, dim=8, n_layers=1, n_heads=1, max_len=1, num_queries=2)
    model = GenerativeRetriever(cfg).eval()
    info = Checkpoint(model_args=cfg.to_dict(), item_ids=np.array([str(i) for i in range(10)]), features=None,
                      popularity=np.full(10, 0.1, np.float32), actions=("click", "save", "hide"),
                      surfaces=("home", "search", "related"), version="one-event")
    export_model(model, info, tmp_path)
    feeds = random_feeds(model, 3, 1, 2, seed=0)
    (onnx_out,) = ModelRuntime.load(tmp_path, "cpu").session.run(["queries"], feeds)
    np.testing.assert_allclose(onnx_out, _torch(model, feeds), atol=TOL)

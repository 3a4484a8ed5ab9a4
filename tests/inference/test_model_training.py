"""Training mechanics: the fused softmax, log-Q sampled softmax, resume, fine-tuning, the demo path."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gr_helpers import tiny_settings
from planted import planted_events

from inference.checkpoint import Checkpoint, load_blob, load_checkpoint
from inference.data import EventLog, Split, engaged, gather_train_batch, iterate_train_batches, training_windows
from inference.evaluate import item_matrix, ranking_metrics
from inference.model import GenerativeRetriever
from inference.train import (
    distinct_targets,
    Stage,
    batch_loss,
    fit,
    loss_spec,
    WTA_EPS,
    model_config,
    slot_loss,
    softmax_xent,
    train,
    train_small_demo_model,
)
from recsys.settings import Settings


@pytest.mark.parametrize("mm_dtype", [None, torch.bfloat16])
def test_fused_softmax_matches_cross_entropy(mm_dtype: torch.dtype | None) -> None:
    g = torch.Generator().manual_seed(0)
    P, N, D = 37, 101, 8
    q = torch.randn(P, D, generator=g, requires_grad=True)
    items = torch.randn(N, D, generator=g, requires_grad=True)
    target = torch.randint(0, N, (P,), generator=g)
    col_bias = torch.randn(N, generator=g)
    rows, cols = torch.tensor([0, 0, 5]), torch.tensor([3, 7, 9])
    weights = torch.rand(P, generator=g)

    ours = softmax_xent(q, items, target, col_bias, (rows, cols, 1.5), mm_dtype)
    (ours * weights).sum().backward()
    grads = q.grad.clone(), items.grad.clone()  # type: ignore[union-attr]
    q.grad = items.grad = None

    logits = q @ items.T + col_bias
    logits = logits.index_put((rows, cols), torch.full((3,), 1.5), accumulate=True)
    ref = F.cross_entropy(logits, target, reduction="none")
    (ref * weights).sum().backward()
    tol = 1e-5 if mm_dtype is None else 0.1  # bf16 matmuls: ~3 significant digits
    assert torch.allclose(ours, ref, atol=tol)
    assert torch.allclose(grads[0], q.grad, atol=tol)  # type: ignore[arg-type]
    assert torch.allclose(grads[1], items.grad, atol=tol)  # type: ignore[arg-type]


def test_fused_joint_softmax_matches_a_softmax_over_the_logsumexp_of_the_queries() -> None:
    """join=M: each item's logit is the logsumexp of the M queries' logits (biases and hard
    negatives added per query row), one softmax per group of M rows, a window of targets."""
    g = torch.Generator().manual_seed(1)
    P, M, N, D, W = 9, 3, 41, 8, 4
    q = torch.randn(P * M, D, generator=g, requires_grad=True)
    items = torch.randn(N, D, generator=g, requires_grad=True)
    target = torch.randint(0, N, (P, W), generator=g)
    col_bias = torch.randn(N, generator=g)
    rows, cols = torch.tensor([0, 4, 26]), torch.tensor([3, 7, 9])
    weights = torch.rand(P, W, generator=g)

    ours = softmax_xent(q, items, target, col_bias, (rows, cols, 1.5), None, join=M)
    (ours * weights).sum().backward()
    grads = q.grad.clone(), items.grad.clone()  # type: ignore[union-attr]
    q.grad = items.grad = None

    logits = (q @ items.T + col_bias).index_put((rows, cols), torch.full((3,), 1.5), accumulate=True)
    joint = torch.logsumexp(logits.view(P, M, N), dim=1)
    ref = torch.logsumexp(joint, dim=1, keepdim=True) - joint.gather(1, target)
    (ref * weights).sum().backward()
    assert torch.allclose(ours, ref, atol=1e-5)
    assert torch.allclose(grads[0], q.grad, atol=1e-5)  # type: ignore[arg-type]
    assert torch.allclose(grads[1], items.grad, atol=1e-5)  # type: ignore[arg-type]


def test_joint_queries_train_every_slot_and_the_model_ranks_by_their_joint_score(planted_log: EventLog, planted_split: Split) -> None:
    """train.slots=joint: every slot gets a gradient, the model says it is joint (the export and
    the worker read that), and it scores an item by the logsumexp of its M scaled cosines."""
    settings = Settings()
    tcfg = settings.train.model_copy(update={"slots": "joint"})
    torch.manual_seed(0)
    model = GenerativeRetriever(model_config(settings.model.model_copy(update={"dim": 16, "max_len": 16}), planted_log, "joint"))
    assert model.cfg.joint_queries
    assert not model_config(settings.model, planted_log, "mixture").joint_queries
    assert not model_config(settings.model.model_copy(update={"num_queries": 1}), planted_log, "joint").joint_queries
    spec = loss_spec(planted_log, planted_split.train_end, tcfg, torch.device("cpu"))
    batch = next(iterate_train_batches(planted_log, planted_split.train_end, 16, 64, tcfg.window, np.random.default_rng(0)))
    features = None if planted_log.features is None else torch.as_tensor(planted_log.features)
    result = batch_loss(model, batch, features, spec, torch.device("cpu"))
    assert result is not None
    result[0].backward()
    assert (model.head.slot.grad.norm(dim=1) > 0).all()  # type: ignore[union-attr]
    assert (model.head.slot_maps.grad.flatten(1).norm(dim=1) > 0).all()  # type: ignore[union-attr]
    cosines = torch.tensor([[[0.9, 0.1], [0.2, 0.8]]])  # (1, M=2, N=2)
    scale = float(model.scale().detach())
    assert torch.allclose(model.item_scores(cosines), torch.logsumexp(cosines * scale, dim=1) / scale)


def _fresh(log: EventLog, tmp: Path, *extra: str) -> tuple[GenerativeRetriever, Checkpoint, object]:
    settings = tiny_settings(tmp, *extra)
    torch.manual_seed(0)
    model = GenerativeRetriever(model_config(settings.model, log))
    info = Checkpoint(model.cfg.to_dict(), log.item_ids, log.features, np.ones(log.n_items, np.float32) / log.n_items, log.actions, log.surfaces, "test")
    return model, info, settings


def test_resume_continues_where_the_run_stopped(planted_log: EventLog, planted_split: Split, tmp_path: Path) -> None:
    model, info, settings = _fresh(planted_log, tmp_path, "train.eval_every=1", "train.patience=100")
    tcfg = settings.train  # type: ignore[attr-defined]
    spec = loss_spec(planted_log, planted_split.train_end, tcfg, torch.device("cpu"))
    stage = Stage("pretrain", 2, tcfg.lr, spec, planted_split.valid)
    first = fit(model, planted_log, planted_split, tcfg, stage, info, tmp_path, progress=False)
    assert first.epochs == 2 and (tmp_path / "pretrain_last.pt").exists()
    assert (tmp_path / "pretrain_curves.png").stat().st_size > 0

    model2, info2, _ = _fresh(planted_log, tmp_path)
    stage2 = Stage("pretrain", 4, tcfg.lr, spec, planted_split.valid)
    second = fit(model2, planted_log, planted_split, tcfg, stage2, info2, tmp_path, resume=True, progress=False)
    assert second.epochs == 4
    assert [h["epoch"] for h in second.history] == [1, 2, 3, 4]
    assert load_blob(tmp_path / "pretrain_last.pt")["state"]["run"]["epoch"] == 4

    # Resumed as another kind of model (train.slots=joint), its best so far would be compared
    # with figures ranked another way: refused.
    joint = GenerativeRetriever(model_config(settings.model, planted_log, "joint"))  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="another model"):
        fit(joint, planted_log, planted_split, tcfg, Stage("pretrain", 6, tcfg.lr, spec, planted_split.valid), info2,
            tmp_path, resume=True, progress=False)


def test_a_run_resumed_after_an_interruption_ends_with_the_weights_of_an_uninterrupted_one(
    planted_log: EventLog, planted_split: Split, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batch order, dropout and sampled negatives continue as they would have: `--resume` after
    a crash reproduces the uninterrupted run exactly, not a run with other random draws."""
    import inference.train as train_module

    def run(out: Path, resume: bool = False) -> GenerativeRetriever:
        model, info, settings = _fresh(planted_log, out, "train.eval_every=1", "train.patience=100",
                                       "train.loss=sampled", "train.n_negatives=8")
        tcfg = settings.train  # type: ignore[attr-defined]
        spec = loss_spec(planted_log, planted_split.train_end, tcfg, torch.device("cpu"))
        fit(model, planted_log, planted_split, tcfg, Stage("pretrain", 4, tcfg.lr, spec, planted_split.valid),
            info, out, resume=resume, progress=False)
        return model

    torch.manual_seed(123)  # the global RNG state a run starts from (the same for both)
    whole = run(tmp_path / "whole")

    real_plot = train_module.plot_curves

    def crash_after_epoch_2(history: list[dict[str, float]], *args: Any) -> None:
        real_plot(history, *args)
        if len(history) == 2:  # epoch 2's checkpoint is written: the process dies here
            raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "plot_curves", crash_after_epoch_2)
    torch.manual_seed(123)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "crashed")
    monkeypatch.setattr(train_module, "plot_curves", real_plot)
    torch.manual_seed(999)  # a restarted process: its own RNG state until the checkpoint's is restored
    resumed = run(tmp_path / "crashed", resume=True)
    assert load_blob(tmp_path / "crashed" / "pretrain_last.pt")["state"]["run"]["epoch"] == 4
    for name, weight in whole.state_dict().items():
        assert torch.equal(weight, resumed.state_dict()[name]), name


def test_resume_after_early_stopping_does_not_train_on(planted_log: EventLog, planted_split: Split, tmp_path: Path) -> None:
    import torch as t

    model, info, settings = _fresh(planted_log, tmp_path, "train.eval_every=1", "train.patience=100")
    tcfg = settings.train  # type: ignore[attr-defined]
    spec = loss_spec(planted_log, planted_split.train_end, tcfg, torch.device("cpu"))
    fit(model, planted_log, planted_split, tcfg, Stage("pretrain", 2, tcfg.lr, spec, planted_split.valid), info,
        tmp_path, progress=False)
    blob = load_blob(tmp_path / "pretrain_last.pt")
    assert blob["state"]["run"]["early_stopped"] is False
    blob["state"]["run"]["early_stopped"] = True  # as if patience had run out at epoch 2
    t.save(blob, tmp_path / "pretrain_last.pt")
    model2, info2, _ = _fresh(planted_log, tmp_path)
    again = fit(model2, planted_log, planted_split, tcfg, Stage("pretrain", 4, tcfg.lr, spec, planted_split.valid),
                info2, tmp_path, resume=True, progress=False)
    assert again.epochs == 2 and [h["epoch"] for h in again.history] == [1, 2]


def test_a_run_whose_metrics_meant_something_else_is_not_resumed(
    planted_log: EventLog, planted_split: Split, tmp_path: Path
) -> None:
    """A run saved before the evaluation changed (no protocol in its state: the request time was
    the target's) kept a best metric no new evaluation could beat; resuming it is refused."""
    import torch as t

    model, info, settings = _fresh(planted_log, tmp_path, "train.eval_every=1")
    tcfg = settings.train  # type: ignore[attr-defined]
    spec = loss_spec(planted_log, planted_split.train_end, tcfg, torch.device("cpu"))
    fit(model, planted_log, planted_split, tcfg, Stage("pretrain", 1, tcfg.lr, spec, planted_split.valid), info,
        tmp_path, progress=False)
    blob = load_blob(tmp_path / "pretrain_last.pt")
    assert blob["state"]["run"]["protocol"] == 2
    del blob["state"]["run"]["protocol"]  # as written before the field existed
    t.save(blob, tmp_path / "pretrain_last.pt")
    model2, info2, _ = _fresh(planted_log, tmp_path)
    with pytest.raises(ValueError, match="not comparable"):
        fit(model2, planted_log, planted_split, tcfg, Stage("pretrain", 2, tcfg.lr, spec, planted_split.valid), info2,
            tmp_path, resume=True, progress=False)


def test_sampled_softmax_with_log_q_learns(planted_log: EventLog, planted_split: Split, tmp_path: Path) -> None:
    settings = tiny_settings(tmp_path, "train.loss=sampled", "train.n_negatives=8", "train.epochs=10")
    model, _, results = train(planted_log, planted_split, settings, tmp_path, progress=False)
    assert results[0].history[0]["loss"] > results[0].history[-1]["loss"]
    assert ranking_metrics(model, planted_log, planted_split.valid, ks=(10,))["recall@10"] > 0.3


def test_a_model_never_told_the_outcome_is_validated_unconditioned(
    planted_log: EventLog, planted_split: Split, tmp_path: Path
) -> None:
    """Its outcome embeddings never train; checkpoints are picked on what it will be asked."""
    settings = tiny_settings(tmp_path, "train.outcome_dropout=1.0", "train.epochs=5")
    model, _, results = train(planted_log, planted_split, settings, tmp_path, progress=False)
    best = results[0].best
    rows = engaged(planted_log, planted_split.valid, settings.train.negative_actions)  # what training validates on
    unconditioned = ranking_metrics(model, planted_log, rows, outcome="none")
    assert best["valid_ndcg@10"] == pytest.approx(unconditioned["ndcg@10"], abs=1e-6)
    assert best["valid_ndcg@10"] != pytest.approx(ranking_metrics(model, planted_log, rows)["ndcg@10"], abs=1e-6)


def test_a_model_never_told_the_outcome_is_served_and_evaluated_without_one(
    planted_log: EventLog, planted_split: Split, tmp_path: Path
) -> None:
    """Its outcome rows never trained: the worker feeds 0 ("none") where it would feed the
    surface's outcomes, as validation did."""
    from inference.export import export_model
    from inference.runtime import ModelRuntime
    from inference.worker import Condition, encode_histories

    settings = tiny_settings(tmp_path, "train.outcome_dropout=1.0", "train.epochs=1")
    model, info, _ = train(planted_log, planted_split, settings, tmp_path, progress=False)
    assert info.trained_on["conditioned"] == {"outcome": False, "surface": True}
    export_model(model, info, tmp_path / "model")
    runtime = ModelRuntime.load(tmp_path / "model", "cpu")
    assert not runtime.conditioned_on("outcome") and runtime.conditioned_on("surface")
    update = {"user_id": "u", "events": [{"item_id": str(planted_log.item_ids[0]), "action": planted_log.actions[0],
                                          "surface": planted_log.surfaces[0], "ts": 1_750_000_000_000}]}
    conditions = [Condition(planted_log.surfaces[1], planted_log.actions[1], 1.0)]
    feeds = encode_histories([update], runtime, conditions, {})
    assert feeds["target_outcome"].tolist() == [[0]] and feeds["target_surface"].tolist() == [[2]]


def test_surface_heads_that_never_trained_are_not_said_to_condition_on_the_surface(
    planted_log: EventLog, planted_split: Split, tmp_path: Path
) -> None:
    """Pretrained without the surface, then fine-tuning asked for but out of time: the heads
    are at their initialisation, and the worker must feed no surface."""
    settings = tiny_settings(tmp_path, "train.surface_dropout=1.0", "train.epochs=1", "train.max_minutes=0.000001")
    _, info, results = train(planted_log, planted_split, settings, tmp_path, finetune=True, progress=False)
    assert len(results) > 1 and info.trained_on["conditioned"] == {"outcome": True, "surface": False}


def test_a_model_never_told_the_surface_is_validated_without_one(
    planted_log: EventLog, planted_split: Split, tmp_path: Path
) -> None:
    settings = tiny_settings(tmp_path, "train.surface_dropout=1.0", "train.epochs=5")
    model, _, results = train(planted_log, planted_split, settings, tmp_path, progress=False)
    rows = engaged(planted_log, planted_split.valid, settings.train.negative_actions)
    no_surface = ranking_metrics(model, planted_log, rows, surface="none")
    assert results[0].best["valid_ndcg@10"] == pytest.approx(no_surface["ndcg@10"], abs=1e-6)


def test_finetuning_moves_only_that_surfaces_head(tiny_model: tuple[GenerativeRetriever, Checkpoint, Path]) -> None:
    """The fixture fine-tuned every surface; pretrain_best.pt holds the weights before that."""
    model, _, out = tiny_model
    before = load_blob(out / "pretrain_best.pt")["model"]
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(before[k], after[k].cpu())}
    assert changed, "fine-tuning changed nothing"
    assert all(k.startswith("head.mlps.") and not k.startswith("head.mlps.0.") for k in changed), changed
    assert (out / "finetune-home_curves.png").exists()


def test_each_fine_tuning_stage_decays_its_learning_rate_to_the_floor(
    planted_log: EventLog, planted_split: Split, tmp_path: Path
) -> None:
    """A fine-tuning stage skips the batches without its surface's targets; its cosine schedule
    follows the batches' positions, so it still ends at min_lr rather than partway down."""
    # The default warm-up (200 batches) is longer than these stages (~10 batches each), as in
    # the default deployment: a fine-tuning stage warms up over a tenth of its batches at most.
    settings = tiny_settings(tmp_path, "train.epochs=1", "train.finetune_epochs=2", "train.finetune_lr=0.003",
                             "train.min_lr=0.0001", "train.warmup_steps=200")
    _, _, results = train(planted_log, planted_split, settings, tmp_path, finetune=True, progress=False)
    assert len(results) > 1
    for stage in results[1:]:
        assert stage.history[-1]["lr"] == pytest.approx(1e-4)


def test_a_fine_tuning_stage_left_by_an_earlier_run_is_not_resumed(
    planted_log: EventLog, planted_split: Split, tmp_path: Path
) -> None:
    """Run 1 (seed 0) fine-tuned into the directory; run 2 (seed 1) stopped after pretraining;
    `--resume` of run 2 fine-tunes run 2's pretrained model, not run 1's leftover stages."""
    quick = ("train.epochs=1", "train.finetune_epochs=1")
    train(planted_log, planted_split, tiny_settings(tmp_path, *quick), tmp_path, finetune=True, progress=False)
    train(planted_log, planted_split, tiny_settings(tmp_path, *quick, "train.seed=1"), tmp_path, progress=False)
    pretrained = load_blob(tmp_path / "pretrain_best.pt")["model"]
    model, _, results = train(planted_log, planted_split, tiny_settings(tmp_path, *quick, "train.seed=1"), tmp_path,
                              finetune=True, resume=True, progress=False)
    assert [r.epochs for r in results[1:]] == [1] * (len(results) - 1)
    for name, weight in model.state_dict().items():
        if not name.startswith("head.mlps."):
            assert torch.equal(weight, pretrained[name]), name
    # Asked to resume a pretraining another run wrote (seed 0's initialisation, not seed 1's): refused.
    with pytest.raises(ValueError, match="another run"):
        train(planted_log, planted_split, tiny_settings(tmp_path, *quick, "train.epochs=2"), tmp_path, resume=True,
              progress=False)


def test_the_time_limit_bounds_the_whole_run_and_a_resume_does_not_train_past_it(
    planted_log: EventLog, planted_split: Split, tmp_path: Path
) -> None:
    settings = tiny_settings(tmp_path, "train.epochs=3", "train.eval_every=1", "train.max_minutes=0.000001")
    _, _, results = train(planted_log, planted_split, settings, tmp_path, finetune=True, progress=False)
    assert results[0].epochs == 1  # over the limit after its first epoch
    assert [r.epochs for r in results[1:]] == [0] * (len(results) - 1)  # nothing left for fine-tuning
    _, _, again = train(planted_log, planted_split, settings, tmp_path, finetune=True, resume=True, progress=False)
    assert [r.epochs for r in again] == [r.epochs for r in results]
    assert load_blob(tmp_path / "pretrain_last.pt")["state"]["run"]["epoch"] == 1


def test_checkpoint_round_trip(tiny_model: tuple[GenerativeRetriever, Checkpoint, Path], planted_log: EventLog) -> None:
    model, info, out = tiny_model
    loaded, linfo = load_checkpoint(out / "ckpt_best.pt")
    assert linfo.version == info.version and list(linfo.item_ids) == list(info.item_ids)
    assert torch.equal(item_matrix(loaded, planted_log.features), item_matrix(model, planted_log.features))


def test_small_demo_model_trains_and_exports(tmp_path: Path) -> None:
    events = planted_events(n_users=60, n_items=30, length=12, seed=3)
    settings = tiny_settings(tmp_path)
    out = train_small_demo_model(events, settings, tmp_path / "model", max_seconds=15)
    for name in ("user_model.onnx", "item_encoder.onnx", "items.npz", "meta.json"):
        assert (out / name).stat().st_size > 0, name
    # And it is a model the worker can load and run: every item of the events, unit vectors.
    from inference.runtime import ModelRuntime

    runtime = ModelRuntime.load(out, "cpu")
    assert set(runtime.item_ids) == {str(e["item_id"]) for e in events}
    vectors = runtime.item_vectors_for(list(runtime.item_ids))
    assert all(np.isclose(np.linalg.norm(v), 1.0, atol=1e-4) and len(v) == runtime.dim for v in vectors.values())


def test_small_demo_model_takes_its_own_lr_unless_one_is_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from inference import train as train_module

    seen: list[float] = []

    class Stop(Exception):
        pass

    def capture(log_: Any, split: Any, settings: Settings, *args: Any, **kwargs: Any) -> Any:
        seen.append(settings.train.lr)
        raise Stop

    monkeypatch.setattr(train_module, "train", capture)
    events = planted_events(n_users=60, n_items=30, length=12, seed=3)
    for settings in (Settings(), Settings(train={"lr": 3e-4})):
        with pytest.raises(Stop):
            train_small_demo_model(events, settings, tmp_path / "model")
    assert seen == [1e-2, 3e-4]


def test_cli_export_and_evaluate(tiny_model: tuple[GenerativeRetriever, Checkpoint, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`recsys export` and `recsys evaluate` on the fixture's checkpoint and its events as JSONL."""
    import json

    from gr_helpers import HELD_OUT, N_CLUSTERS, N_ITEMS

    from inference import evaluate, export

    _, info, out = tiny_model
    assert export.main(["--checkpoint", str(out / "ckpt_best.pt"), "--out", str(tmp_path / "model")]) == 0
    assert json.loads((tmp_path / "model" / "meta.json").read_text())["version"] == info.version
    capsys.readouterr()
    events = tmp_path / "events.jsonl"
    events.write_text("\n".join(json.dumps(e) for e in planted_events(n_items=N_ITEMS, n_clusters=N_CLUSTERS, exclude_items=HELD_OUT)))
    assert evaluate.main(["--checkpoint", str(out / "ckpt_best.pt"), "--dataset", "events", "--path", str(events)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["recall@10"] > 0.3 and metrics["n_targets"] > 100
    assert metrics["n_targets_unknown_item"] == 0

    # A newer dump: ten users' last action is on an item the checkpoint never saw. Each is a test
    # target (the split is made on the data as it is) and a miss, not a target dropped.
    rows = planted_events(n_items=N_ITEMS, n_clusters=N_CLUSTERS, exclude_items=HELD_OUT)
    last: dict[str, dict] = {}
    for e in rows:
        last[str(e["user_id"])] = e
    newer = [{**e, "item_id": "never-seen", "action": "click", "ts": e["ts"] + 1} for e in list(last.values())[:10]]
    events.write_text("\n".join(json.dumps(e) for e in rows + newer))
    assert evaluate.main(["--checkpoint", str(out / "ckpt_best.pt"), "--dataset", "events", "--path", str(events)]) == 0
    with_unknown = json.loads(capsys.readouterr().out)
    assert with_unknown["n_targets_unknown_item"] == 10
    # Ten of the targets are misses whatever the model does.
    assert with_unknown["recall@50"] <= 1 - 10 / with_unknown["n_targets"]

    # `--split auto` scores the split the checkpoint was trained with (recorded in it): here
    # leave-one-out, one test target per user, not the per-user tail.
    import dataclasses

    from inference.checkpoint import load_checkpoint, save_checkpoint

    model, trained = load_checkpoint(out / "ckpt_best.pt")
    save_checkpoint(tmp_path / "loo.pt", model, dataclasses.replace(trained, trained_on={"split": "loo"}))
    assert load_checkpoint(tmp_path / "loo.pt")[1].trained_on == {"split": "loo"}
    events.write_text("\n".join(json.dumps(e) for e in rows))
    for split, checkpoint in (("tail", out / "ckpt_best.pt"), ("loo", tmp_path / "loo.pt")):
        assert evaluate.main(["--checkpoint", str(checkpoint), "--dataset", "events", "--path", str(events)]) == 0
        got = json.loads(capsys.readouterr().out)
        assert evaluate.main(["--checkpoint", str(checkpoint), "--dataset", "events", "--path", str(events),
                              "--split", split]) == 0
        assert json.loads(capsys.readouterr().out)["n_targets"] == got["n_targets"], split
    negative = Settings().train.negative_actions
    assert got["n_targets"] == sum(e["action"] not in negative for e in last.values())  # loo: each user's last action


def test_cli_says_what_is_missing(tiny_model: tuple[GenerativeRetriever, Checkpoint, Path], tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A data file or checkpoint that is not there is a usage error naming it, not a traceback
    (a fresh clone has no ../shared/datasets)."""
    from inference import evaluate
    from inference import train as train_cli

    _, _, out = tiny_model
    cases = [(train_cli.main, ["--dataset", "beauty", "--path", str(tmp_path / "Beauty.txt")], "Beauty.txt not found"),
             (evaluate.main, ["--checkpoint", str(tmp_path / "none.pt")], "none.pt not found"),
             (evaluate.main, ["--checkpoint", str(out / "ckpt_best.pt"), "--dataset", "ml100k",
                              "--path", str(tmp_path / "u.data")], "u.data not found")]
    for main, argv, message in cases:
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_fused_softmax_with_a_window_of_targets_sums_their_cross_entropies() -> None:
    g = torch.Generator().manual_seed(1)
    R, N, D, W = 11, 40, 6, 3
    q = torch.randn(R, D, generator=g, requires_grad=True)
    items = torch.randn(N, D, generator=g, requires_grad=True)
    target = torch.randint(0, N, (R, W), generator=g)
    target[0, 1] = target[0, 0]  # a repeated target counts twice
    weights = torch.rand(R, W, generator=g)
    (softmax_xent(q, items, target) * weights).sum().backward()
    grads = q.grad.clone(), items.grad.clone()  # type: ignore[union-attr]
    q.grad = items.grad = None
    logits = q @ items.T
    ref = torch.stack([F.cross_entropy(logits, target[:, w], reduction="none") for w in range(W)], dim=1)
    (ref * weights).sum().backward()
    assert torch.allclose(grads[0], q.grad, atol=1e-5)  # type: ignore[arg-type]
    assert torch.allclose(grads[1], items.grad, atol=1e-5)  # type: ignore[arg-type]


def test_with_the_default_settings_every_query_slot_learns(planted_log: EventLog, planted_split: Split) -> None:
    """The worker gives each of the M slots a share of every list, so each must be trained: with
    a one-item window and offset slots, slots 1..M-1 never got a gradient (the live default did that)."""
    settings = Settings()
    assert settings.model.num_queries > 1
    torch.manual_seed(0)
    model = GenerativeRetriever(model_config(settings.model.model_copy(update={"dim": 16, "max_len": 16}), planted_log))
    spec = loss_spec(planted_log, planted_split.train_end, settings.train, torch.device("cpu"))
    batch = next(iterate_train_batches(planted_log, planted_split.train_end, 16, 64, settings.train.window, np.random.default_rng(0)))
    features = None if planted_log.features is None else torch.as_tensor(planted_log.features)
    result = batch_loss(model, batch, features, spec, torch.device("cpu"))
    assert result is not None
    result[0].backward()
    slot_grad = model.head.slot.grad.norm(dim=1)  # type: ignore[union-attr]
    map_grad = model.head.slot_maps.grad.flatten(1).norm(dim=1)  # type: ignore[union-attr]
    assert (slot_grad > 0).all() and (map_grad > 0).all(), (slot_grad, map_grad)

    offset_too_short = settings.train.model_copy(update={"slots": "offset", "window": 1})
    with pytest.raises(ValueError, match="some slots would never train"):
        train(planted_log, planted_split, settings.model_copy(update={"train": offset_too_short}))


def test_slot_losses_route_each_target_as_their_mode_says() -> None:
    # ce (P=1, M=2, W=4): slot 0 explains targets 0 and 2 best, slot 1 targets 1 and 3.
    ce = torch.tensor([[[1.0, 5.0, 2.0, 6.0], [4.0, 0.5, 3.0, 1.5]]], requires_grad=True)
    # offset (PinRec): slot 0 answers for the near half of the window, slot 1 for the far half.
    assert slot_loss(ce, "offset").tolist() == [[1.0, 5.0, 3.0, 1.5]]
    mix = slot_loss(ce, "mixture")
    assert torch.allclose(mix, -torch.log(torch.exp(-ce).mean(dim=1)))
    # wta: the winning slot carries 1 - eps of each target, the other eps / (M - 1) = eps.
    slot_loss(ce, "wta").sum().backward()
    win, lose = 1.0 - WTA_EPS, WTA_EPS
    assert torch.allclose(ce.grad, torch.tensor([[[win, lose, win, lose], [lose, win, lose, win]]]))  # type: ignore[arg-type]
    # M = 1: every mode is the plain cross-entropy.
    one = ce[:, :1].detach()
    for mode in ("offset", "mixture", "wta"):
        assert torch.equal(slot_loss(one, mode), one[:, 0])
    with pytest.raises(ValueError, match="unknown train.slots"):
        slot_loss(ce, "nope")


def test_a_query_conditioned_on_an_outcome_is_trained_on_the_window_s_engagements_with_that_outcome(
    planted_log: EventLog, planted_split: Split
) -> None:
    """With a window of several events, a "save" query answers for the saves among them, not
    the clicks too (which made the surfaces' outcome-weighted budgets meaningless): the loss
    does not see the items of other-outcome targets, but unconditioned it sees all of them."""
    settings = Settings()
    assert settings.train.window > 1
    torch.manual_seed(0)
    model = GenerativeRetriever(model_config(settings.model.model_copy(update={"dim": 16, "max_len": 16, "dropout": 0.0}), planted_log)).eval()
    batch = next(iterate_train_batches(planted_log, planted_split.train_end, 16, 64, settings.train.window, np.random.default_rng(0)))
    features = None if planted_log.features is None else torch.as_tensor(planted_log.features)
    # The first engaged target conditions each position; "hide" targets are hard negatives
    # whatever the condition, so they stay as they are.
    act = batch.target_action
    engaged = (batch.target_item > 0) & (act != planted_log.actions.index("hide") + 1)
    first = np.take_along_axis(act, engaged.argmax(axis=2)[..., None], axis=2)
    other = engaged & (act != first)
    assert other.sum() > 100  # plenty of windows mix outcomes
    moved = dataclasses.replace(batch, target_item=np.where(other, batch.target_item % planted_log.n_items + 1, batch.target_item))

    def loss(b: Any, outcome_dropout: float) -> float:
        tcfg = settings.train.model_copy(update={"outcome_dropout": outcome_dropout, "id_dropout": 0.0})
        spec = loss_spec(planted_log, planted_split.train_end, tcfg, torch.device("cpu"))
        assert spec.full_softmax  # the candidate set does not depend on the targets
        if outcome_dropout:  # drawn only in training mode (all of it at 1.0; no other dropout here)
            model.train()
        try:
            result = batch_loss(model, b, features, spec, torch.device("cpu"))
        finally:
            model.eval()
        assert result is not None
        return float(result[0].detach())

    assert loss(moved, 0.0) == pytest.approx(loss(batch, 0.0), rel=1e-6)
    assert loss(moved, 1.0) != pytest.approx(loss(batch, 1.0), rel=1e-3)  # unconditioned: every target counts


def test_log_q_counts_each_target_event_once() -> None:
    """An event is the window target of up to W positions but one draw from the catalogue:
    counting cells overstated a rare item's chance to be in the batch (4.7x on ML-100K)."""
    rng = np.random.default_rng(0)
    users = np.sort(rng.integers(0, 20, 300))
    log = EventLog.from_columns(users.tolist(), rng.integers(0, 50, 300).tolist(), rng.integers(0, 2, 300),
                                rng.integers(0, 2, 300), np.arange(300, dtype=float), ["click", "save"], ["home", "search"])
    limit = log.offsets[1:] - 2  # the last two events of each user are not trained on
    starts, ends = training_windows(log, limit, 7)
    batch = gather_train_batch(log, starts, ends, limit[log.user[starts]], window=5)
    rows = batch.history.rows[:, :, None] + np.arange(1, 6)
    window, _, _ = np.nonzero(batch.target_item > 0)
    events = {(w, r) for w, r in zip(window, rows[batch.target_item > 0], strict=True)}
    assert int(distinct_targets(torch.as_tensor(batch.target_item))) == len(events)
    assert len(events) < int((batch.target_item > 0).sum())  # the old count


def test_cli_train_unless_exported_keeps_the_model_already_there(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """docker-compose's one-shot trainer is started again by every `up`: with --unless-exported
    it leaves the exported model in place instead of training and replacing it."""
    import json

    from inference import train as train_cli

    model_dir = tmp_path / "models"
    model_dir.mkdir()
    (model_dir / "meta.json").write_text(json.dumps({"version": "deployed-1"}))
    monkeypatch.setattr(train_cli, "train", lambda *a, **k: pytest.fail("trained over an exported model"))
    assert train_cli.main(["--export", str(model_dir), "--unless-exported"]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == "deployed-1"
    with pytest.raises(SystemExit) as exit_:
        train_cli.main(["--unless-exported"])
    assert exit_.value.code == 2 and "needs --export" in capsys.readouterr().err
    # `--export` alone is inference.model_dir as --set makes it
    assert train_cli.main(["--export", "--unless-exported", "--set", f"inference.model_dir={model_dir}"]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == "deployed-1"


def test_cli_train_writes_where_its_overrides_say(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """`--set train.out_dir=...` used to be read after --out's default was taken: the
    checkpoints went to var/train, over another run's."""
    from inference import train as train_cli

    seen: list[Path] = []

    def record(log_: Any, split: Any, settings: Any, out: Path, **_: Any) -> Any:
        seen.append(out)
        raise SystemExit(0)

    monkeypatch.setattr(train_cli, "train", record)
    with pytest.raises(SystemExit):
        train_cli.main(["--set", f"train.out_dir={tmp_path / 'run2'}", "--set", "train.seed=3"])
    assert seen == [tmp_path / "run2"]
    with pytest.raises(SystemExit) as exit_:
        train_cli.main(["--split", "lo"])
    assert exit_.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_a_fine_tuning_that_only_hurts_keeps_the_pretrained_head(
    planted_log: EventLog, planted_split: Split, tmp_path: Path
) -> None:
    """The pretrained weights are each fine-tuning stage's epoch 0: a stage that never beats
    them on validation (here a learning rate that wrecks the head) ships them unchanged."""
    settings = tiny_settings(tmp_path, "train.epochs=2", "train.finetune_epochs=2", "train.finetune_lr=0.5",
                             "train.warmup_steps=1", "train.eval_every=1")
    model, _, results = train(planted_log, planted_split, settings, tmp_path, finetune=True, progress=False)
    assert len(results) == 4
    for stage in results[1:]:
        assert stage.history[0]["epoch"] == 0 and stage.best["epoch"] == 0, stage.history
        assert all(row["valid_ndcg@10"] < stage.best["valid_ndcg@10"] for row in stage.history[1:]), stage.history
    before = load_blob(tmp_path / "pretrain_best.pt")["model"]
    assert all(torch.equal(before[k], v.cpu()) for k, v in model.state_dict().items())


def test_the_validation_metric_can_be_any_recall_or_ndcg_cut_off(
    planted_log: EventLog, planted_split: Split, tmp_path: Path
) -> None:
    """Early stopping and the best checkpoint read `train.eval_metric`: a cut-off validation did
    not compute made every epoch "the best" and early stopping never fired."""
    with pytest.raises(ValueError, match="eval_metric"):
        tiny_settings(tmp_path, "train.eval_metric=mrr")
    settings = tiny_settings(tmp_path, "train.epochs=2", "train.eval_every=1", "train.eval_metric=recall@20")
    _, _, (result,) = train(planted_log, planted_split, settings, tmp_path, progress=False)
    assert all("valid_recall@20" in row for row in result.history)
    assert result.best["valid_recall@20"] == max(row["valid_recall@20"] for row in result.history)


def test_hard_negatives_are_on_the_surface_once_per_item_and_never_a_positive() -> None:
    from inference.train import hard_negatives

    # Two positions, a window of 5: item ids, which are negatives (hides), which positives, surfaces.
    targets = torch.tensor([[7, 3, 7, 5, 9], [4, 4, 6, 0, 0]])
    negative = torch.tensor([[False, True, True, True, True], [False, True, True, False, False]])
    positive = torch.tensor([[True, False, False, False, False], [True, False, False, False, False]])
    surface = torch.tensor([[1, 1, 1, 2, 1], [1, 1, 1, 1, 1]])
    pairs = set(zip(*(x.tolist() for x in hard_negatives(negative, positive, targets, surface, on_surface=1)), strict=True))
    # Row 0: 3 and 9 stay; 7 is also the position's positive; 5 is on another surface.
    # Row 1: 4 is also a positive (hidden after it was engaged); 6 stays.
    assert pairs == {(0, 1), (0, 4), (1, 2)}
    # Pretraining (no surface): every surface counts; an item hidden twice counts once.
    twice = torch.tensor([[9, 9, 9, 0, 0]])
    pr, w = hard_negatives(torch.tensor([[False, True, True, False, False]]), torch.tensor([[True, False, False, False, False]]),
                           twice, torch.ones_like(twice), on_surface=None)
    assert pr.tolist() == [] and w.tolist() == []  # 9 is the positive too
    pr, w = hard_negatives(torch.tensor([[False, True, True, False, False]]), torch.tensor([[True, False, False, False, False]]),
                           torch.tensor([[2, 9, 9, 0, 0]]), torch.ones_like(twice), on_surface=None)
    assert list(zip(pr.tolist(), w.tolist(), strict=True)) == [(0, 1)]


def test_fine_tuning_runs_the_frozen_trunk_as_it_is_served(planted_log: EventLog, planted_split: Split, tmp_path: Path) -> None:
    """With dropout on, a fine-tuning stage runs the frozen trunk (under no_grad) in eval mode:
    the head learns on the hidden states it will be served, not on dropped-out ones."""
    import inference.train as train_module

    settings = tiny_settings(tmp_path, "model.dropout=0.5", "train.epochs=1", "train.finetune_epochs=1")
    seen: list[tuple[str, bool, bool]] = []  # (module, training, gradients on) inside a fine-tuning batch
    fine_tuning = [False]
    original, real_batch_loss = GenerativeRetriever.__init__, train_module.batch_loss

    def record(self: GenerativeRetriever, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        for name, module in self.named_modules():
            if name and not name.startswith("head"):
                module.register_forward_pre_hook(lambda m, _inputs, name=name: seen.append(
                    (name, m.training, torch.is_grad_enabled())) if fine_tuning[0] else None)

    def batch_loss(*args: Any, **kwargs: Any) -> Any:  # the batches of a stage with the trunk frozen, only
        fine_tuning[0] = bool(kwargs.get("frozen_trunk", args[5] if len(args) > 5 else False))
        try:
            return real_batch_loss(*args, **kwargs)
        finally:
            fine_tuning[0] = False

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(GenerativeRetriever, "__init__", record)
        mp.setattr(train_module, "batch_loss", batch_loss)
        train(planted_log, planted_split, settings, tmp_path, finetune=True, progress=False)
    assert seen, "no fine-tuning batch ran the trunk"
    assert not [name for name, training, _ in seen if training], "the frozen trunk ran with dropout"
    assert not [name for name, _, grad in seen if grad], "the frozen trunk ran with gradients"

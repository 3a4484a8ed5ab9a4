"""`recsys demo`'s own rules: the model it reuses, the flags it refuses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from recsys import demo


def test_the_demo_reuses_its_model_only_for_the_data_it_was_trained_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--items 2000` after a default run streamed items the 400-item model never saw."""
    import inference.train

    trained: list[int] = []

    def fake_train(events: list[dict[str, Any]], settings: Any, out: Path, **_: Any) -> Path:
        trained.append(len({e["item_id"] for e in events}))
        out.mkdir(parents=True, exist_ok=True)
        (out / "meta.json").write_text("{}")
        return out

    monkeypatch.setattr(inference.train, "train_small_demo_model", fake_train)
    model_dir = tmp_path / "model"
    demo.ensure_model(model_dir, users=50, items=40, seed=1, retrain=False)
    demo.ensure_model(model_dir, users=50, items=40, seed=1, retrain=False)
    assert len(trained) == 1
    demo.ensure_model(model_dir, users=50, items=200, seed=1, retrain=False)
    assert len(trained) == 2 and trained[1] > 40


@pytest.mark.parametrize("flag", [["--rate", "0.5"], ["--featured", "0"], ["--items", "4"]])
def test_flags_the_demo_cannot_run_with_are_refused_up_front(flag: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        demo.main(flag)
    assert exit_.value.code == 2 and "at least" in capsys.readouterr().err

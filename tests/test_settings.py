"""The settings object: a configuration mistake is an error that names it, never a silent default."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from recsys.settings import Settings


def test_environment_variables_reach_their_section(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSYS_SERVING__PORT", "6000")
    assert Settings().serving.port == 6000


@pytest.mark.parametrize("toml", ["[kafak]\nport = 1\n", "[kafka]\nbogus = 1\n"])
def test_an_unknown_key_in_the_config_file_is_refused(toml: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "recsys.toml"
    path.write_text(toml)
    monkeypatch.setenv("RECSYS_CONFIG", str(path))
    with pytest.raises(ValidationError, match="kafak|kafka.bogus"):
        Settings()


def test_a_misspelt_variable_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSYS_SERVING__HOTS", "0.0.0.0")
    with pytest.raises(ValidationError, match="serving.hots"):
        Settings()


def test_a_config_file_that_is_not_there_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSYS_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(FileNotFoundError, match="missing.toml"):
        Settings()


def test_the_config_file_sets_values_the_environment_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "recsys.toml"
    path.write_text('[serving]\nport = 7000\nhost = "0.0.0.0"\n')
    monkeypatch.setenv("RECSYS_CONFIG", str(path))
    monkeypatch.setenv("RECSYS_SERVING__PORT", "7001")
    settings = Settings()
    assert (settings.serving.host, settings.serving.port) == ("0.0.0.0", 7001)


def test_a_future_horizon_beyond_the_lateness_is_refused() -> None:
    # An event accepted from a clock running ahead would make the user's next events too late.
    with pytest.raises(ValidationError, match="max_future_ms"):
        Settings(events={"max_future_ms": 60_000}, streams={"lateness_ms": 59_999})
    assert Settings(events={"max_future_ms": 60_000}, streams={"lateness_ms": 60_000}).streams.lateness_ms == 60_000


def test_a_misspelt_section_in_a_variable_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSYS_KAFAK__PORT", "1")
    with pytest.raises(ValidationError, match="RECSYS_KAFAK__PORT: no such settings section"):
        Settings()


def test_a_variable_with_one_underscore_for_two_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSYS_KAFKA_PORT", "5")  # pydantic-settings would ignore it: the port stayed 9092
    with pytest.raises(ValidationError, match="RECSYS_KAFKA_PORT: not a setting"):
        Settings()
    monkeypatch.delenv("RECSYS_KAFKA_PORT")
    monkeypatch.setenv("RECSYS_SLOW_TESTS", "1")  # the suite's own switches are not settings either, and fine
    Settings()


@pytest.mark.parametrize("streams", [{"max_sequence_len": 0}, {"max_sequence_len": -3}, {"max_age_ms": -1},
                                     {"lateness_ms": -1}, {"max_batch_events": 0}, {"flush_interval_s": -0.1}])
def test_sequence_bounds_that_would_keep_no_event_are_refused(streams: dict[str, float]) -> None:
    # A fold that trims every event away left a user with an empty sequence: the window failed,
    # unacked, and every restart replayed it into the same failure.
    with pytest.raises(ValidationError, match=next(iter(streams))):
        Settings(streams=streams)



def test_one_surfaces_outcome_weights_leave_the_other_surfaces_theirs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSYS_INFERENCE__OUTCOME_WEIGHTS__HOME__SAVE", "0.9")
    weights = Settings().inference.outcome_weights
    assert weights["home"] == {"save": 0.9}  # the surface given is replaced whole
    assert weights["search"] == {"click": 0.8, "save": 0.2} and weights["related"] == {"click": 0.5, "save": 0.5}


def test_a_worker_batch_of_no_users_is_refused() -> None:
    # max_batch = 0 polled nothing, ever, without a word.
    with pytest.raises(ValidationError, match="max_batch"):
        Settings(inference={"max_batch": 0})


def test_surfaces_of_ones_own_get_no_default_outcome_weights() -> None:
    settings = Settings(events={"surfaces": ["home", "feed"]},
                        inference={"outcome_weights": {"home": {"save": 1.0}, "feed": {"click": 1.0}}})
    assert settings.inference.outcome_weights == {"home": {"save": 1.0}, "feed": {"click": 1.0}}
    # A configured surface left out of the given weights keeps its default ones.
    partial = Settings(events={"surfaces": ["home", "search"]}, inference={"outcome_weights": {"home": {"save": 1.0}}})
    assert partial.inference.outcome_weights == {"home": {"save": 1.0}, "search": {"click": 0.8, "save": 0.2}}


def test_a_deployment_with_surfaces_of_its_own_gets_no_default_weights_for_the_others() -> None:
    # Without weights given the worker used to refuse to start ("neither configured nor the model's").
    assert Settings(events={"surfaces": ["feed"]}).inference.outcome_weights == {}
    assert Settings(events={"surfaces": ("home", "feed")}).inference.outcome_weights == {"home": {"save": 0.7, "click": 0.3}}


def test_recsys_config_prints_secrets_as_set_only(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The effective settings end up in terminals and bug reports: the token and the API key do
    not (whether they are set does)."""
    import json

    from recsys.config_cli import main as config_main
    from recsys.settings import get_settings

    monkeypatch.setenv("RECSYS_SERVING__AUTH_TOKEN", "s3cret-token")
    get_settings.cache_clear()
    try:
        assert config_main([]) == 0
    finally:
        get_settings.cache_clear()  # the next reader must not see this test's token
    out = capsys.readouterr().out
    assert "s3cret-token" not in out
    printed = json.loads(out)
    assert printed["serving"]["auth_token"] == "<set>" and printed["vector_store"]["api_key"] is None


def test_clients_follow_a_moved_local_broker_unless_told_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    """RECSYS_KAFKA__PORT (what the broker's "port in use" error suggests) moves the clients too:
    they went on reaching whatever answered on 9092."""
    monkeypatch.setenv("RECSYS_KAFKA__PORT", "19092")
    assert Settings().kafka.bootstrap_servers == "localhost:19092"
    monkeypatch.setenv("RECSYS_KAFKA__BOOTSTRAP_SERVERS", "kafka:9092")
    assert Settings().kafka.bootstrap_servers == "kafka:9092"


@pytest.mark.parametrize(("variable", "value", "error"), [
    ("RECSYS_SERVING__AUTH_TOKEN", "", "empty"),  # `${TOKEN}` of an unset variable: auth was silently off
    ("RECSYS_SERVING__AUTH_TOKEN", "s3cret\n", "without surrounding whitespace"),  # could never match
    ("RECSYS_SERVING__TLS_CERT", "", "empty"),  # was Path("."), a directory, at start
    ("RECSYS_SERVING__SNAPSHOT_PATH", "", "empty"),  # was Path("."), failing only at shutdown
    ("RECSYS_VECTOR_STORE__API_KEY", "", "empty"),
])
def test_an_empty_or_unusable_optional_setting_is_refused(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, error: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError, match=error):
        Settings()


def test_a_command_under_invalid_settings_says_what_is_wrong_without_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from recsys.cli import main

    monkeypatch.setenv("RECSYS_KAFKA__PORT", "abc")
    assert main(["kafka", "status"]) == 2
    err = capsys.readouterr().err
    assert "recsys kafka: invalid settings" in err and "kafka.port" in err and "Traceback" not in err
    monkeypatch.delenv("RECSYS_KAFKA__PORT")
    with pytest.raises(SystemExit) as exit_:
        main(["index", "--model-dir", str(tmp_path / "none")])
    assert exit_.value.code == 2 and "run `recsys train --export` first" in capsys.readouterr().err

"""Tests of pipeline.settings: dataclass fields -> typed env vars and CLI flags, one config path."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import pytest

from pipeline import settings
from pipeline.settings import (
    SettingsError,
    add_config_args,
    check_fields,
    config_dict,
    config_from_args,
    config_from_env,
    env_name,
    env_values,
    field_comments,
    parse_value,
)


@dataclass(frozen=True)
class EdgeConfig:
    """A role config with one field of every supported type."""

    deadline_ms: int = 40  # how long the edge waits for cameras, in ms
    threshold: float = 0.5  # entropy threshold of exit 1 (100% = never exit)
    site: str = "lab"  # site id that prefixes every topic
    labels: bool = False  # attach ground-truth labels to results
    exit_threshold: float | None = None  # exit-2 threshold; none disables the exit
    batch: Optional[int] = 8  # frames per batch; none = unbatched
    cameras: tuple[int, ...] = (0, 1, 2)  # camera ids that this edge aggregates
    fusion: Literal["max", "mean", "concat"] = "concat"  # how camera features are fused
    # An own-line comment is not a field's help text.
    views: str = field(
        default="viewpoints",
        metadata={"flags": ["--views", "--view-mode"], "choices": ("viewpoints", "tiles")},
    )
    secret: str = field(default="s3", metadata={"cli": False})  # env only
    model: str = field(default="m.pt", metadata={"help": "path of the checkpoint"})  # replaced
    extra: tuple[int, ...] = field(default_factory=lambda: (7,))  # from a default_factory


@dataclass(frozen=True)
class Odd:
    """A config with a type that settings cannot parse."""

    where: Path = Path(".")  # not a supported type


@dataclass(frozen=True)
class Required:
    """A config with a field that has no default."""

    run_id: str  # id of the run


@dataclass(frozen=True)
class Bounded:
    """A config whose fields declare their ranges, checked by `check_fields` in __post_init__."""

    deadline_ms: int = field(default=50, metadata={"min": 1})  # deadline
    port: int = field(default=0, metadata={"min": 0, "max": 65535})  # a TCP port; 0 = off
    heartbeat_s: float = field(default=2.0, metadata={"above": 0})  # seconds between beats
    cameras: tuple[int, ...] = field(default=(0, 1), metadata={"min": 0})  # camera ids
    t: float | None = field(default=None, metadata={"min": 0, "max": 1})  # none = the card's
    mode: str = field(default="a", metadata={"choices": ("a", "b")})  # a or b

    def __post_init__(self) -> None:
        check_fields(self)


def _parser(cls: type = EdgeConfig, **kwargs) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="t")
    add_config_args(parser, cls, **kwargs)
    return parser


def _from_flags(argv: list[str], cls: type = EdgeConfig, **kwargs) -> object:
    return config_from_args(cls, _parser(cls, **kwargs).parse_args(argv))


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    """No ADA_DDNN_* variable of the test configs leaks in from the machine's environment."""
    for cls in (EdgeConfig, Odd, Required, Bounded):
        for f in dataclasses.fields(cls):
            monkeypatch.delenv(env_name(f.name), raising=False)


def test_env_name():
    assert env_name("deadline_ms") == "ADA_DDNN_DEADLINE_MS"
    assert settings.ENV_PREFIX == "ADA_DDNN_"


def test_defaults_without_env_or_flags():
    assert config_from_env(EdgeConfig) == EdgeConfig()
    assert _from_flags([]) == EdgeConfig()
    assert env_values(EdgeConfig) == {}


def test_every_type_from_env(monkeypatch):
    values = {"DEADLINE_MS": " 25 ", "THRESHOLD": "0.25", "SITE": "roof", "LABELS": "yes",
              "EXIT_THRESHOLD": "0.3", "BATCH": "none", "CAMERAS": "3, 4,5", "FUSION": "max",
              "VIEWS": "tiles", "SECRET": "x", "EXTRA": ""}
    for key, raw in values.items():
        monkeypatch.setenv(f"ADA_DDNN_{key}", raw)
    cfg = config_from_env(EdgeConfig)
    assert cfg == EdgeConfig(deadline_ms=25, threshold=0.25, site="roof", labels=True,
                             exit_threshold=0.3, batch=None, cameras=(3, 4, 5), fusion="max",
                             views="tiles", secret="x", extra=())
    assert len(env_values(EdgeConfig)) == len(values)


def test_optional_float_from_env_is_a_float(monkeypatch):
    """The old env_default returned the text '0.3' for a field whose default was None."""
    monkeypatch.setenv("ADA_DDNN_EXIT_THRESHOLD", "0.3")
    value = config_from_env(EdgeConfig).exit_threshold
    assert isinstance(value, float) and value == 0.3


@pytest.mark.parametrize("raw", ["", "none", "None", " NONE "])
def test_none_spellings(raw):
    assert parse_value(EdgeConfig, "exit_threshold", raw) is None
    assert parse_value(EdgeConfig, "batch", raw) is None


def test_optional_parses_the_inner_type():
    assert parse_value(EdgeConfig, "batch", "3") == 3
    with pytest.raises(SettingsError, match="an int or none"):
        parse_value(EdgeConfig, "batch", "3.5")


@pytest.mark.parametrize(("raw", "expected"), [
    ("1", True), ("true", True), ("TRUE", True), ("Yes", True), ("on", True),
    ("0", False), ("false", False), ("No", False), ("OFF", False), (" off ", False),
])
def test_bool_spellings(raw, expected):
    assert parse_value(EdgeConfig, "labels", raw) is expected


@pytest.mark.parametrize("raw", ["", "2", "y", "enabled", "truee"])
def test_bool_rejects_other_text(raw, monkeypatch):
    monkeypatch.setenv("ADA_DDNN_LABELS", raw)
    message = "ADA_DDNN_LABELS=.*labels of EdgeConfig must be a bool"
    with pytest.raises(SettingsError, match=message):
        config_from_env(EdgeConfig)


@pytest.mark.parametrize("raw", ["1.5", "true", "abc", ""])
def test_int_rejects_non_ints(raw):
    with pytest.raises(SettingsError, match="deadline_ms of EdgeConfig must be an int"):
        parse_value(EdgeConfig, "deadline_ms", raw)


@pytest.mark.parametrize("raw", ["nan", "inf", "-inf", "abc"])
def test_float_rejects_non_finite_and_text(raw):
    with pytest.raises(SettingsError, match="threshold of EdgeConfig must be a finite float"):
        parse_value(EdgeConfig, "threshold", raw)


def test_float_accepts_an_int_text():
    value = parse_value(EdgeConfig, "threshold", "1")
    assert isinstance(value, float) and value == 1.0


def test_tuple_parsing():
    assert parse_value(EdgeConfig, "cameras", "0,1,2") == (0, 1, 2)
    assert parse_value(EdgeConfig, "cameras", " 5 ") == (5,)
    assert parse_value(EdgeConfig, "cameras", "") == ()
    with pytest.raises(SettingsError, match="comma-separated"):
        parse_value(EdgeConfig, "cameras", "0,,1")


def test_literal_and_choices_reject_other_values(monkeypatch):
    message = "fusion of EdgeConfig must be one of 'max', 'mean', 'concat'"
    with pytest.raises(SettingsError, match=message):
        parse_value(EdgeConfig, "fusion", "sum")
    monkeypatch.setenv("ADA_DDNN_VIEWS", "grid")
    with pytest.raises(SettingsError, match="ADA_DDNN_VIEWS='grid': views of EdgeConfig must be one"):
        config_from_env(EdgeConfig)


def test_error_message_names_env_var_field_and_type(monkeypatch):
    monkeypatch.setenv("ADA_DDNN_DEADLINE_MS", "abc")
    with pytest.raises(SettingsError) as err:
        config_from_env(EdgeConfig)
    assert str(err.value) == "ADA_DDNN_DEADLINE_MS='abc': deadline_ms of EdgeConfig must be an int"
    assert isinstance(err.value, ValueError)


def test_every_type_from_flags():
    argv = ["--deadline-ms", "25", "--threshold", "0.25", "--site", "roof", "--labels",
            "--exit-threshold", "0.3", "--batch", "none", "--cameras", "3,4", "--fusion", "mean",
            "--view-mode", "tiles", "--model", "b.safetensors", "--extra", "1,2"]
    cfg = _from_flags(argv)
    assert cfg == EdgeConfig(deadline_ms=25, threshold=0.25, site="roof", labels=True,
                             exit_threshold=0.3, batch=None, cameras=(3, 4), fusion="mean",
                             views="tiles", model="b.safetensors", extra=(1, 2))
    assert isinstance(cfg.exit_threshold, float)


def test_bool_flag_has_a_negative_form(monkeypatch):
    monkeypatch.setenv("ADA_DDNN_LABELS", "on")
    assert _from_flags([]).labels is True
    assert _from_flags(["--no-labels"]).labels is False


@pytest.mark.parametrize(("argv", "message"), [
    (["--deadline-ms", "1.5"],
     "argument --deadline-ms: '1.5': deadline_ms of EdgeConfig must be an int"),
    (["--threshold", "nan"],
     "argument --threshold: 'nan': threshold of EdgeConfig must be a finite float"),
    (["--fusion", "sum"], "argument --fusion: 'sum': fusion of EdgeConfig must be one of"),
    (["--views", "grid"],
     "argument --views/--view-mode: 'grid': views of EdgeConfig must be one of"),
    (["--cameras", "a,b"],
     "argument --cameras: 'a,b': cameras of EdgeConfig must be comma-separated"),
])
def test_bad_flag_values_fail_through_argparse(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        _parser().parse_args(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_literal_flag_gets_choices():
    action = next(a for a in _parser()._actions if a.dest == "fusion")
    assert tuple(action.choices) == ("max", "mean", "concat")


def test_help_text_has_comment_env_var_and_default(monkeypatch):
    monkeypatch.setenv("ADA_DDNN_DEADLINE_MS", "33")
    text = " ".join(_parser(defaults={"site": "dock"}).format_help().split())
    assert "waits for cameras, in ms (env ADA_DDNN_DEADLINE_MS; default 33)" in text
    assert "exit 1 (100% = never exit) (env ADA_DDNN_THRESHOLD; default 0.5)" in text
    assert "(env ADA_DDNN_SITE; default dock)" in text
    assert "path of the checkpoint (env ADA_DDNN_MODEL" in text
    assert "replaced" not in text and "own-line" not in text
    assert "--labels, --no-labels" in text
    assert "--views {viewpoints,tiles}, --view-mode {viewpoints,tiles}" in text


def test_field_comments():
    comments = field_comments(EdgeConfig)
    assert comments["deadline_ms"] == "how long the edge waits for cameras, in ms"
    assert comments["model"] == "path of the checkpoint"
    assert comments["extra"] == "from a default_factory"
    assert "views" not in comments


def test_field_comments_follow_inheritance():
    @dataclass(frozen=True)
    class Child(EdgeConfig):
        deadline_ms: int = 10  # the child's own deadline
        added: int = 1  # a field of the child only

    comments = field_comments(Child)
    assert comments["deadline_ms"] == "the child's own deadline"
    assert comments["added"] == "a field of the child only"
    assert comments["site"] == "site id that prefixes every topic"


@dataclass(frozen=True)
class WithMethod:
    """A method's annotated local, before the field of the same name, is not the field's help."""

    def doubled(self) -> int:
        size: int = 2  # a local, not the field
        return size * self.size

    size: int = 1  # the field's own comment


def test_field_comments_ignore_method_bodies():
    assert field_comments(WithMethod) == {"size": "the field's own comment"}


def test_field_comments_without_source():
    NoSource = dataclasses.make_dataclass("NoSource", [("n", int, 1)])
    assert field_comments(NoSource) == {}


def test_metadata_cli_false_has_no_flag_but_reads_env(monkeypatch, capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["--secret", "x"])
    assert "unrecognized arguments: --secret" in capsys.readouterr().err
    monkeypatch.setenv("ADA_DDNN_SECRET", "from-env")
    assert _from_flags([]).secret == "from-env"


def test_exclude_and_defaults():
    parser = _parser(exclude=["site"], defaults={"deadline_ms": 70})
    args = parser.parse_args([])
    assert not hasattr(args, "site")
    assert config_from_args(EdgeConfig, args).deadline_ms == 70
    with pytest.raises(ValueError, match="not fields of EdgeConfig: nope"):
        _parser(exclude=["nope"])


def test_precedence_overrides_then_flags_then_env_then_default(monkeypatch):
    assert _from_flags([]).deadline_ms == 40
    monkeypatch.setenv("ADA_DDNN_DEADLINE_MS", "50")
    assert _from_flags([]).deadline_ms == 50
    assert config_from_env(EdgeConfig).deadline_ms == 50
    assert _from_flags(["--deadline-ms", "60"]).deadline_ms == 60
    args = _parser().parse_args(["--deadline-ms", "60"])
    assert config_from_args(EdgeConfig, args, deadline_ms=70).deadline_ms == 70
    assert config_from_env(EdgeConfig, deadline_ms=80).deadline_ms == 80


def test_env_fills_fields_missing_from_namespace(monkeypatch):
    monkeypatch.setenv("ADA_DDNN_SITE", "env-site")
    monkeypatch.setenv("ADA_DDNN_DEADLINE_MS", "not-used")
    cfg = config_from_args(EdgeConfig, argparse.Namespace(deadline_ms=5))
    assert (cfg.deadline_ms, cfg.site) == (5, "env-site")


def test_override_skips_a_bad_env_value(monkeypatch):
    monkeypatch.setenv("ADA_DDNN_DEADLINE_MS", "abc")
    assert config_from_env(EdgeConfig, deadline_ms=1).deadline_ms == 1


def test_argument_group_is_accepted():
    parser = argparse.ArgumentParser(prog="t")
    add_config_args(parser.add_argument_group("edge"), EdgeConfig)
    assert config_from_args(EdgeConfig, parser.parse_args(["--batch", "2"])).batch == 2


def test_unknown_type_raises_type_error_naming_the_field():
    with pytest.raises(TypeError, match="where of Odd"):
        _parser(Odd)


def test_required_field_becomes_a_required_flag(capsys):
    assert _from_flags(["--run-id", "r1"], Required) == Required(run_id="r1")
    with pytest.raises(SystemExit):
        _parser(Required).parse_args([])
    assert "--run-id" in capsys.readouterr().err


def test_config_dict_is_json_ready():
    cfg = EdgeConfig(exit_threshold=0.3)
    data = config_dict(cfg)
    assert data["cameras"] == [0, 1, 2] and data["extra"] == [7]
    assert json.loads(json.dumps(data)) == data
    assert EdgeConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}) == cfg


def test_default_urls():
    assert settings.DEFAULT_MQTT_URL == "mqtt://127.0.0.1:1883"
    assert settings.DEFAULT_REDIS_URL == "redis://127.0.0.1:6379/0"


@pytest.mark.parametrize("changes, message", [
    ({"deadline_ms": 0}, "deadline_ms must be >= 1, got 0"),
    ({"port": 70000}, "port must be 0..65535, got 70000"),
    ({"port": -1}, "port must be 0..65535, got -1"),
    ({"heartbeat_s": 0.0}, "heartbeat_s must be > 0, got 0.0"),
    ({"heartbeat_s": float("nan")}, "heartbeat_s must be > 0, got nan"),
    ({"cameras": (0, -2)}, "cameras must be each >= 0, got 0,-2"),
    ({"t": 1.5}, "t must be 0..1, got 1.5"),
    ({"mode": "c"}, "mode must be one of 'a', 'b', got 'c'"),
    ({"deadline_ms": "50"}, "deadline_ms must be a number >= 1, got '50'"),  # a str where a number belongs
])
def test_check_fields_names_the_field_its_range_and_the_value(changes, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        Bounded(**changes)


def test_check_fields_accepts_the_bounds_and_none():
    Bounded(deadline_ms=1, port=65535, heartbeat_s=1e-9, cameras=(), t=None)
    Bounded(port=0, t=0.0, mode="b")


def test_a_value_out_of_range_from_env_or_flags_fails_alike(monkeypatch):
    monkeypatch.setenv("ADA_DDNN_PORT", "99999")
    with pytest.raises(ValueError, match="port must be 0..65535, got 99999"):
        config_from_env(Bounded)
    monkeypatch.delenv("ADA_DDNN_PORT")
    with pytest.raises(ValueError, match="deadline_ms must be >= 1, got 0"):
        _from_flags(["--deadline-ms", "0"], Bounded)


def test_help_text_shows_the_range():
    text = " ".join(_parser(Bounded).format_help().split())
    assert "(env ADA_DDNN_PORT; 0..65535; default 0)" in text
    assert "(env ADA_DDNN_DEADLINE_MS; >= 1; default 50)" in text
    assert "(env ADA_DDNN_HEARTBEAT_S; > 0; default 2.0)" in text

"""An env var set for any config field changes that field in the running process.

For every role command (`camera`, `cameras`, `edge`, `cloud`, `replay`) and EVERY field of its
config dataclass, `ADA_DDNN_<FIELD>` set to a valid non-default value shows up, parsed to the
field's type, in the command's `--print-config` output; a flag beats the env var; a bad env value
makes the command fail with a message naming the variable. The fields' values are derived from
their annotations, defaults and `choices` metadata, so a new field is covered (or, if its type is
new, makes `_candidates` fail loudly) without editing this file.

Most checks go through the real entry point in-process (`pipeline.orchestration.cli.main`, the
function the `ada-ddnn` console script calls); `test_subprocess_*` prove the same through a real
`python -m pipeline.orchestration.cli` process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import typing
from typing import Any, Literal

import pytest

from cloud.worker import CloudConfig
from devices.camera import CameraConfig
from edge.aggregator import EdgeConfig
from pipeline.orchestration.cli import main
from pipeline.orchestration.replay import ReplayConfig
from pipeline.settings import ENV_PREFIX, config_dict, env_name

ROLES: dict[str, tuple[list[str], type]] = {
    "camera": (["camera", "--cam", "2"], CameraConfig),
    "cameras": (["cameras"], CameraConfig),
    "edge": (["edge"], EdgeConfig),
    "cloud": (["cloud"], CloudConfig),
    "replay": (["replay"], ReplayConfig),
}

# Fields a command sets itself, so their env var cannot reach the printed config.
FIXED_BY_COMMAND: dict[str, dict[str, Any]] = {
    # `camera --cam 2` runs exactly camera 2: `cameras` is the override (2,) built from --cam,
    # which beats env and flags alike (there is no --cameras flag on `camera`).
    "camera": {"cameras": [2]},
}

# What a role prints with no env var and no flag, where it differs from the field's default.
COMMAND_DEFAULTS: dict[str, dict[str, Any]] = {
    "camera": {"cameras": [2]},
    "cameras": {"cameras": list(range(6))},  # the `cameras` command runs all six by default
}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    """No ADA_DDNN_* var from the calling shell or CI may leak into these checks."""
    for key in list(os.environ):
        if key.startswith(ENV_PREFIX):
            monkeypatch.delenv(key)




def _default(field: dataclasses.Field) -> Any:
    return field.default if field.default_factory is dataclasses.MISSING else field.default_factory()


def _unwrap(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if type(None) in args and len(args) == 2:
        return next(a for a in args if a is not type(None)), True
    return tp, False


def _candidates(cls: type, field: dataclasses.Field) -> list[tuple[str, Any]]:
    """Two valid values of `field` as (env/flag text, parsed value): both differ from the default
    (the first always; the second may equal it only for bools and two-value choices)."""
    default = _default(field)
    tp, _ = _unwrap(typing.get_type_hints(cls)[field.name])
    choices = field.metadata.get("choices") or (typing.get_args(tp) if typing.get_origin(tp) is Literal else ())
    if choices and typing.get_origin(tp) is not tuple:
        others = [c for c in choices if c != default]
        assert others, f"{field.name}: no choice other than the default {default!r}"
        second = others[1] if len(others) > 1 else default
        return [(str(others[0]), others[0]), (str(second), second)]
    if tp is bool:
        return [("false" if default else "yes", not default), ("1" if default else "off", default)]
    if tp is int:
        # Positive increments keep every validation (batch >= 1, ...) satisfied; `stop` moves
        # further than `start`, so that stop > start holds when both are set.
        base = 0 if default is None else default
        step = 20 if field.name == "stop" else 7
        return [(str(base + step), base + step), (str(base + step + 2), base + step + 2)]
    if tp is float:
        if default is None:
            return [("0.3", 0.3), ("0.6", 0.6)]
        return [(repr(default + 0.25), default + 0.25), (repr(default + 0.5), default + 0.5)]
    if tp is str:
        if field.name == "site_mqtt":  # site=mqtt URL pairs
            return [("a=mqtt://broker.test:1884", "a=mqtt://broker.test:1884"),
                    ("a=mqtt://other.test:1885,b=mqtt://x.test:1", "a=mqtt://other.test:1885,b=mqtt://x.test:1")]
        if field.name.endswith("mqtt_url"):
            return [("mqtt://broker.test:1884", "mqtt://broker.test:1884"),
                    ("mqtt://other.test:1885", "mqtt://other.test:1885")]
        if field.name.endswith("redis_url"):
            return [("redis://cache.test:6380/2", "redis://cache.test:6380/2"),
                    ("redis://other.test:6381/3", "redis://other.test:6381/3")]
        if field.name.endswith("device"):
            values = [v for v in ("cuda", "cpu", "auto") if v != default]
            return [(v, v) for v in values[:2]]
        # Valid as a site id too ([A-Za-z0-9_-]{1,64}), and as a name, group or path.
        return [(f"env_{field.name}-7", f"env_{field.name}-7"), (f"flag_{field.name}-9", f"flag_{field.name}-9")]
    if typing.get_origin(tp) is tuple and typing.get_args(tp)[1:] == (Ellipsis,) and typing.get_args(tp)[0] is int:
        first = (1, 4) if default != (1, 4) else (2, 5)
        return [(",".join(map(str, first)), first), ("3", (3,))]
    raise AssertionError(f"{cls.__name__}.{field.name}: no test value for type {tp!r}; teach _candidates")


def _as_json(value: Any) -> Any:
    """`value` as --print-config shows it once parsed back (tuples become lists)."""
    return json.loads(json.dumps(list(value) if isinstance(value, tuple) else value))


def _flag(field: dataclasses.Field, text: str, value: Any) -> list[str]:
    flag = (field.metadata.get("flags") or ["--" + field.name.replace("_", "-")])[0]
    if isinstance(value, bool):
        return [flag if value else "--no-" + flag[2:]]
    return [flag, text]


def _printed(capsys, argv: list[str]) -> dict[str, Any]:
    capsys.readouterr()
    rc = main([*argv, "--print-config"])
    out = capsys.readouterr().out
    assert rc == 0, f"{argv}: exit {rc}"
    return json.loads(out)


def _same(got: Any, expected: Any) -> bool:
    """Equal and of the same JSON type (2.25 is not "2.25", 1 is not True, 7.0 is not 7)."""
    return type(got) is type(expected) and got == expected


@pytest.mark.parametrize("role", ROLES)
def test_env_var_sets_every_field(role, monkeypatch, capsys):
    argv, cls = ROLES[role]
    fixed = FIXED_BY_COMMAND.get(role, {})

    baseline = _printed(capsys, argv)
    defaults = {**config_dict(cls()), **COMMAND_DEFAULTS.get(role, {})}
    assert baseline == defaults, f"{role}: without env vars the printed config is not the defaults"

    checked, wrong = [], []
    for field in dataclasses.fields(cls):
        var = env_name(field.name)
        text, value = _candidates(cls, field)[0]
        expected = _as_json(value)
        assert expected != _as_json(_default(field)), f"{field.name}: test value equals the default"
        monkeypatch.setenv(var, text)
        got = _printed(capsys, argv)[field.name]
        monkeypatch.delenv(var)
        if field.name in fixed:
            # The command sets this field itself; the env var must not leak through either.
            if got != fixed[field.name]:
                wrong.append(f"{var}={text}: {field.name} is {got!r}, the command fixes it to {fixed[field.name]!r}")
            continue
        checked.append(field.name)
        if not _same(got, expected):
            wrong.append(f"{var}={text}: printed {field.name}={got!r} ({type(got).__name__}), "
                         f"expected {expected!r} ({type(expected).__name__})")
    assert not wrong, f"{role}:\n" + "\n".join(wrong)
    assert len(checked) == len(dataclasses.fields(cls)) - len(fixed) > 0


@pytest.mark.parametrize("role", ROLES)
def test_flag_beats_env_var(role, monkeypatch, capsys):
    argv, cls = ROLES[role]
    fixed = FIXED_BY_COMMAND.get(role, {})
    fields = [f for f in dataclasses.fields(cls) if f.name not in fixed and f.metadata.get("cli", True) is not False]
    assert fields
    flags: list[str] = []
    expected: dict[str, Any] = {}
    for field in fields:
        (env_text, env_value), (flag_text, flag_value) = _candidates(cls, field)
        assert env_value != flag_value, field.name
        monkeypatch.setenv(env_name(field.name), env_text)
        flags += _flag(field, flag_text, flag_value)
        expected[field.name] = _as_json(flag_value)
    got = _printed(capsys, [*argv, *flags])
    wrong = {n: (got[n], v) for n, v in expected.items() if not _same(got[n], v)}
    assert not wrong, f"{role}: (printed, flag) where the env var won: {wrong}"


def _kind(cls: type, field: dataclasses.Field) -> str | None:
    """The parser a field's text goes through; None for plain str, whose text is never bad."""
    tp, optional = _unwrap(typing.get_type_hints(cls)[field.name])
    if field.metadata.get("choices"):
        return "choices"
    if tp is str:
        return None
    return f"{getattr(tp, '__name__', tp)}{' | None' if optional else ''}"


@pytest.mark.parametrize("role", ROLES)
def test_bad_env_value_fails_naming_the_variable(role, monkeypatch, capsys, caplog):
    argv, cls = ROLES[role]
    # One field of each kind of parser the role uses (int, float, bool, float | None, tuple,
    # choices): a main() call costs ~75 ms, one per field would take seconds.
    by_kind: dict[str, dataclasses.Field] = {}
    for field in dataclasses.fields(cls):
        kind = _kind(cls, field)
        if kind and field.name not in FIXED_BY_COMMAND.get(role, {}):
            by_kind.setdefault(kind, field)
    assert "int" in by_kind, by_kind
    for field in by_kind.values():
        var = env_name(field.name)
        monkeypatch.setenv(var, "abc")
        caplog.clear()
        capsys.readouterr()
        rc = main([*argv, "--print-config"])
        out = capsys.readouterr().out
        monkeypatch.delenv(var)
        assert rc != 0, f"{role}: {var}=abc was accepted"
        assert out.strip() == "", f"{role}: {var}=abc still printed a config"
        assert var in caplog.text, f"{role}: the error does not name {var}: {caplog.text!r}"


def test_bad_env_value_of_another_role_does_not_stop_a_command(monkeypatch, capsys):
    """deadline_ms is an edge (and replay) field; the cloud worker has none and must not care."""
    assert "deadline_ms" not in {f.name for f in dataclasses.fields(CloudConfig)}
    monkeypatch.setenv("ADA_DDNN_DEADLINE_MS", "abc")
    monkeypatch.setenv("ADA_DDNN_BATCH", "33")
    assert _printed(capsys, ["cloud"])["batch"] == 33


def _edge_env_all_fields() -> tuple[dict[str, str], dict[str, Any]]:
    env, expected = {}, {}
    for field in dataclasses.fields(EdgeConfig):
        text, value = _candidates(EdgeConfig, field)[0]
        env[env_name(field.name)] = text
        expected[field.name] = _as_json(value)
    return env, expected


def _start(env_vars: dict[str, str], *argv: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    env.update(env_vars)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    return subprocess.Popen([sys.executable, "-m", "pipeline.orchestration.cli", *argv], env=env, cwd=root,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module", autouse=True)
def processes():
    """The real `ada-ddnn` processes of the subprocess tests, started with the module's first
    test so that their interpreter start-up (~2 s each) overlaps the in-process tests."""
    procs = {"edge_all": _start(_edge_env_all_fields()[0], "edge", "--print-config"),
             "edge_bad": _start({"ADA_DDNN_DEADLINE_MS": "abc"}, "edge", "--print-config")}
    results: dict[str, tuple[int, str, str]] = {}

    def result(name: str) -> tuple[int, str, str]:
        if name not in results:
            out, err = procs[name].communicate(timeout=60)
            results[name] = (procs[name].returncode, out, err)
        return results[name]

    yield result
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_subprocess_env_vars_set_every_edge_field(processes):
    """The real process: every EdgeConfig field from its env var at once, one `ada-ddnn edge`."""
    rc, out, err = processes("edge_all")
    assert rc == 0, err
    got = json.loads(out)
    _, expected = _edge_env_all_fields()
    wrong = {n: (got.get(n), v) for n, v in expected.items() if not _same(got.get(n), v)}
    assert not wrong, f"(printed, expected): {wrong}"
    assert isinstance(got["t1"], float) and got["t1"] == 0.3


def test_subprocess_bad_env_value_exits_nonzero_naming_the_variable(processes):
    rc, out, err = processes("edge_bad")
    assert rc != 0
    assert "ADA_DDNN_DEADLINE_MS" in err
    assert "Traceback" not in err, "a bad setting should be a one-line error, not a crash"
    assert out.strip() == ""

import json
import subprocess
import sys

import pytest

from pipeline.orchestration.cli import build_parser, main


def _subcommands(parser):
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            return action.choices
    return {}


def test_every_subcommand_has_help(capsys):
    parser = build_parser()
    names = list(_subcommands(parser))
    assert {"train", "bench", "data"} <= set(names)
    for name in names:
        with pytest.raises(SystemExit) as exit_:
            main([name, "--help"])
        assert exit_.value.code == 0
        assert "usage: ada-ddnn " + name in capsys.readouterr().out


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "pipeline.orchestration.cli", "--help"], capture_output=True, text=True, check=True)
    assert "train" in out.stdout and "bench" in out.stdout


def test_env_fallback_is_shown_in_help(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "ADA_DDNN_DATA" in capsys.readouterr().out


def test_missing_data_is_a_clear_error(tmp_path, caplog):
    assert main(["data", "--data", str(tmp_path)]) == 1
    assert "no CIFAR-10 python-version layout" in caplog.text


def test_bench_train_json(capsys):
    rc = main(["bench", "train", "--json", "--steps", "1", "--warmup", "0", "--batch-size", "8",
               "--camera-channels", "8", "--camera-head-channels", "8", "--edge-channels", "8",
               "--cloud-channels", "8", "--device", "cpu"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert result["benchmark"] == "train" and result["samples_per_s"] > 0 and result["seconds_per_epoch"] > 0

import json
import re
import signal
import subprocess
import sys
import time

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


@pytest.mark.parametrize("argv, reason", [
    (["edge", "--t1", "1.5"], "t1 is a normalized entropy threshold in \\[0, 1\\], got 1.5"),
    (["edge", "--t2", "-0.1"], "t2 is a normalized entropy threshold"),
    (["edge", "--share-group", "#"], "share group must match"),
    (["edge", "--share-group", "a/b"], "share group must match"),
    (["edge", "--admit-window", "-1"], "admit_window must be >= 0, got -1"),
    (["edge", "--threads", "-2"], "threads must be >= 0, got -2"),
    (["edge", "--receive-maximum", "70000"], "receive_maximum must be 1..65535, got 70000"),
    (["edge", "--heartbeat-s", "0"], "heartbeat_s must be > 0 and <= 3600, got 0"),
    (["cameras", "--cameras", "0,-1"], "cameras must be each >= 0, got 0,-1"),
    (["cameras", "--fps", "-1"], "fps must be >= 0, got -1"),
    (["cameras", "--fps", "1e12"], r"fps must be 0 \(as fast as possible\) or 0.001..1e\+06 frames per second"),
    (["replay", "--fps", "0.0001"], r"fps must be 0 \(as fast as possible\) or 0.001"),
    (["replay", "--cloud-device", "tpu"], "device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    (["cameras", "--start", "5", "--stop", "5"], "stop must be above start"),
    (["cameras", "--cameras", "0,0"], "each once"),
    (["cloud", "--sites", ","], "a comma-separated list of site ids"),
    (["cloud", "--max-deliveries", "0"], "max_deliveries must be >= 1, got 0"),
    (["cloud", "--group", ""], "consumer group must match"),
    (["cloud", "--claim-interval-s", "0"], "claim_interval_s must be > 0 and <= 3600, got 0"),
    (["replay", "--t1", "1.5"], "t1 is a normalized entropy threshold"),
    (["replay", "--silent", "1,1"], "each once"),
    (["replay", "--drain-timeout-s", "-1"], "drain_timeout_s must be 0..31536000, got -1"),
    (["replay", "--metrics-port", "70000"], "metrics_port must be 0..65535, got 70000"),
    (["replay", "--aggregators", "0"], "aggregators must be >= 1, got 0"),
    (["status", "--watch", "-1"], "--watch: seconds between looks"),
])
def test_an_option_out_of_range_is_named_before_anything_starts(argv, reason, caplog):
    brokers = ["--mqtt-url", "mqtt://127.0.0.1:1"] + (["--redis-url", "redis://127.0.0.1:1/0"]
                                                      if argv[0] != "cameras" else [])
    assert main([*argv, *brokers]) == 1
    assert any(re.search(reason, r.getMessage()) for r in caplog.records), caplog.text


@pytest.mark.parametrize("command", [["thresholds"], ["evaluate", "--out", "unused/"]])
@pytest.mark.parametrize("flag, reason", [
    (["--min-exit1-rate", "1.5"], "argument --min-exit1-rate: must be in 0..1, got 1.5"),
    (["--confidence", "0.3"], "argument --confidence: must be 0 or in 0.5..1 (1 excluded), got 0.3"),
    (["--confidence", "1"], "argument --confidence: must be 0 or in 0.5..1 (1 excluded), got 1"),
])
def test_a_policy_floor_out_of_range_is_named_before_the_data_loads(command, flag, reason, capsys, tmp_path):
    with pytest.raises(SystemExit) as done:  # refused as the command line is parsed: no data, no checkpoint read
        main([*command, "--checkpoint", "models/ada.safetensors", *flag, "--data", str(tmp_path)])
    assert done.value.code == 2
    assert reason in capsys.readouterr().err


def test_a_report_path_that_cannot_be_written_fails_before_the_replay(caplog):
    assert main(["replay", "--json", "/proc/no/report.json", "--n", "10"]) == 1
    assert "cannot write /proc/no/report.json" in caplog.text
    assert "embedded" not in caplog.text  # no broker was started


def _catches_sigterm(pid: int) -> bool:
    """Whether the process has a handler for SIGTERM (bit 15 of SigCgt in /proc/PID/status)."""
    with open(f"/proc/{pid}/status") as f:
        mask = next(line.split()[1] for line in f if line.startswith("SigCgt:"))
    return bool(int(mask, 16) & (1 << (signal.SIGTERM - 1)))


def test_sigterm_while_a_role_loads_ends_it_with_one_line_and_143():
    # The edge imports torch and loads its checkpoint for a second or more: SIGTERM then, before
    # the role's own handlers are in, must not kill it silently (-15) nor print a traceback.
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.orchestration.cli", "edge", "--site", "sigterm-test",
                             "--redis-url", "redis://127.0.0.1:1/0", "--mqtt-url", "mqtt://127.0.0.1:1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 30
    while not _catches_sigterm(proc.pid):  # main's handler is in: the role is importing torch now
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.stdout else ""
        time.sleep(0.01)
    proc.terminate()
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, out
    assert "stopped by SIGTERM" in out and "Traceback" not in out


def test_a_bad_threads_variable_stops_only_the_commands_that_read_it(monkeypatch, capsys):
    monkeypatch.setenv("ADA_DDNN_THREADS", "abc")
    with pytest.raises(SystemExit) as done:
        main(["--help"])  # the parsers are built without reading it
    assert done.value.code == 0 and "evaluate" in capsys.readouterr().out


@pytest.mark.parametrize("argv, reason", [
    (["train", "--resume", "--init", "models/ada.safetensors", "--out", "x.safetensors"], "give one of them"),
    (["train", "--out", "models/"], "the checkpoint's file name, not a folder"),
    (["train", "--out", "/proc/no/x.safetensors"], "cannot write /proc/no/x.safetensors"),
    (["train", "--epochs", "0"], "epochs must be >= 1, got 0"),
    (["train", "--camera-dropout", "1.5"], "camera_dropout must be 0..1, got 1.5"),
    (["train", "--momentum", "5"], "momentum must be 0..1, got 5.0"),
    (["evaluate", "--checkpoint", "models/ada.safetensors", "--out", "/proc/no/report", "--limit", "5"],
     "cannot write /proc/no/report/report.json"),
    (["evaluate", "--checkpoint", "models/ada.safetensors", "--out", "unused/", "--results", "models/ada.safetensors"],
     "--results: the results page, a Markdown file (.md)"),  # it once wrote the page over the checkpoint
    (["evaluate", "--checkpoint", "models/ada.safetensors", "--out", "README.md", "--limit", "5"],
     "README.md exists and is not a folder"),  # a file: once found out only after the whole evaluation
    (["evaluate", "--checkpoint", "models/ada.safetensors", "--also", "no/such.safetensors", "--out", "unused/"],
     "no/such.safetensors"),
    (["evaluate", "--checkpoint", "models/ada.safetensors", "--out", "unused/", "--device", "bogus"],
     "device must be auto, cpu, cuda or cuda:N, got 'bogus'"),
    (["evaluate", "--checkpoint", "models/ada.safetensors", "--out", " "], "--out: the report folder, got ''"),
    (["train", "--out", "w.json"], "must end in .safetensors (the model card goes beside it, as w.json)"),
    (["train", "--out", ""], "--out: the checkpoint's path (.safetensors), got ''"),
])
def test_offline_commands_name_a_bad_option_before_the_data_loads(argv, reason, caplog, tmp_path):
    assert main([*argv, "--data", str(tmp_path)]) == 1  # an empty data folder: nothing gets that far
    assert reason in caplog.text and "no CIFAR-10" not in caplog.text


def test_a_model_card_that_is_not_an_object_or_has_thresholds_out_of_range_is_named(tmp_path):
    import shutil

    from pipeline.checkpoint import card_path, load_card, read_config, thresholds
    from pipeline.errors import CheckpointError

    ckpt = str(tmp_path / "m.safetensors")
    shutil.copy("models/ada.safetensors", ckpt)
    cfg = read_config(ckpt)
    for text, reason in (("[1, 2]", "the model card is a JSON list, not an object"),
                         ("{not json", "the model card does not read as JSON"),
                         ('{"thresholds": {"t1": 5, "t2": 0.4}}', "thresholds.t1 must be a normalized entropy in [0, 1]"),
                         ('{"thresholds": {"t1": 0.1, "t2": "abc"}}', "thresholds.t2 must be a normalized entropy")):
        with open(card_path(ckpt), "w") as f:
            f.write(text)
        with pytest.raises(CheckpointError, match=re.escape(reason)):
            load_card(ckpt)
            thresholds(ckpt, cfg)
    assert thresholds(ckpt, cfg, 0.5, 0.5) == (0.5, 0.5)  # both given: the card is not read


def test_a_model_card_section_of_the_wrong_type_is_named(tmp_path, caplog):
    import shutil

    from pipeline.checkpoint import card_path

    ckpt = str(tmp_path / "m.safetensors")
    shutil.copy("models/ada.safetensors", ckpt)
    with open(card_path(ckpt), "w") as f:
        f.write('{"train_config": null, "data": "x"}')  # null is as good as absent
    assert main(["thresholds", "--checkpoint", ckpt, "--data", str(tmp_path)]) == 1
    assert "no CIFAR-10" in caplog.text  # got past the card
    with open(card_path(ckpt), "w") as f:
        f.write('{"train_config": "x"}')
    caplog.clear()
    assert main(["evaluate", "--checkpoint", ckpt, "--out", str(tmp_path / "ev"), "--data", str(tmp_path)]) == 1
    assert "the model card's 'train_config' is a JSON str, not an object" in caplog.text


def test_export_refuses_a_checkpoint_short_of_weights_and_leaves_no_part(tmp_path, caplog):
    from safetensors.torch import save_file

    from pipeline.checkpoint import read_meta

    bad = str(tmp_path / "short.safetensors")
    save_file({"x": __import__("torch").zeros(1)}, bad, metadata=read_meta("models/ada.safetensors"))
    assert main(["export", "--checkpoint", bad, "--parts", str(tmp_path / "parts")]) == 1
    assert "do not match" in caplog.text and not (tmp_path / "parts").exists()
    (tmp_path / "file").write_text("")
    caplog.clear()
    assert main(["export", "--checkpoint", "models/ada.safetensors", "--parts", str(tmp_path / "file")]) == 1
    assert "is a file, not a folder" in caplog.text


def test_edge_says_t1_is_ignored_for_a_network_without_exit_1(caplog):
    # DDNN has no camera classifiers: a --t1 given to its edge used to vanish without a word.
    rc = main(["edge", "--checkpoint", "models/ddnn.safetensors", "--t1", "0.5", "--site", "t1-ignored",
               "--mqtt-url", "mqtt://127.0.0.1:1", "--redis-url", "redis://127.0.0.1:1/0"])
    assert rc == 1  # no broker at port 1: it stops there, after the warning
    assert "--t1 0.5 is ignored: models/ddnn.safetensors is a ddnn network" in caplog.text


def test_a_range_error_names_the_variable_or_flag_that_set_the_value(monkeypatch, caplog):
    monkeypatch.setenv("ADA_DDNN_DEADLINE_MS", "0")
    assert main(["edge", "--print-config"]) == 1
    assert "ADA_DDNN_DEADLINE_MS='0': deadline_ms must be 1..86400000, got 0" in caplog.text
    caplog.clear()
    assert main(["edge", "--print-config", "--deadline-ms", "-5"]) == 1  # the flag wins, and is the one named
    assert "--deadline-ms: deadline_ms must be 1..86400000, got -5" in caplog.text

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from cloud.cloud_net import load_cloud
from devices import camera as camera_process
from devices.camera import CameraConfig, load_feed
from devices.camera_net import load_camera
from edge.edge_net import load_edge
from pipeline import checkpoint
from pipeline.checkpoint import GIT_COMMIT_ENV, card_path, epochs_total, git_commit, load_card, read_config
from pipeline.errors import CheckpointError
from pipeline.offline.network import AdaDDNN, load_checkpoint, save_checkpoint
from pipeline.orchestration.cli import main
from tests.helpers import tiny_config


def test_round_trip_is_bit_exact(tmp_path):
    torch.manual_seed(0)
    model = AdaDDNN(tiny_config())
    # Non-trivial BN statistics too.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    path = str(tmp_path / "m.safetensors")
    save_checkpoint(model, path, {"seed": 3})
    loaded = load_checkpoint(path)
    assert loaded.cfg == model.cfg
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    card = load_card(path)
    assert card["seed"] == 3 and card["mode"] == "ada" and card["config"] == model.cfg.to_dict()


def test_mismatched_config_refused(tmp_path):
    path = str(tmp_path / "m.safetensors")
    save_checkpoint(AdaDDNN(tiny_config()), path)
    with pytest.raises(CheckpointError, match="camera_channels: expected 16, checkpoint has 8"):
        load_checkpoint(path, expect=tiny_config(camera_channels=16))


def test_weights_not_matching_config_refused(tmp_path):
    path = str(tmp_path / "m.safetensors")
    state = AdaDDNN(tiny_config(mode="ddnn")).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, path,
              metadata={"format": "ada-ddnn/1", "config": tiny_config(mode="ada").to_json()})
    with pytest.raises(CheckpointError, match="do not match"):
        load_checkpoint(path)


def test_unknown_config_field_refused(tmp_path):
    path = str(tmp_path / "m.safetensors")
    cfg = {**tiny_config().to_dict(), "future_field": 1}
    save_file({"x": torch.zeros(1)}, path, metadata={"format": "ada-ddnn/1", "config": json.dumps(cfg)})
    with pytest.raises(CheckpointError, match="future_field"):
        read_config(path)


def test_not_a_checkpoint(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x80\x04pickle-ish bytes")
    with pytest.raises(CheckpointError):
        load_checkpoint(str(bad))
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(str(tmp_path / "missing.safetensors"))


def test_a_failed_write_leaves_no_temporary_file(tmp_path):
    (tmp_path / "m.safetensors").mkdir()  # a folder where the checkpoint goes: the rename fails
    with pytest.raises(OSError):
        save_checkpoint(AdaDDNN(tiny_config()), str(tmp_path / "m.safetensors"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
    with pytest.raises(CheckpointError, match="need a name of their own"):
        save_checkpoint(AdaDDNN(tiny_config()), str(tmp_path / "w.json"))


def test_card_path():
    assert card_path("models/ada.safetensors") == "models/ada.json"


# --- parts: each process reads only its own tensors, from the full checkpoint or a part file ---

class _SpyOpen:
    """Stands in for `safe_open` in `pipeline.checkpoint`, recording every tensor name read."""

    real = checkpoint.safe_open

    def __init__(self, reads: list[str], *args, **kwargs) -> None:
        self._reads, self._cm = reads, self.real(*args, **kwargs)

    def __enter__(self):
        self._f = self._cm.__enter__()
        return self

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)

    def get_tensor(self, name):
        self._reads.append(name)
        return self._f.get_tensor(name)

    def get_slice(self, name):
        self._reads.append(name)
        return self._f.get_slice(name)

    def __getattr__(self, attr):  # keys(), metadata(), ...
        return getattr(self._f, attr)


@pytest.fixture
def tensor_reads(monkeypatch):
    """Every tensor name read from a checkpoint while the test runs; any other way of reading
    tensors (load_file, torch.load) fails the test."""
    import safetensors.torch

    reads: list[str] = []
    monkeypatch.setattr(checkpoint, "safe_open", lambda *a, **kw: _SpyOpen(reads, *a, **kw))

    def refuse(*args, **kwargs):
        raise AssertionError("tensors read around pipeline.checkpoint")

    for owner, name in ((safetensors.torch, "load_file"), (safetensors.torch, "load"), (torch, "load")):
        monkeypatch.setattr(owner, name, refuse)
    return reads


def _keys_of(path, prefix):
    """Names of the tensors under `prefix`, from the header (no tensor is read, none recorded)."""
    with _SpyOpen.real(path, framework="pt") as f:
        return {k for k in f.keys() if k.startswith(prefix)}  # noqa: SIM118 - safe_open is not iterable


def test_camera_process_reads_only_its_own_tensors(stream_setup, tensor_reads, monkeypatch):
    path, _, data, _, _ = stream_setup
    loaded_from = []
    monkeypatch.setattr(camera_process, "load_cifar10", lambda root: loaded_from.append(root) or data)
    own = _keys_of(path, "cameras.2.")
    feed = load_feed(CameraConfig(checkpoint=path, cameras=(2,), data="/nowhere/cifar"))
    assert loaded_from == ["/nowhere/cifar"] and set(feed.modules) == {2}
    assert tensor_reads, "the spy saw no tensor read"
    assert [k for k in tensor_reads if not k.startswith("cameras.2.")] == []
    assert set(tensor_reads) == own and len(tensor_reads) == len(own)


@pytest.mark.parametrize("loader, prefix", [(load_edge, "edge."), (load_cloud, "cloud.")], ids=["edge", "cloud"])
def test_edge_and_cloud_read_only_their_own_tensors(stream_setup, tensor_reads, loader, prefix):
    path = stream_setup[0]
    own = _keys_of(path, prefix)
    loader(path)
    assert tensor_reads, "the spy saw no tensor read"
    assert [k for k in tensor_reads if not k.startswith(prefix)] == []
    assert set(tensor_reads) == own and len(tensor_reads) == len(own)


def _copy_checkpoint(path, into):
    """The checkpoint at `path` and its model card, copied into the folder `into`."""
    os.makedirs(into, exist_ok=True)
    out = os.path.join(into, os.path.basename(path))
    shutil.copy(path, out)
    shutil.copy(card_path(path), card_path(out))
    return out


@pytest.fixture(scope="module")
def exported(stream_setup, tmp_path_factory):
    """The tiny checkpoint's parts, written by `ada-ddnn export`: the parts folder."""
    root = tmp_path_factory.mktemp("parts")
    full = _copy_checkpoint(stream_setup[0], str(root / "full"))
    assert main(["export", "--checkpoint", full, "--parts", str(root / "parts")]) == 0
    return root / "parts"


def _isolated(part_file, tmp_path):
    """One part file and its card alone in an empty folder."""
    return _copy_checkpoint(str(part_file), str(tmp_path / ("alone-" + part_file.stem)))


@torch.no_grad()
def test_export_writes_every_part_and_each_loads_alone(stream_setup, tmp_path, capsys):
    path, model, _, t1, t2 = stream_setup
    cfg = model.cfg
    full = _copy_checkpoint(path, str(tmp_path / "full"))
    capsys.readouterr()
    assert main(["export", "--checkpoint", full, "--parts", str(tmp_path / "parts")]) == 0
    printed = json.loads(capsys.readouterr().out)
    names = checkpoint.part_names(cfg)
    assert names == [f"camera{k}" for k in range(cfg.num_cameras)] + ["edge", "cloud"] and cfg.num_cameras == 6
    parts = tmp_path / "parts"
    assert sorted(os.listdir(parts)) == sorted([f"{n}.safetensors" for n in names] + [f"{n}.json" for n in names])
    assert sorted(printed["parts"]) == sorted(str(parts / f"{n}.safetensors") for n in names)
    full_state = checkpoint.read_tensors(full)
    os.remove(full)  # from here on, only the part files exist
    os.remove(card_path(full))

    torch.manual_seed(1)
    views = torch.randn(3, 3, cfg.image_size, cfg.image_size)
    fused = torch.randn(3, cfg.fused_channels, cfg.wire_size, cfg.wire_size)
    covered = set()
    for name in names:
        prefix = checkpoint.part_prefix(name, cfg)
        alone = _isolated(parts / f"{name}.safetensors", tmp_path)
        assert sorted(os.listdir(os.path.dirname(alone))) == [f"{name}.json", f"{name}.safetensors"]
        card = load_card(alone)
        assert card["part"] == name and card["thresholds"] == {"t1": t1, "t2": t2}
        state = checkpoint.read_tensors(alone)
        assert state.keys() == {k for k in full_state if k.startswith(prefix)}, name
        assert all(torch.equal(v, full_state[k]) for k, v in state.items()), name
        covered |= state.keys()
        if name.startswith("camera"):
            k = int(name[len("camera"):])
            wire, logits = load_camera(alone, k)(views)
            want_wire, want_logits = model.cameras[k](views)
            assert torch.equal(wire, want_wire) and torch.equal(logits, want_logits), name
        elif name == "edge":
            assert torch.equal(load_edge(alone)(fused), model.edge(fused))
        else:
            assert torch.equal(load_cloud(alone)(fused), model.cloud(fused))
    assert covered == full_state.keys(), "the parts do not add up to the checkpoint"


@pytest.mark.parametrize("load, wanted", [(lambda p: load_camera(p, 1), "camera1"), (load_edge, "edge"),
                                          (load_cloud, "cloud")], ids=["as-camera1", "as-edge", "as-cloud"])
def test_a_part_file_refuses_to_load_as_another_part(exported, tmp_path, load, wanted):
    alone = _isolated(exported / "camera3.safetensors", tmp_path)
    assert load_camera(alone, 3) is not None  # the file itself is fine
    with pytest.raises(CheckpointError, match=f"'camera3', not '{wanted}'"):
        load(alone)


def test_thresholds_come_from_a_part_files_card(stream_setup, exported, tmp_path):
    path, model, _, t1, t2 = stream_setup
    assert (t1, t2) != (0.0, 0.0)
    want = checkpoint.thresholds(path, model.cfg)
    assert want == (t1, t2)
    for name in checkpoint.part_names(model.cfg):
        alone = _isolated(exported / f"{name}.safetensors", tmp_path)
        assert checkpoint.thresholds(alone, checkpoint.read_config(alone)) == want, name
    edge_part = _isolated(exported / "edge.safetensors", tmp_path / "edge-only")
    os.remove(card_path(edge_part))  # the card is where they come from: without it, none
    with pytest.raises(CheckpointError, match="no thresholds"):
        checkpoint.thresholds(edge_part, model.cfg)


def test_export_refuses_a_part_file(exported, tmp_path):
    with pytest.raises(CheckpointError, match="export needs the full checkpoint"):
        checkpoint.export_parts(str(exported / "camera3.safetensors"), str(tmp_path / "again"))
    assert not (tmp_path / "again").exists()


def test_part_files_are_readable_by_others(exported):
    assert all(p.stat().st_mode & 0o044 == 0o044 for p in exported.glob("*.safetensors"))


def test_epochs_total_adds_up_a_chain_of_starts():
    assert epochs_total({"epochs": 30}) == 30
    assert epochs_total({"epochs": 12, "initialized_from": {"epochs": 30}}) == 42
    assert epochs_total({"epochs": 3, "initialized_from": {"epochs": 12, "epochs_total": 42}}) == 45
    assert epochs_total({"epochs": 3, "initialized_from": {"epochs": None}}) is None


def test_git_commit_outside_a_checkout_is_the_senders_word(tmp_path, monkeypatch):
    monkeypatch.delenv(GIT_COMMIT_ENV, raising=False)
    assert git_commit(str(tmp_path)) is None  # a copy without .git, and nobody said where it came from
    monkeypatch.setenv(GIT_COMMIT_ENV, "0123abcd")
    assert git_commit(str(tmp_path)) == "0123abcd"
    here = git_commit()  # this checkout answers for itself, whatever the variable says
    assert here is None or here != "0123abcd"


@pytest.mark.parametrize("name", ["camera0", "cloud"])
def test_export_refuses_to_write_over_its_own_checkpoint(stream_setup, tmp_path, name):
    # The checkpoint named like a part, in the parts folder: each part was read from it after the
    # parts before had been written over it (camera0: the source became a part, the rest empty).
    full = str(tmp_path / f"{name}.safetensors")
    shutil.copy(stream_setup[0], full)
    shutil.copy(card_path(stream_setup[0]), card_path(full))
    before = (tmp_path / f"{name}.safetensors").read_bytes()
    with pytest.raises(CheckpointError, match="would write over the checkpoint itself"):
        checkpoint.export_parts(full, str(tmp_path))
    assert (tmp_path / f"{name}.safetensors").read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [f"{name}.json",
                                                                                                f"{name}.safetensors"]

"""``train --report-to tensorboard wandb``: the real packages write their files, and the test
reads them back with the packages' own readers (TensorBoard's EventAccumulator; W&B's record
protobuf from the offline run file)."""

import json
from pathlib import Path

import pytest

from rlhf_engine.runlog import RunLog
from rlhf_engine.sinks import REPORT_TO, TensorBoardSink, check_report_to, open_sinks
from tests.test_train import ANSWERS, GROUPED, metrics, train, write_jsonl

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("sinks-data")
    (root / "grouped.yaml").write_text(GROUPED)
    return {"answers": write_jsonl(root / "answers.jsonl", ANSWERS), "grouped": str(root / "grouped.yaml")}


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator",
                                            reason="tensorboard (the dev extra) is not installed")  # fmt: skip
    events = event_accumulator.EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def wandb_records(path: Path) -> list:
    """The protobuf records of a W&B run file: a 7-byte file header, then LevelDB-log blocks of
    32 KiB holding chunks (crc32c 4 bytes, length 2 bytes little-endian, type 1 byte: 1 full,
    2 first, 3 middle, 4 last) that a record's bytes may span."""
    from wandb.proto import wandb_internal_pb2

    data, block, header = path.read_bytes(), 32768, 7
    assert data[:4] == b":W&B"
    pos, payload, out = header, b"", []
    while pos + header <= len(data):
        room = block - pos % block
        if room < header:  # a block's tail too short for a chunk header is padding
            pos += room
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        payload += data[pos + header:pos + header + length]
        pos += header + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            out.append(record)
            payload = b""
    return out


def test_check_report_to_names_the_flag_and_the_pip_command(monkeypatch):
    assert check_report_to(None) == () and check_report_to(["wandb", "wandb"]) == ("wandb",)
    with pytest.raises(ValueError, match=r"--report-to must be among \('tensorboard', 'wandb'\), got 'mlflow'"):
        check_report_to(["mlflow"])
    with pytest.raises(TypeError, match="--report-to must be a list"):
        check_report_to("wandb")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ValueError, match=r"--report-to wandb: the wandb package is not installed \(pip install wandb\)"):
        check_report_to(REPORT_TO)


def test_a_missing_sink_package_fails_before_anything_loads(files, tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    assert train("grpo", files["answers"], files["grouped"], tmp_path / "out", "--report-to", "tensorboard") == 2
    assert "pip install tensorboard" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before the run started


def test_tensorboard_gets_every_metric_of_the_run(files, tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard (the dev extra) is not installed")
    assert train("grpo", files["answers"], files["grouped"], tmp_path, "--report-to", "tensorboard") == 0
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    logged = metrics(tmp_path)
    for name in ("reward_mean", "kl", "policy_loss", "entropy"):
        assert scalars[f"grpo/{name}"] == [(r["step"], pytest.approx(r[name], rel=1e-6, abs=1e-7)) for r in logged]
    assert "grpo/time" not in scalars and "grpo/step" not in scalars


def test_tensorboard_resume_purges_the_steps_run_again(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard (the dev extra) is not installed")
    with RunLog(None, total=5, desc="a", quiet=True, sinks=[TensorBoardSink(tmp_path)]) as log:
        for k in range(5):
            log.log("ppo", k, {"reward": float(k), "kl": float("nan")})
    with RunLog(None, total=2, desc="b", quiet=True, sinks=[TensorBoardSink(tmp_path, purge_step=3)]) as log:
        for k in (3, 4):
            log.log("ppo", k, {"reward": 10.0 * k, "kl": 0.5})
    scalars = tensorboard_scalars(tmp_path)
    assert scalars["ppo/reward"] == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
    assert scalars["ppo/kl"] == [(3, 0.5), (4, 0.5)]  # NaN (null in the log) is skipped


def test_wandb_offline_run_holds_the_metrics_and_the_config(files, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb (the dev extra) is not installed")
    monkeypatch.delenv("WANDB_MODE", raising=False)  # the sink must choose offline itself
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert train("grpo", files["answers"], files["grouped"], tmp_path, "--report-to", "wandb") == 0
    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    records = wandb_records(run_file)
    config = {item.key: json.loads(item.value_json) for r in records if r.HasField("run") for item in r.run.config.update}
    assert config["algo"] == "grpo" and config["model"] == "tiny" and config["config"]["group_size"] == 8
    rows = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            for r in records if r.HasField("history")]  # fmt: skip
    logged = metrics(tmp_path)
    assert [row["grpo/step"] for row in rows] == [r["step"] for r in logged]
    for row, r in zip(rows, logged):
        assert row["grpo/reward_mean"] == pytest.approx(r["reward_mean"]) and row["grpo/kl"] == pytest.approx(r["kl"])


def test_open_sinks_without_names_is_empty(tmp_path):
    assert open_sinks(None, tmp_path) == [] and not any(tmp_path.iterdir())

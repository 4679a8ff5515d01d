"""``rlhf-engine bench``: the benchmark command runs on the CPU and writes its JSON."""

import json

from rlhf_engine import cli


def test_bench_quick_writes_json_with_provenance(tmp_path, capsys):
    assert cli.main(["bench", "--quick", "--only", "advantages", "--out", str(tmp_path), "--device", "cpu"]) == 0
    report = json.loads((tmp_path / "bench_advantages.json").read_text())
    for key in ("device", "commit", "date", "torch"):
        assert report[key], key
    assert report["quick"] is True
    rows = report["results"]
    impls = {row["impl"] for row in rows}
    assert any(impl.startswith("ours") for impl in impls) and any(impl.startswith("eager") for impl in impls)
    timed = [row for row in rows if row["error"] is None]
    assert timed and all(row["ms"] > 0 for row in timed)
    out = capsys.readouterr().out
    assert "ours (torch)" in out  # the table is printed
    from rlhf_engine.benchmarks.common import liger_installed

    # without Liger-Kernel a line says so (its rows would otherwise just be missing)
    assert ("Liger-Kernel: not installed" in out) != liger_installed()


def test_version_prints_the_package_version(capsys):
    import pytest

    import rlhf_engine

    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"rlhf-engine {rlhf_engine.__version__}"


def test_bench_rejects_an_unknown_family(capsys):
    assert cli.main(["bench", "--quick", "--only", "no_such_family"]) == 2
    assert "no_such_family" in capsys.readouterr().err


def test_bench_train_step_quick_checks_and_times_ours_and_eager(tmp_path, monkeypatch):
    """The end-to-end step benchmark: ours and eager agree (asserted inside the run), then
    both are timed on the same tiny model; the JSON rows carry tokens/s. The torch backend
    only: timing Triton under the interpreter would take most of a minute."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert cli.main(["bench", "--quick", "--only", "train_step", "--out", str(tmp_path), "--device", "cpu"]) == 0
    rows = json.loads((tmp_path / "bench_train_step.json").read_text())["results"]
    timed = {row["impl"]: row for row in rows if row["error"] is None}
    assert "ours-torch" in timed and "eager" in timed
    assert all(row["ms"] > 0 and row["tokens_per_s"] > 0 and row["flops"] > 0 for row in timed.values())


def test_demo_time_budget_verdict():
    """The demo's time budget is the benchmark's verdict on the slowest seed, not a test's assertion."""
    from rlhf_engine.benchmarks.demo_time import verdict

    over = verdict({0: 120.0, 1: 310.4, 2: 200.0}, budget=300.0)
    assert over["slowest_s"] == 310.4 and not over["within_budget"]
    assert over["seconds"] == {"0": 120.0, "1": 310.4, "2": 200.0}
    assert verdict({0: 299.9}, budget=300.0)["within_budget"]

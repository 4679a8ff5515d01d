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
    assert "ours (torch)" in capsys.readouterr().out  # the table is printed


def test_bench_rejects_an_unknown_family(capsys):
    assert cli.main(["bench", "--quick", "--only", "no_such_family"]) == 2
    assert "no_such_family" in capsys.readouterr().err

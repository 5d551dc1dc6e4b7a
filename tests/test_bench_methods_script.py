"""The method benchmark's reference and library agree on a small grid."""

import json

from bench.benchmarks.methods import main


def test_bench_methods_small_grid(tmp_path):
    out = tmp_path / "r.json"
    main(["--seeds", "2", "--shots", "1", "5", "all", "--methods", "qi2018", "knn", "hosoda2024",
              "ls-oracle", "simpleshot", "l2/kmeans:k=3/l2/l2/max", "--repeats", "1", "--out", str(out)])
    results = json.loads(out.read_text())["datasets"]
    assert set(results) == {"gmm", "digits"}  # both comparisons by default
    for result in results.values():
        assert {r["method"] for r in result["rows"]} == {"qi2018", "knn", "hosoda2024", "ls-oracle", "simpleshot",
                                                         "l2/kmeans:k=3/l2/l2/max"}
        for row in result["rows"]:
            assert row["grid_acc"] == row["lib_acc"], row  # sharing stages changes no prediction
            if "kmeans" not in row["method"]:  # deterministic methods agree exactly
                assert abs(row["acc_diff_points"]) < 0.2, row
        assert result["overall"]["speedup"] > 0 and result["overall"]["speedup_one_at_a_time"] > 0
        assert set(result["per_shot"]) == {"1", "5", "all"}
        # the k-means grid is timed on its own, against the reference's k-means rows only
        assert result["kmeans"]["methods"] == ["l2/kmeans:k=3/l2/l2/max"]
        kmeans_ref = sum(r["ref_time_s"] for r in result["rows"] if r["method"] == "l2/kmeans:k=3/l2/l2/max")
        assert abs(result["kmeans"]["ref_time_s"] - kmeans_ref) < 1e-12


def test_timing_rounds_keep_each_cells_best_and_refuse_changed_results():
    import pytest

    from bench.benchmarks.methods import best_of_rounds

    order, times = [], iter([{"a": 3.0, "b": 1.0}, {"a": 2.0, "b": 5.0}, {"a": 4.0, "b": 0.5}])

    def side(name, seq):
        def run():
            order.append(name)
            return {"acc": 1.0}, next(seq)
        return run

    other = iter([{"c": 1.0}] * 3)
    out = best_of_rounds({"x": side("x", times), "y": side("y", other)}, 3)
    assert out["x"][1] == {"a": 2.0, "b": 0.5}  # each cell's best round, not one round's times
    assert order == ["x", "y"] * 3  # the sides take turns in every round
    changing = iter([({"acc": 1.0}, {"a": 1.0}), ({"acc": 0.5}, {"a": 1.0})])
    with pytest.raises(SystemExit, match="accuracies changed between timing rounds 1 and 2"):
        best_of_rounds({"z": lambda: next(changing)}, 2)


def test_zero_timing_rounds_are_refused_before_any_work(capsys):
    import pytest

    with pytest.raises(SystemExit) as exc:
        main(["--repeats", "0", "--data", "gmm"])
    assert exc.value.code == 2 and "--repeats, --seeds and --threads must each be at least 1" in capsys.readouterr().err


def test_the_script_reports_a_bad_shot_count_without_a_traceback(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "scripts" / "bench_methods.py"
    out = subprocess.run([sys.executable, str(script), "--data", "digits", "--shots", "600", "--seeds", "1",
                          "--repeats", "1", "--out", str(tmp_path / "r.json")], capture_output=True, text=True)
    assert out.returncode == 2
    assert "error: not enough samples for shots=600" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "r.json").exists()

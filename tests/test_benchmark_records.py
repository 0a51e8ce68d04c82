"""Benchmark results are data: every row says where, when and with what it was measured; nothing is lost."""
import csv

from benchmarks.record import LIBRARIES, append_rows


def test_rows_carry_provenance_and_appending_new_columns_keeps_old_rows(tmp_path):
    path = tmp_path / "bench.csv"
    append_rows("bench", [{"op": "a", "ms": 1.5}], "device A", path)
    append_rows("bench", [{"op": "b", "ms": 2.0, "gbs": 900}], "device B", path)
    rows = list(csv.DictReader(path.open(newline="")))
    assert [(r["op"], r["ms"], r["gbs"], r["device"]) for r in rows] == [("a", "1.5", "", "device A"),
                                                                         ("b", "2.0", "900", "device B")]
    for row in rows:
        assert row["commit"] and row["date"].endswith("Z") and row["python"]
        assert all(row[lib] for lib in LIBRARIES)


def test_the_shipped_results_files_carry_provenance_on_every_row():
    from benchmarks.record import RESULTS

    files = sorted(RESULTS.glob("*.csv"))
    assert files
    for path in files:
        for row in csv.DictReader(path.open(newline="")):
            assert row["device"] and row["commit"] and row["date"] and row["torch"], (path.name, row)


def test_timed_benchmarks_write_through_the_same_records(tmp_path):
    import torch

    from benchmarks.timing import append_csv, run_stamp

    path = tmp_path / "train_throughput.csv"
    stamp = run_stamp(torch.device("cpu"))
    append_csv(path, [{**stamp, "ms": 1.0}])
    append_csv(path, [{**stamp, "ms": 2.0, "mfu": 0.1}])  # a new column widens the one file
    rows = list(csv.DictReader(path.open(newline="")))
    assert [(r["ms"], r["mfu"]) for r in rows] == [("1.0", ""), ("2.0", "0.1")]
    assert rows[0]["torch"] and rows[0]["load"] and sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_the_commit_comes_from_the_environment_where_there_is_no_git(tmp_path, monkeypatch):
    from benchmarks import record

    monkeypatch.setattr(record, "REPO", tmp_path)  # a folder outside any checkout, as on a GPU machine
    monkeypatch.delenv(record.COMMIT_ENV, raising=False)
    assert record.git_commit() == "unknown"
    monkeypatch.setenv(record.COMMIT_ENV, "0123456789ab")
    assert record.git_commit() == "0123456789ab"

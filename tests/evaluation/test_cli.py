"""`python -m pipeline evaluate` end to end on real shard sets written by `prepare` and ShardWriter."""
import json

import pytest

from pipeline.cli import main
from pipeline.data.ingest import prepare
from pipeline.evaluation import degrade

from .conftest import write_shard_set


@pytest.fixture(scope="module")
def shard_sets(tmp_path_factory, digits_halves):
    root = tmp_path_factory.mktemp("sets")
    real, real_labels, held_out, held_out_labels = digits_halves
    prepare("digits", root / "real", progress=False)  # all 1797 real digits, as users make them
    fake_source = {"kind": "generated", "model": "none (a test set)"}
    return {
        "real": root / "real",
        "held_out": write_shard_set(root / "held_out", held_out, held_out_labels, fake_source),
        "shuffled": write_shard_set(root / "shuffled", degrade.shuffle_pixels(held_out), held_out_labels,
                                    fake_source),
    }


def evaluate(capsys, *args):
    code = main(["evaluate", *map(str, args)])
    out = capsys.readouterr()
    return code, out


def test_evaluate_prints_table_then_json_last(capsys, shard_sets, tmp_path):
    code, out = evaluate(capsys, "--real", shard_sets["real"], "--fake", shard_sets["held_out"],
                         "--num", 500, "--out", tmp_path / "m.json")
    assert code == 0
    lines = out.out.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["features"] == "digitsnet"  # picked from the real manifest's source kind
    assert (result["num_real"], result["num_fake"]) == (500, 500)
    assert result["real_total"] == 1797 and result["fake_total"] == 1797 - 1797 // 2
    assert "n_real=500, n_fake=500" in out.out and "fd_digitsnet" in out.out
    assert json.loads((tmp_path / "m.json").read_text()) == result
    assert result["real_accuracy_digitsnet"] > 0.95


def test_evaluate_ranks_shuffled_pixels_worse(capsys, shard_sets):
    scores = {}
    for name in ("held_out", "shuffled"):
        code, out = evaluate(capsys, "--real", shard_sets["real"], "--fake", shard_sets[name], "--num", 400)
        assert code == 0
        scores[name] = json.loads(out.out.strip().splitlines()[-1])
    for metric in ("fd_digitsnet", "kid_digitsnet"):
        assert scores["held_out"][metric] < scores["shuffled"][metric]
    assert scores["held_out"]["precision_digitsnet"] > scores["shuffled"]["precision_digitsnet"]


def test_same_seed_same_subset_and_metrics(capsys, shard_sets):
    args = ("--real", shard_sets["real"], "--fake", shard_sets["held_out"], "--num", 300, "--seed", 5)
    first = json.loads(evaluate(capsys, *args)[1].out.strip().splitlines()[-1])
    second = json.loads(evaluate(capsys, *args)[1].out.strip().splitlines()[-1])
    assert first == second


def test_kid_is_reported_with_its_units_and_what_its_spread_means(capsys, shard_sets):
    code, out = evaluate(capsys, "--real", shard_sets["real"], "--fake", shard_sets["held_out"], "--num", 300)
    result = json.loads(out.out.strip().splitlines()[-1])
    assert "cubic kernel" in result["kid_units"] and "subsets of 150 per set" in result["kid_spread"]
    assert "kid: squared MMD" in out.out


@pytest.mark.parametrize("bad, message", [
    (("--fake", "{tmp}/missing"), "does not exist"),
    (("--fake", "{tmp}"), "manifest.json"),
    ((), "nothing to evaluate"),
    (("--features", "fashionnet", "--fake", "{held_out}"), None),  # fine: resized, must not crash
])
def test_bad_input_is_named(capsys, shard_sets, tmp_path, bad, message):
    bad = [b.format(tmp=tmp_path, held_out=shard_sets["held_out"]) for b in bad]
    code, out = evaluate(capsys, "--real", shard_sets["real"], "--num", 100, *bad)
    if message is None:
        assert code == 0 and json.loads(out.out.strip().splitlines()[-1])["features"] == "fashionnet"
    else:
        assert code == 2 and message in out.err and "Traceback" not in out.err

import pytest

from bench import BenchError
from bench.imprint import PRESETS, MethodSpec, expand_grid, resolve


@pytest.mark.parametrize(
    "text, canonical",
    [
        ("l2/kmeans:k=20/l2/l2/max", "l2/kmeans:k=20/l2/l2/max"),
        ("l2/kmeans:k=20,n_init=1/l2/l2/max", "l2/kmeans:k=20/l2/l2/max"),  # default dropped
        ("l2/kmeans:k=20,n_init=3/l2/l2/max", "l2/kmeans:k=20,n_init=3/l2/l2/max"),
        ("none/mean/none/none/mnn:m=1,metric=euclidean", "none/mean/none/none/mnn"),
        (
            " center-l2 / all / quantile / center-l2 / mnn:metric=cosine,weight=distance,m=3 ",
            "center-l2/all/quantile/center-l2/mnn:m=3,weight=distance,metric=cosine",
        ),
        ("none/ls:lam=0.01/none/none/max", "none/ls:lam=0.01/none/none/max"),
    ],
)
def test_spec_round_trips_through_canonical_string(text, canonical):
    spec = MethodSpec.parse(text)
    assert str(spec) == canonical
    assert MethodSpec.parse(str(spec)) == spec


def test_every_preset_resolves_and_round_trips():
    assert {"qi2018", "hosoda2024", "janson2022", "westerhoff2025", "simpleshot", "ncm", "knn",
            "ls-oracle"} <= set(PRESETS)
    for name, text in PRESETS.items():
        spec = resolve(name)
        assert spec.name == name
        assert spec == MethodSpec.parse(text)
        assert MethodSpec.parse(str(spec)) == spec


def test_preset_rows_match_the_literature():
    assert str(resolve("qi2018")) == "l2/mean/l2/l2/max"
    assert str(resolve("hosoda2024")) == "none/mean/quantile/none/max"
    j = resolve("janson2022")
    assert (j.gen.name, j.agg.get("agg", "m"), j.agg.get("agg", "metric")) == ("mean", 1, "euclidean")
    w = resolve("westerhoff2025")
    assert (w.norm_pre.name, w.gen.name, w.gen.get("gen", "k"), w.norm_post.name) == ("l2", "kmeans", 20, "l2")


def test_fields_expose_each_stage_and_option_as_its_own_key():
    f = resolve("westerhoff2025").fields()
    assert f["gen"] == "kmeans" and f["gen.k"] == 20 and f["norm_pre"] == "l2"
    assert f["agg"] == "max" and f["method"] == "westerhoff2025"


@pytest.mark.parametrize(
    "text, words",
    [
        ("l2/kmean:k=3/l2/l2/max", ["unknown gen method 'kmean'", "kmeans"]),
        ("l2/kmeans:k=0/l2/l2/max", ["k=0", ">= 1"]),
        ("l2/kmeans/l2/l2/max", ["needs option 'k'"]),
        ("l2/kmeans:k=two/l2/l2/max", ["expected an int"]),
        ("l2/mean/l2/max", ["4 stage(s)", "NORM_pre/GEN/NORM_post/NORM_inf/AGG"]),
        ("l2/mean/l2/l2/mnn:metric=hamming", ["hamming", "cosine"]),
        ("l2/mean/l2/l2/mnn:q=1", ["unknown option 'q'"]),
        ("none/ls/none/none/mnn", ["not a valid combination", "'ls'"]),
        ("nope", ["unknown method 'nope'", "qi2018"]),
    ],
)
def test_bad_specs_name_the_problem(text, words):
    with pytest.raises(BenchError) as err:
        resolve(text)
    for w in words:
        assert w in str(err.value)


def test_grid_expands_lists_and_drops_nonsense_with_reasons():
    grid = expand_grid(["l2|none/kmeans:k=[1,5]|mean/l2/l2/max|mnn:m=[1,3]", "qi2018"])
    texts = {str(s) for s in grid.specs}
    # 2 norms x 3 gens x 3 aggs = 18 combos; mnn:m=3 over k=1 and mean is dropped (4)
    assert len(grid.specs) + len(grid.dropped) == 19
    assert "l2/kmeans:k=5/l2/l2/mnn:m=3" in texts
    dropped = dict(grid.dropped)
    assert "only counts ties" in dropped["l2/mean/l2/l2/mnn:m=3"]
    assert "same head as 'l2/mean/l2/l2/max'" in dropped["qi2018"]
    assert len(grid.specs) == 14


def test_grid_with_only_nonsense_is_an_error():
    with pytest.raises(BenchError, match="no valid method"):
        expand_grid("none/ls/none/none/mnn")


def test_options_that_differ_in_the_seventh_digit_keep_distinct_names():
    """Grids key shared stages by a stage's canonical string: two values that print alike under %g
    would share one head's scores (found by review: lse:t=0.5 and t=0.50000004)."""
    a, b = MethodSpec.parse("l2/all/none/l2/lse:t=0.5"), MethodSpec.parse("l2/all/none/l2/lse:t=0.50000004")
    assert str(a) != str(b) and MethodSpec.parse(str(b)) == b
    assert str(MethodSpec.parse("l2/all/none/l2/lse:t=1000004")).endswith("t=1000004.0")
    assert str(MethodSpec.parse("l2/all/none/l2/lse:t=3")) == "l2/all/none/l2/lse:t=3"  # short forms stay short

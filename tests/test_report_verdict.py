"""The multi-proxy verdict claims a win only beyond the spread over seeds, pairing episodes."""

from bench.report.verdict import multiproxy_verdict, paired


def rows_for(kmeans_accs, mean_accs, shots=("5", "20"), subset="base"):
    """kmeans_accs / mean_accs: {shots: [acc per seed]}; shots not listed get 0.5 for both."""
    rows = []
    for s in ("1", *shots):
        for seed, (k, m) in enumerate(zip(kmeans_accs.get(s, [0.5] * 3), mean_accs.get(s, [0.5] * 3))):
            base = {"backbone": "b", "dataset": "d", "task": "t", "classes": subset, "shots": s, "seed": seed}
            rows.append({**base, "method": "westerhoff2025", "gen": "kmeans", "gen.k": 20, "acc": k})
            rows.append({**base, "method": "qi2018", "gen": "mean", "gen.k": None, "acc": m})
    return rows


def test_base_class_noise_is_no_win():
    # 100.0 vs 99.9 on average, but one seed goes the other way: within the spread
    rows = rows_for({"5": [1.0, 1.0, 1.0], "20": [1.0, 0.998, 1.0]},
                    {"5": [0.998, 1.0, 1.0], "20": [0.996, 1.0, 0.998]})
    text = multiproxy_verdict(rows, "base")
    assert "neither multi-proxy k-means nor mean imprinting wins" in text
    assert "beats" not in text


def test_clear_paired_gain_is_a_win_even_when_seeds_vary_a_lot():
    # each seed moves both methods together (hard and easy episodes); the paired gain is steady
    rows = rows_for({"5": [0.70, 0.50, 0.62], "20": [0.80, 0.66, 0.90]},
                    {"5": [0.60, 0.41, 0.52], "20": [0.70, 0.55, 0.81]})
    text = multiproxy_verdict(rows, "base")
    assert text.startswith("On 'base' classes at higher shot counts, multi-proxy k-means beats mean imprinting (")
    p = paired(rows, "base", "20", "westerhoff2025", "qi2018")
    assert p.outcome == "win" and abs(p.diff - 0.10) < 1e-9 and p.n == 3


def test_unpaired_spread_does_not_hide_a_paired_win_and_a_loss_is_named():
    rows = rows_for({"5": [0.5, 0.6, 0.7], "20": [0.40, 0.50, 0.60]},
                    {"5": [0.45, 0.55, 0.65], "20": [0.50, 0.60, 0.70]})
    text = multiproxy_verdict(rows, "base")
    assert "beats mean imprinting at 5-shot only and loses at 20-shot" in text


def test_identical_episodes_and_one_seed_claim_nothing():
    # shots=all with a fixed query set: every seed is the same episode
    same = rows_for({"5": [1.0] * 3, "20": [1.0] * 3}, {"5": [0.997] * 3, "20": [0.997] * 3})
    text = multiproxy_verdict(same, "base")
    assert "wins beyond the spread" in text and "no spread to judge against" in text
    one = [r for r in rows_for({"5": [0.9] * 3, "20": [0.9] * 3}, {"5": [0.5] * 3, "20": [0.5] * 3})
           if r["seed"] == 0]
    assert "one seed" in multiproxy_verdict(one, "base") and "beats" not in multiproxy_verdict(one, "base")


def test_old_name_uses_the_paired_verdict_and_no_kmeans_means_no_verdict():
    rows = rows_for({"5": [1.0, 1.0, 1.0]}, {"5": [0.999, 1.0, 1.0]})
    assert multiproxy_verdict([r for r in rows if r["method"] == "qi2018"], "base") is None

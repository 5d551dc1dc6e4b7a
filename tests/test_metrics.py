import numpy as np
import torch
from sklearn.metrics import balanced_accuracy_score, f1_score

from bench.data.synthetic import gaussian_mixture
from bench.imprint import build_head
from bench.metrics import evaluate_head


def test_episode_metrics_match_sklearn():
    x, y = gaussian_mixture(num_classes=4, dim=16, per_class=50, seed=2)
    y = y + 5  # labels need not start at 0
    idx = torch.arange(len(y)) % 50
    head = build_head("janson2022", x[idx < 3], y[idx < 3])
    xq, yq = x[idx >= 3], y[idx >= 3]
    m = evaluate_head(head, xq, yq, batch_size=37)  # several batches
    pred = head.predict(xq).numpy()
    t = yq.numpy()
    assert np.isclose(m["acc"], (pred == t).mean())
    assert np.isclose(m["balanced_acc"], balanced_accuracy_score(t, pred))
    assert np.isclose(m["macro_f1"], f1_score(t, pred, average="macro"), atol=1e-6)
    for c in range(5, 9):
        assert np.isclose(m[f"acc_class_{c}"], (pred[t == c] == c).mean())
    assert m["gen_time_s"] > 0 and m["num_proxies"] == 4

"""Weight space: zoo networks, chunking, SNE, StatNN, the logit-invariance loss and the CLI."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from bench import BenchError
from bench.statistics import kendall_tau
from bench.weightspace.encoder.chunking import (
    ChunkedLayer,
    chunk_head,
    chunk_layer,
    chunk_network,
    collate_heads,
    collate_networks,
)
from bench.weightspace.encoder.scoring import selection_regret
from bench.weightspace.encoder.sne import SNE, SNEConfig, logit_invariance_loss
from bench.weightspace.encoder.statnn import QUANTILES, network_feature_names, network_features
from bench.weightspace.zoo.architectures import (
    Layer,
    NetSpec,
    build_network,
    network_layers,
    permute_hidden_units,
)
from bench.weightspace.zoo.heads import HeadWeights
from bench.weightspace.zoo.networks import NetworkZoo, TrainRecipe, ZooMember, build_zoo, plan_zoo


def random_state(spec: NetSpec, seed: int = 0) -> dict[str, torch.Tensor]:
    """A network's state with random weights and non-trivial batch-norm statistics."""
    torch.manual_seed(seed)
    net = build_network(spec)
    state = {}
    for k, v in net.state_dict().items():
        if k.endswith("num_batches_tracked"):
            continue
        state[k] = torch.rand_like(v) + 0.5 if k.endswith("running_var") else torch.randn_like(v) * 0.3
    return state


def unchunk_layer(chunked: ChunkedLayer) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A layer's (weight, bias) read back from its elements: chunking loses nothing if this
    inverts ``chunk_layer``."""
    e = chunked.values.shape[1]
    if chunked.kind == "conv":
        out, inp, kh, kw = chunked.shape
        grid = round(math.sqrt(e))
        ph, pw = (grid - kh) // 2, (grid - kw) // 2
        kernels = chunked.values[: out * inp].reshape(out, inp, grid, grid)[:, :, ph:ph + kh, pw:pw + kw]
        return kernels.contiguous(), chunked.values[out * inp:, 0].clone()
    if chunked.kind == "linear":
        out, inp = chunked.shape
        full = chunked.values.reshape(out, -1)[:, : inp + 1]
        return full[:, :inp].contiguous(), full[:, inp].clone()
    _, k = chunked.shape
    return chunked.values[:, :k].contiguous(), None


def layers_to_state(layers: list[Layer], state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy of ``state`` with the layers' tensors written back (the inverse of network_layers),
    to run a permuted network as a module."""
    out = dict(state)
    for layer in layers:
        if layer.kind == "bn":
            for j, k in enumerate(("weight", "bias", "running_mean", "running_var")):
                out[layer.names[k]] = layer.weight[:, j].clone()
        else:
            out[layer.names["weight"]] = layer.weight.clone()
            out[layer.names["bias"]] = layer.bias.clone()
    return out


SPECS = [NetSpec("conv", 3, 8, 3, True), NetSpec("conv", 2, 6, 5, False), NetSpec("mlp", 2, 7, 3, True)]


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_chunking_round_trips_every_layer(spec):
    for layer in network_layers(spec, random_state(spec)):
        chunked = chunk_layer(layer)
        assert chunked.values.shape[1] == 25
        w, b = unchunk_layer(chunked)
        assert torch.equal(w, layer.weight)
        assert (b is None and layer.bias is None) or torch.equal(b, layer.bias)


def test_chunking_keeps_conv_kernels_whole_and_centred():
    w = torch.arange(2 * 3 * 9, dtype=torch.float).reshape(2, 3, 3, 3)
    c = chunk_layer(Layer("conv", w, torch.tensor([7.0, 8.0])))
    assert c.values.shape == (2 * 3 + 2, 25)  # one element per kernel, one per output bias
    grid = c.values[1].reshape(5, 5)  # kernel (out 0, in 1)
    assert torch.equal(grid[1:4, 1:4], w[0, 1]) and grid.abs().sum() == w[0, 1].abs().sum()
    assert c.rows[1] == 0 and c.cols[1] == 1
    assert torch.equal(c.values[6:, 0], torch.tensor([7.0, 8.0])) and int(c.cols[6]) == 3


def test_linear_rows_are_padded_and_chunked():
    w = torch.randn(3, 30)
    c = chunk_layer(Layer("linear", w, torch.randn(3)))
    assert c.values.shape == (3 * 2, 25)  # 31 values per row -> 2 chunks of 25
    assert torch.equal(c.values[1, 6:], torch.zeros(19))  # padding after weight + bias


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_permuted_hidden_units_compute_the_same_function(spec):
    state = random_state(spec, 1)
    x = torch.randn(5, 1, 8, 8)
    net = build_network(spec).eval()
    net.load_state_dict(state, strict=False)
    before = net(x)
    permuted = permute_hidden_units(network_layers(spec, state), torch.Generator().manual_seed(3))
    assert not torch.equal(permuted[0].weight, network_layers(spec, state)[0].weight)
    net.load_state_dict(layers_to_state(permuted, state), strict=False)
    torch.testing.assert_close(net(x), before, rtol=1e-5, atol=1e-5)


def _head(seed: int, sizes=(1, 3, 2), dim: int = 20) -> HeadWeights:
    g = torch.Generator().manual_seed(seed)
    columns = torch.cat([torch.full((n,), c) for c, n in enumerate(sizes)])  # proxy -> class column
    return HeadWeights(torch.randn(len(columns), dim, generator=g, dtype=torch.float64), columns,
                       torch.tensor([4, 7, 9]))


def _head_model() -> SNE:
    torch.manual_seed(0)
    return SNE(SNEConfig(kind="head", element_dim=8, hidden=16)).double().eval()


def test_head_encoding_is_invariant_to_class_and_proxy_order():
    model = _head_model()
    head = _head(0)
    enc = lambda h: model.encode(collate_heads([chunk_head(h.proxies, h.proxy_labels, h.classes, 8)]))  # noqa: E731
    base = enc(head)
    g = torch.Generator().manual_seed(5)
    for _ in range(3):
        perm = torch.randperm(len(head.proxies), generator=g)  # proxy order, across and within classes
        cls_perm = torch.randperm(3, generator=g)  # class order: new column j holds old class cls_perm[j]
        new_column = torch.argsort(cls_perm)
        shuffled = HeadWeights(head.proxies[perm], new_column[head.proxy_labels[perm]], head.classes[cls_perm])
        torch.testing.assert_close(enc(shuffled), base, rtol=0, atol=1e-12)
    # a different head (one proxy moved to another class) is encoded differently
    moved = HeadWeights(head.proxies, torch.tensor([0, 0, 1, 1, 2, 2]), head.classes)
    assert (enc(moved) - base).abs().max() > 1e-4


def test_batched_items_are_encoded_as_if_alone():
    model = _head_model()
    heads = [_head(1), _head(2, sizes=(4, 1, 1), dim=13)]
    chunks = [chunk_head(h.proxies, h.proxy_labels, h.classes, 8) for h in heads]
    together = model(collate_heads(chunks))
    for i, c in enumerate(chunks):
        torch.testing.assert_close(model(collate_heads([c])), together[i:i + 1], rtol=0, atol=1e-12)
    torch.manual_seed(0)
    net_model = SNE(SNEConfig(hidden=16)).double().eval()
    nets = [network_layers(s, random_state(s)) for s in SPECS]
    together = net_model(collate_networks([chunk_network(n) for n in nets]))
    for i, n in enumerate(nets):
        one = net_model(collate_networks([chunk_network(n)]))
        torch.testing.assert_close(one, together[i:i + 1], rtol=0, atol=1e-10)


def _sorted_stats_model(networks):
    """Exactly invariant to hidden-unit permutations: sorted values do not depend on order."""
    out = []
    for layers in networks:
        v = torch.cat([torch.sort(layer.weight.reshape(-1))[0] for layer in layers])
        out.append((v * torch.linspace(-1, 1, len(v))).sum())
    return torch.stack(out)


def test_logit_invariance_loss_is_zero_for_an_invariant_model_and_positive_for_sne():
    nets = [network_layers(s, random_state(s, i)) for i, s in enumerate(SPECS)]
    g = torch.Generator().manual_seed(0)
    assert float(logit_invariance_loss(_sorted_stats_model, nets, g)) == 0.0
    # SNE's positional encodings break the symmetry; in float64 rounding alone stays below 1e-24
    torch.manual_seed(0)
    sne = SNE(SNEConfig(hidden=16)).double().eval()
    predict = lambda ns: sne(collate_networks([chunk_network(n) for n in ns]))  # noqa: E731
    with torch.no_grad():
        assert float(logit_invariance_loss(predict, nets, g)) > 1e-14
        reordered = [list(reversed(n)) for n in nets]  # not a permutation of units: a different network
        assert float(torch.mean((predict(nets) - predict(reordered)) ** 2)) > 1e-8


def test_augmented_batches_hold_permuted_copies_that_compute_the_same_function():
    from bench.config import load_config
    from bench.weightspace.encoder.config import EncoderFitConfig
    from bench.weightspace.encoder.training import SNEPredictor, WeightSetDataModule

    with pytest.raises(BenchError, match=r"^config: 'augment' = 1.5 is not valid: expected a probability"):
        load_config(None, ["augment=1.5"], model=EncoderFitConfig)
    with pytest.raises(BenchError, match="finite"):
        load_config(None, ["invariance=.nan"], model=EncoderFitConfig)
    nets = [network_layers(s, random_state(s, i)) for i, s in enumerate(SPECS)]
    targets = torch.zeros(len(nets))
    chunks = [chunk_network(n) for n in nets]
    plain = WeightSetDataModule("network", chunks, targets, nets, 3, 0, augment=0.0, element_dim=25)
    aug = WeightSetDataModule("network", chunks, targets, nets, 3, 0, augment=1.0, element_dim=25)
    idx = list(range(len(nets)))
    assert all(a is b for a, b in zip(plain._collate(idx)[2], nets))  # no augmentation: the networks as given
    sets, _, raw = aug._collate(idx)
    x = torch.randn(4, 1, 8, 8)
    for spec, original, copy in zip(SPECS, nets, raw):
        assert not torch.equal(copy[0].weight, original[0].weight)  # a new order of hidden units...
        state = random_state(spec, 0)
        net = build_network(spec).eval()
        net.load_state_dict(layers_to_state(original, state), strict=False)
        before = net(x)
        net.load_state_dict(layers_to_state(copy, state), strict=False)
        torch.testing.assert_close(net(x), before, rtol=1e-5, atol=1e-5)  # ...of the same function
    # the batch the encoder reads is the permuted copies' chunks, not the originals'
    assert torch.equal(sets.values, collate_networks([chunk_network(n) for n in raw]).values)
    assert not torch.equal(sets.values, collate_networks(chunks).values)
    # heads have no hidden units: permuting them is refused, not silently skipped
    with pytest.raises(BenchError, match="use 0 for heads"):
        SNEPredictor(EncoderFitConfig(augment=0.5)).fit([_head(0), _head(1)], [0.5, 0.6], progress=False)


def test_statnn_features_match_a_direct_computation():
    spec = NetSpec("conv", 3, 5, 3, True)
    state = random_state(spec, 2)
    feats = dict(zip(network_feature_names(), network_features(network_layers(spec, state)).tolist()))

    def stats(a):
        a = np.asarray(a, dtype=np.float64).reshape(-1)
        return [a.mean(), a.var(ddof=1)] + list(np.quantile(a, QUANTILES))

    def check(prefix, values):
        names = ["mean", "var", "q0", "q25", "q50", "q75", "q100"]
        np.testing.assert_allclose([feats[f"{prefix}.{n}"] for n in names], stats(values), rtol=1e-12, atol=1e-12)

    s = {k: v.numpy() for k, v in state.items()}
    check("first.weight", s["0.weight"])
    check("first.bias", s["0.bias"])
    # hidden slot: the two middle convs pooled (modules 0 conv, 1 bn, 2 relu, 3 pool, 4 conv, ..., 8 conv)
    check("hidden.weight", np.concatenate([s["4.weight"].ravel(), s["8.weight"].ravel()]))
    check("hidden.bias", np.concatenate([s["4.bias"], s["8.bias"]]))
    check("last.weight", s["13.weight"])
    check("bn.weight", np.concatenate([s["1.weight"], s["5.weight"], s["9.weight"]]))
    check("bn.bias", np.concatenate([s["1.bias"], s["5.bias"], s["9.bias"]]))
    assert feats["num_weight_layers"] == 4 and feats["hidden.present"] == 1.0
    n_params = sum(v.size for k, v in s.items() if k.split(".")[0] in ("0", "4", "8", "13")) + 2 * 3 * 5
    assert feats["log10_params"] == pytest.approx(np.log10(n_params))


def test_statnn_features_are_invariant_to_hidden_unit_permutations():
    spec = NetSpec("mlp", 3, 9, 3, False)
    layers = network_layers(spec, random_state(spec, 4))
    moved = permute_hidden_units(layers, torch.Generator().manual_seed(1))
    torch.testing.assert_close(network_features(moved), network_features(layers), rtol=0, atol=1e-12)


def test_selection_regret_and_kendall():
    true = np.array([0.5, 0.9, 0.7, 0.2, 0.4])
    scores = np.array([0.1, 0.2, 0.9, 0.5, 0.3])
    np.testing.assert_allclose(selection_regret([[0, 1, 2], [3, 4]], true, scores), [0.2, 0.2])
    assert kendall_tau([1, 2, 3], [3, 4, 10]) == pytest.approx(1.0)
    assert kendall_tau([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


FAST = [
    ZooMember(NetSpec("mlp", 1, 8), TrainRecipe(epochs=1, lr=0.1, seed=1)),
    ZooMember(NetSpec("conv", 2, 8, 3, True), TrainRecipe(epochs=1, lr=0.05, batch_size=128, seed=2)),
    ZooMember(NetSpec("mlp", 2, 8, 3, True), TrainRecipe(optimizer="adam", lr=1e-3, epochs=1, seed=3, label_noise=0.5)),
    ZooMember(NetSpec("conv", 2, 16, 3), TrainRecipe(epochs=1, lr=0.01, batch_size=128, seed=4)),
]


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    summary = build_zoo(root, FAST, workers=1, log=lambda s: None)
    assert summary["trained_now"] == len(FAST)
    return root


def test_zoo_is_content_addressed_and_resumable(tiny_zoo, capsys):
    zoo = NetworkZoo.load(tiny_zoo)
    assert sorted(r.key for r in zoo) == sorted(m.key for m in FAST)
    assert all(0.0 <= r.metrics["test_acc"] <= 1.0
               and r.metrics["gap"] == pytest.approx(r.metrics["train_acc"] - r.metrics["test_acc"])
               for r in zoo)
    again = build_zoo(tiny_zoo, FAST, workers=1, log=lambda s: None)
    assert again["trained_now"] == 0
    with pytest.raises(BenchError, match="own folder"):
        build_zoo(tiny_zoo, plan_zoo(1, dataset="digits-permuted"), log=lambda s: None)
    rows = list(csv.DictReader((tiny_zoo / "index.csv").open()))
    assert len(rows) == len(FAST) and {"family", "test_acc", "train.lr"} <= set(rows[0])
    # the same (seed, index) always plans the same member; another seed plans another zoo
    assert [m.key for m in plan_zoo(5, seed=3)] == [m.key for m in plan_zoo(5, seed=3)]
    assert [m.key for m in plan_zoo(5, seed=3)] != [m.key for m in plan_zoo(5, seed=4)]
    # a stored network's weights rebuild its architecture
    rec = zoo[0]
    net = build_network(rec.spec)
    net.load_state_dict(rec.state(), strict=False)


def test_cli_fit_then_predict(tiny_zoo, tmp_path, capsys):
    from bench.cli import main

    out = tmp_path / "sne"
    assert main(["weights", "fit", "--zoo", str(tiny_zoo), "--out", str(out), "--epochs", "2", "--batch-size", "2",
                 "--hidden", "16", "--invariance", "0.5", "--augment", "0.5", "--wandb", "offline",
                 "--no-progress"]) == 0
    assert (out / "model.safetensors").is_file() and (out / "config.yaml").is_file()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["fit"]["invariance"] == 0.5 and cfg["fit"]["augment"] == 0.5 and cfg["model"]["hidden"] == 16
    assert list((out / "wandb").rglob("*.wandb")), "an offline W&B run was written"
    preds = tmp_path / "preds.csv"
    assert main(["weights", "predict", "--checkpoint", str(out), "--zoo", str(tiny_zoo), "--csv", str(preds)]) == 0
    rows = list(csv.DictReader(preds.open()))
    assert len(rows) == len(FAST)
    assert all(np.isfinite(float(r["predicted_acc"])) for r in rows)
    assert "Kendall tau" in capsys.readouterr().out
    # predictions do not depend on the batch: the CSV equals a fresh load's one-by-one predictions
    from bench.weightspace.encoder.training import SNEPredictor

    p = SNEPredictor.load(out)
    zoo = NetworkZoo.load(tiny_zoo)
    one = [float(p.predict([r.layers()])[0]) for r in zoo]
    np.testing.assert_allclose([float(r["predicted_acc"]) for r in rows], one, rtol=1e-5, atol=1e-6)


def test_fit_replays_from_its_saved_config(tiny_zoo, tmp_path, capsys):
    """`bench weights fit -c <checkpoint>/config.yaml` fits the same encoder again; bad values in
    a fit config stop it with the run config's one line."""
    import yaml
    from safetensors.torch import load_file

    from bench.cli import main

    first, again = tmp_path / "first", tmp_path / "again"
    assert main(["weights", "fit", f"zoo={tiny_zoo}", f"out={first}", "epochs=2", "batch_size=2", "model.hidden=8",
                 "model.heads=2", "invariance=0.5", "augment=0.5", "seed=3", "wandb.mode=disabled",
                 "progress=false"]) == 0
    saved = yaml.safe_load((first / "config.yaml").read_text())
    assert saved["zoo"] == str(tiny_zoo) and saved["epochs"] == 2 and saved["model"]["kind"] == "network"
    assert main(["weights", "fit", "-c", str(first / "config.yaml"), f"out={again}"]) == 0
    a, b = load_file(first / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert main(["weights", "fit", "-c", str(first / "config.yaml"), f"out={tmp_path / 'other'}", "seed=4"]) == 0
    c = load_file(tmp_path / "other" / "model.safetensors")  # the config decides: another seed, another encoder
    assert not all(torch.equal(a[k], c[k]) for k in a)
    capsys.readouterr()
    assert main(["weights", "fit", "-c", str(first / "config.yaml"), "epochs=0"]) == 2
    assert capsys.readouterr().err.strip() == "error: config: 'epochs' = 0 is not valid: expected a positive int"
    assert main(["weights", "fit", "-c", str(first / "config.yaml"), "model.hiden=8"]) == 2
    assert "unknown key 'model.hiden'" in capsys.readouterr().err
    assert main(["weights", "fit", "-c", str(first / "config.yaml"), "heads=[runs/x]"]) == 2
    assert capsys.readouterr().err.strip() == "error: config: give zoo or heads, not both"
    assert main(["weights", "fit", "--zoo", str(tiny_zoo), "--combine", "lstm", "--out", str(again)]) == 2
    assert "'model.combine' = 'lstm' is not valid: expected how layers combine" in capsys.readouterr().err


@pytest.mark.parametrize("before", [False, True])
def test_sne_runs_deterministic_kernels_and_leaves_the_process_setting_alone(before):
    # Multi-threaded CPU kernels made two processes fit different encoders from the same seed
    # (shown on the 400-network zoo); fits and predictions run torch's deterministic kernels.
    from bench.runtime import deterministic_ops
    from bench.weightspace.encoder.config import EncoderFitConfig
    from bench.weightspace.encoder.training import SNEPredictor

    seen = []
    torch.use_deterministic_algorithms(before)
    try:
        with deterministic_ops():
            seen.append(torch.are_deterministic_algorithms_enabled())
        assert seen == [True] and torch.are_deterministic_algorithms_enabled() == before
        nets = [network_layers(s, random_state(s, i)) for i, s in enumerate(SPECS)]
        config = EncoderFitConfig(model=SNEConfig(hidden=8, heads=2), epochs=1, batch_size=2)
        p = SNEPredictor(config).fit(nets, [0.1, 0.5, 0.9], progress=False)
        assert torch.are_deterministic_algorithms_enabled() == before
        p.predict(nets)
        assert torch.are_deterministic_algorithms_enabled() == before
    finally:
        torch.use_deterministic_algorithms(False)


def test_checkpoint_with_changed_weights_is_refused(tiny_zoo, tmp_path):
    from bench.weightspace.encoder.config import EncoderFitConfig
    from bench.weightspace.encoder.training import SNEPredictor

    zoo = NetworkZoo.load(tiny_zoo)
    p = SNEPredictor(EncoderFitConfig(model=SNEConfig(hidden=8, heads=2), epochs=1)).fit(
        [r.layers() for r in zoo], zoo.targets().numpy(), progress=False)
    p.save(tmp_path / "ck")
    blob = bytearray((tmp_path / "ck" / "model.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (tmp_path / "ck" / "model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(BenchError, match="sha256"):
        SNEPredictor.load(tmp_path / "ck")


def test_cli_errors_are_one_line(tmp_path, capsys):
    from bench.cli import main

    assert main(["weights", "fit", "--zoo", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not a network zoo" in err
    assert main(["zoo", "build", "--out", str(tmp_path / "z"), "--dataset", "cifar"]) == 2
    assert "digits-permuted" in capsys.readouterr().err


def _fake_run(root, methods=("qi2018", "l2/kmeans:k=2/l2/l2/max")):
    """A run folder laid out as `bench run ... save_heads=true` writes it."""
    from bench.imprint import SupportSet, build_head_grid
    from bench.naming import head_path

    g = torch.Generator().manual_seed(0)
    rows = []
    for seed in (0, 1):
        x = torch.randn(12, 6, generator=g)
        y = torch.tensor([3, 5, 8]).repeat(4)  # label values that are not class columns
        heads = build_head_grid(list(methods), [SupportSet(x, y, seed=seed)])
        for j, m in enumerate(methods):
            path = head_path(root, "novel", 4, seed, m)
            path.parent.mkdir(parents=True, exist_ok=True)
            heads[j][0].save(path)
            rows.append({"backbone": "tiny-digits", "dataset": "digits", "task": "t", "classes": "novel",
                         "shots": "4", "seed": seed, "method": m, "acc": 0.5 + 0.1 * j + 0.01 * seed})
    with (root / "results.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return root


def test_head_zoo_pairs_results_rows_with_head_files(tmp_path):
    from bench.weightspace.encoder.statnn import StatNN
    from bench.weightspace.zoo.heads import HeadZoo

    zoo = HeadZoo.load([_fake_run(tmp_path / "run")])
    assert len(zoo) == 4 and len(zoo.episodes()) == 2
    rec = [r for r in zoo if r.method.startswith("l2/kmeans") and r.seed == 1][0]
    assert rec.acc == pytest.approx(0.61)
    w = rec.weights()
    assert w.proxies.shape == (6, 6) and sorted(set(w.proxy_labels.tolist())) == [0, 1, 2]
    assert w.classes.tolist() == [3, 5, 8]
    assert StatNN("gbt").fit([r.weights() for r in zoo], zoo.targets()).predict([w]).shape == (1,)
    next((tmp_path / "run" / "heads").rglob("qi2018.safetensors")).unlink()
    with pytest.raises(BenchError, match="qi2018"):
        HeadZoo.load([tmp_path / "run"])


def test_evaluation_end_to_end(tmp_path):
    """Every split of the encoder evaluation (scripts/weight_encoder_eval.py) on a tiny zoo, one
    epoch per SNE fit."""
    from bench.weightspace.encoder.evaluation import main

    fixed = NetSpec("conv", 2, 16, 3)  # the zoo's fixed architecture
    fast = lambda s, **kw: TrainRecipe(epochs=1, batch_size=128, seed=s, **kw)  # noqa: E731
    members = [ZooMember(fixed, fast(s, lr=lr)) for s, lr in ((10, 0.1), (11, 0.01), (12, 0.001), (13, 0.05))]
    members += [ZooMember(NetSpec("mlp", 1, 8), fast(20)), ZooMember(NetSpec("mlp", 2, 8), fast(21)),
                ZooMember(NetSpec("mlp", 1, 16), fast(22, lr=0.001)),
                ZooMember(NetSpec("mlp", 2, 16, 3, True), fast(23))]
    cross = [ZooMember(fixed, fast(30, dataset="digits-permuted")),
             ZooMember(NetSpec("mlp", 1, 8), fast(31, dataset="digits-permuted"))]
    build_zoo(tmp_path / "zoo", members, log=lambda s: None)
    build_zoo(tmp_path / "cross", cross, log=lambda s: None)
    run = _fake_run(tmp_path / "run", methods=("qi2018", "knn", "l2/kmeans:k=2/l2/l2/max"))
    out = tmp_path / "out"
    with pytest.raises(BenchError, match="is not sne"):  # a typo stops it before any fitting
        main(["--zoo", str(tmp_path / "zoo"), "--out", str(out), "--sne", "sne+l10"])
    with pytest.raises(BenchError, match="twice"):  # sne+li0 is plain sne: one name per config
        main(["--zoo", str(tmp_path / "zoo"), "--out", str(out), "--sne", "sne", "sne+li0"])
    with pytest.raises(BenchError, match="--wandb: 'mode' = 'sometimes' is not valid"):
        main(["--zoo", str(tmp_path / "zoo"), "--out", str(out), "--wandb", "sometimes"])
    assert not out.exists()
    result = main(["--zoo", str(tmp_path / "zoo"), "--cross-zoo", str(tmp_path / "cross"), "--heads", str(run),
                          "--out", str(out), "--holdout", "mlp2,mlp2-bn", "--epochs", "1", "--head-epochs", "1",
                          "--hidden", "8", "--sne", "sne", "sne+li5+aug1", "--cross-arch-sne", "sne+aug0.5",
                          "--permutations", "1", "--test-fraction", "0.5",
                          "--seed", "1"])
    rows = result["rows"]
    splits = {r["split"] for r in rows}
    assert {"in-distribution", "fixed-arch", "cross-dataset", "cross-dataset fixed-arch", "invariance",
            "invariance (fixed-arch)", "cross-arch [mlp2,mlp2-bn]", "heads", "heads selection"} <= splits
    assert {r["predictor"] for r in rows if r["split"] == "fixed-arch"} == {
        "statnn-gbt", "statnn-mlp", "sne", "sne+li5+aug1", "flat-mlp"}
    assert {r["predictor"] for r in rows if r["split"] == "cross-arch [mlp2,mlp2-bn]"} == {
        "statnn-gbt", "statnn-mlp", "sne+aug0.5"}
    inv = {r["predictor"]: r for r in rows if r["split"].startswith("invariance")}
    assert inv["statnn-gbt"]["perm_max_abs"] < 1e-9 < inv["flat-mlp"]["perm_max_abs"]
    sel = [r for r in rows if r["split"] == "heads selection"]
    assert all(r["regret_vs_oracle"] >= 0 for r in sel)
    assert (out / "predicted_vs_true.png").stat().st_size > 10_000
    assert {"split", "predictor", "predicted", "true"} <= set(next(csv.DictReader((out / "predictions.csv").open())))

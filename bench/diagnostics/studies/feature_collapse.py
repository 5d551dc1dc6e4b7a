"""Feature collapse of local features on the synthetic setting of Laurent et al. (2023).

A vocabulary of words is partitioned into concepts. A latent variable is a sequence of
concepts; a sentence replaces each concept by one of its words (Zipf-distributed, so some
words are rare); each class owns several latent sequences, and a sentence's label is the class
of its latent. The model embeds each word, optionally applies LayerNorm, and a linear
classifier reads the concatenated token features. We train it with and without LayerNorm, with
few and with many samples per latent, and report:

- whether words of the same concept collapse to one feature: NC1 and CDNV of the (normalised)
  word features grouped by concept, and the spectrum of the concept means (RoleCollapse);
- the test accuracy on fresh sentences.

    python scripts/feature_collapse.py            # about 20 seconds on 2 cores
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

from bench.diagnostics.local import feature_collapse
from bench.runtime import configure_threads


class Setting:
    def __init__(self, words_per_concept=12, concepts=6, length=5, classes=4, latents_per_class=3, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.wpc, self.concepts, self.length = words_per_concept, concepts, length
        self.vocab = words_per_concept * concepts
        self.word_concept = torch.arange(self.vocab) // words_per_concept
        self.latents = torch.randint(concepts, (classes * latents_per_class, length), generator=g)
        self.latent_class = torch.arange(classes).repeat_interleave(latents_per_class)
        zipf = 1.0 / torch.arange(1, words_per_concept + 1).float()
        self.word_prob = zipf / zipf.sum()
        self.classes = classes

    def sample(self, per_latent: int, generator: torch.Generator):
        lat = torch.arange(len(self.latents)).repeat_interleave(per_latent)
        which = torch.multinomial(self.word_prob, len(lat) * self.length, replacement=True, generator=generator)
        words = self.latents[lat] * self.wpc + which.view(len(lat), self.length)
        return words, self.latent_class[lat]


class TokenModel(nn.Module):
    def __init__(self, vocab: int, length: int, dim: int, classes: int, layernorm: bool):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False) if layernorm else nn.Identity()
        self.head = nn.Linear(length * dim, classes)

    def features(self, words: torch.Tensor) -> torch.Tensor:
        return self.norm(self.embed(words))

    def forward(self, words: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(words).flatten(1))


def run(setting: Setting, layernorm: bool, per_latent: int, epochs: int, seed: int = 0, dim: int = 16):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x, y = setting.sample(per_latent, g)
    xt, yt = setting.sample(200, g)
    model = TokenModel(setting.vocab, setting.length, dim, setting.classes, layernorm)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=1e-3)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for start in range(0, len(x), 64):
            idx = perm[start:start + 64]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        acc = float((model(xt).argmax(1) == yt).float().mean())
        seen = torch.unique(x)  # only words that occurred in training can have learned anything
        feats = model.features(seen)
        feats = feats / feats.norm(dim=1, keepdim=True)  # compare directions, as the classifier does
        fc = feature_collapse(feats, setting.word_concept[seen])
    return {"layernorm": layernorm, "samples_per_latent": per_latent, "test_acc": acc,
            "word_nc1": fc["nc1"], "word_cdnv": fc["cdnv"], "concept_spectrum": fc["role_mean_spectrum"],
            "concept_effective_rank": fc["role_effective_rank"], "words_seen": int(len(seen))}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--few", type=int, default=3)
    ap.add_argument("--many", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("runs/feature_collapse.json"))
    args = ap.parse_args(argv)
    configure_threads()
    start = time.time()
    setting = Setting()
    results = []
    for layernorm in (False, True):
        for per_latent in (args.few, args.many):
            runs = [run(setting, layernorm, per_latent, args.epochs, seed=s) for s in range(args.seeds)]
            agg = {k: sum(r[k] for r in runs) / len(runs) for k in ("test_acc", "word_nc1", "word_cdnv")}
            results.append({**runs[0], **agg, "seeds": args.seeds})
    print(f"{'LayerNorm':>9s} {'samples/latent':>14s} {'test acc':>9s} {'word NC1':>9s} {'word CDNV':>10s}  concept spectrum")
    for r in results:
        spec = " ".join(f"{v:.2f}" for v in r["concept_spectrum"])
        print(f"{str(r['layernorm']):>9s} {r['samples_per_latent']:>14d} {100 * r['test_acc']:8.1f}% "
              f"{r['word_nc1']:9.3f} {r['word_cdnv']:10.3f}  {spec}")
    for ln in (False, True):
        few, many = [r for r in results if r["layernorm"] == ln]
        print(f"LayerNorm={ln}: words of a concept {'collapse' if many['word_nc1'] < 0.1 else 'do not fully collapse'}"
              f" with many samples (NC1 {many['word_nc1']:.3f}); few samples: NC1 {few['word_nc1']:.3f}, "
              f"test acc {100 * few['test_acc']:.1f}% vs {100 * many['test_acc']:.1f}% with many")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out} in {time.time() - start:.0f}s")
    return results


if __name__ == "__main__":
    main()

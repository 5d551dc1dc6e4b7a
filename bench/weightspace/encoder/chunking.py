"""Pad and chunk weights into sets of fixed-size elements (SNE's first step), and batch them.

A **network** is an ordered list of layers; each layer becomes a set of elements of
``ELEMENT_DIM`` values:

- conv: each kernel (out unit o, in unit i) is one element, kept whole: a k x k kernel is placed
  in the centre of a 5 x 5 grid (zeros around it compute the same convolution with same
  padding), and each output unit's bias is one more element in column ``in``;
- linear: each row of [weight | bias] is flattened, padded with zeros to a multiple of
  ``ELEMENT_DIM`` and cut into chunks; a chunk's position is (row, chunk index);
- batch norm: one element per channel, [gamma, beta, running mean, running var] padded.

Every element carries its raw position: the layer's relative depth and index, and its row and
column inside the layer (relative). The encoder turns them into positional encodings.

A **head** is a set of classes, each a set of proxies: each proxy (a D-vector) is cut into
``ceil(D / E)`` chunks whose only position is the chunk's place along D. Classes and proxies
carry no position at all, so a set encoder over them cannot depend on their order.

``SetBatch`` holds many items as flat element tensors plus one segment index per level of the
hierarchy (element -> layer -> network, or element -> proxy -> class -> head), so sets of any
size batch without padding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from bench.errors import BenchError
from bench.weightspace.zoo.architectures import Layer

ELEMENT_DIM = 25  # a whole 5 x 5 kernel; linear rows are chunked into pieces of this size
ELEMENT_TYPES = {"conv": 0, "conv-bias": 1, "linear": 2, "bn": 3, "proxy": 4}
LAYER_TYPES = {"conv": 0, "linear": 1, "bn": 2}


@dataclass
class ChunkedLayer:
    """One layer as a set of elements: values (n, E), row and column of each element."""

    kind: str
    values: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    types: torch.Tensor
    shape: tuple[int, ...]  # the weight's shape, to undo the chunking
    n_rows: int
    n_cols: int


def _rel(index: torch.Tensor, n: int) -> torch.Tensor:
    return index.float() / max(n - 1, 1)


def chunk_layer(layer: Layer, element_dim: int = ELEMENT_DIM) -> ChunkedLayer:
    w = layer.weight.detach().float()
    if layer.kind == "conv":
        out, inp, kh, kw = w.shape
        grid = int(round(math.sqrt(element_dim)))
        if grid * grid != element_dim or kh > grid or kw > grid or kh % 2 == 0 or kw % 2 == 0:
            raise BenchError(f"conv kernel {kh}x{kw} does not fit a centred {grid}x{grid} element "
                             f"(element_dim={element_dim}); use odd kernels up to {grid}x{grid}")
        ph, pw = (grid - kh) // 2, (grid - kw) // 2
        kernels = F.pad(w, (pw, grid - kw - pw, ph, grid - kh - ph)).reshape(out * inp, element_dim)
        bias = F.pad(layer.bias.detach().float()[:, None], (0, element_dim - 1))
        values = torch.cat([kernels, bias])
        rows = torch.cat([torch.arange(out).repeat_interleave(inp), torch.arange(out)])
        cols = torch.cat([torch.arange(inp).repeat(out), torch.full((out,), inp)])
        types = torch.cat([torch.full((out * inp,), ELEMENT_TYPES["conv"]),
                           torch.full((out,), ELEMENT_TYPES["conv-bias"])])
        return ChunkedLayer("conv", values, rows, cols, types, tuple(w.shape), out, inp + 1)
    if layer.kind == "linear":
        out, inp = w.shape
        full = torch.cat([w, layer.bias.detach().float()[:, None]], 1)
        n_chunks = -(-(inp + 1) // element_dim)
        values = F.pad(full, (0, n_chunks * element_dim - inp - 1)).reshape(out * n_chunks, element_dim)
        rows = torch.arange(out).repeat_interleave(n_chunks)
        cols = torch.arange(n_chunks).repeat(out)
        types = torch.full((out * n_chunks,), ELEMENT_TYPES["linear"])
        return ChunkedLayer("linear", values, rows, cols, types, tuple(w.shape), out, n_chunks)
    if layer.kind == "bn":
        c, k = w.shape
        if k > element_dim:
            raise BenchError(f"batch-norm layer has {k} values per channel, more than element_dim={element_dim}")
        values = F.pad(w, (0, element_dim - k))
        return ChunkedLayer("bn", values, torch.arange(c), torch.zeros(c, dtype=torch.long),
                            torch.full((c,), ELEMENT_TYPES["bn"]), tuple(w.shape), c, 1)
    raise BenchError(f"layer kind '{layer.kind}' cannot be chunked; known: conv, linear, bn")


@dataclass
class NetworkChunks:
    """A network's elements (flat over layers) and, per layer, its type and place in depth."""

    values: torch.Tensor  # (N, E)
    positions: torch.Tensor  # (N, 4): layer relative depth, layer index, row (rel), column (rel)
    types: torch.Tensor  # (N,) element types
    layer_of: torch.Tensor  # (N,) layer index of each element
    layer_types: torch.Tensor  # (L,)
    layer_positions: torch.Tensor  # (L, 2): relative depth, index


def chunk_network(layers: list[Layer], element_dim: int = ELEMENT_DIM) -> NetworkChunks:
    if not layers:
        raise BenchError("a network with no layers cannot be encoded")
    n = len(layers)
    vals, pos, types, layer_of = [], [], [], []
    for li, layer in enumerate(layers):
        c = chunk_layer(layer, element_dim)
        m = len(c.values)
        depth = torch.full((m,), li / max(n - 1, 1))
        pos.append(torch.stack([depth, torch.full((m,), float(li)), _rel(c.rows, c.n_rows),
                                _rel(c.cols, c.n_cols)], 1))
        vals.append(c.values)
        types.append(c.types)
        layer_of.append(torch.full((m,), li, dtype=torch.long))
    idx = torch.arange(n, dtype=torch.float)
    return NetworkChunks(
        torch.cat(vals), torch.cat(pos), torch.cat(types), torch.cat(layer_of),
        torch.tensor([LAYER_TYPES[layer.kind] for layer in layers]),
        torch.stack([idx / max(n - 1, 1), idx], 1),
    )


@dataclass
class HeadChunks:
    """A head's proxies cut into chunks along D, grouped by class (rows sorted by class)."""

    values: torch.Tensor  # (N, E): chunks of the proxy's direction (the proxy over its norm)
    positions: torch.Tensor  # (N, 2): chunk position along D (relative), chunk index
    log_norms: torch.Tensor  # (N, 1): log of the l2 norm of the chunk's proxy
    proxy_of: torch.Tensor  # (N,) proxy index of each chunk
    class_of_proxy: torch.Tensor  # (P,) class position (0..C-1) of each proxy
    num_classes: int


def head_class_positions(proxy_labels: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Each proxy's class column (0..C-1), as ImprintedHead stores ``proxy_labels``; an error if
    a proxy points outside the head's classes."""
    cls = proxy_labels.long()
    if len(cls) and (int(cls.min()) < 0 or int(cls.max()) >= len(classes)):
        raise BenchError(f"head proxy labels must be class columns 0..{len(classes) - 1}, got values "
                         f"{int(cls.min())}..{int(cls.max())}")
    return cls


def chunk_head(proxies: torch.Tensor, proxy_labels: torch.Tensor, classes: torch.Tensor,
               element_dim: int = 16) -> HeadChunks:
    """Chunk a head: ``proxy_labels`` are class columns into ``classes`` (ImprintedHead's layout)."""
    if proxies.ndim != 2 or len(proxies) != len(proxy_labels):
        raise BenchError(f"head proxies must be (P, D) with P labels, got {tuple(proxies.shape)} and "
                         f"{len(proxy_labels)} labels")
    cls = head_class_positions(proxy_labels, classes)
    p, d = proxies.shape
    n_chunks = -(-d // element_dim)
    # Direction and length apart: heads range from unit rows (l2) to raw embeddings whose norms
    # differ by orders of magnitude, which would saturate the element encoder.
    norms = proxies.detach().norm(dim=1, keepdim=True).clamp_min(1e-12)
    values = F.pad(proxies.detach() / norms, (0, n_chunks * element_dim - d)).reshape(p * n_chunks, element_dim)
    chunk = torch.arange(n_chunks).repeat(p)
    positions = torch.stack([_rel(chunk, n_chunks), chunk.float()], 1)
    return HeadChunks(values, positions, norms.log().repeat_interleave(n_chunks, 0),
                      torch.arange(p).repeat_interleave(n_chunks), cls, len(classes))


@dataclass
class SetBatch:
    """Items of one kind as flat elements and one segment index per level of the hierarchy.

    ``segments[0]`` maps elements to level-1 groups (layers or proxies), ``segments[1]`` maps
    those to level-2 groups (networks, or classes), and so on; ``sizes[k]`` is the number of
    groups at level k+1. ``group_types``/``group_positions`` describe level-1 groups of networks
    (layer type and depth) and are empty for heads.
    """

    kind: str  # network | head
    values: torch.Tensor
    positions: torch.Tensor
    types: torch.Tensor
    segments: list[torch.Tensor]
    sizes: list[int]
    group_types: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    group_positions: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 2))
    scalars: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0))  # heads: (N, 1) log norms

    def to(self, device) -> SetBatch:
        move = lambda t: t.to(device)  # noqa: E731
        return SetBatch(self.kind, move(self.values), move(self.positions), move(self.types),
                        [move(s) for s in self.segments], list(self.sizes), move(self.group_types),
                        move(self.group_positions), move(self.scalars))


def collate_networks(items: list[NetworkChunks]) -> SetBatch:
    layer_offset, layer_to_net, seg0 = 0, [], []
    for i, it in enumerate(items):
        seg0.append(it.layer_of + layer_offset)
        layer_to_net.append(torch.full((len(it.layer_types),), i, dtype=torch.long))
        layer_offset += len(it.layer_types)
    return SetBatch(
        "network", torch.cat([it.values for it in items]), torch.cat([it.positions for it in items]),
        torch.cat([it.types for it in items]), [torch.cat(seg0), torch.cat(layer_to_net)],
        [layer_offset, len(items)], torch.cat([it.layer_types for it in items]),
        torch.cat([it.layer_positions for it in items]),
    )


def collate_heads(items: list[HeadChunks]) -> SetBatch:
    proxy_off, class_off = 0, 0
    seg0, seg1, seg2 = [], [], []
    for i, it in enumerate(items):
        n_proxies = len(it.class_of_proxy)
        seg0.append(it.proxy_of + proxy_off)
        seg1.append(it.class_of_proxy + class_off)
        seg2.append(torch.full((it.num_classes,), i, dtype=torch.long))
        proxy_off += n_proxies
        class_off += it.num_classes
    values = torch.cat([it.values for it in items])
    return SetBatch("head", values, torch.cat([it.positions for it in items]),
                    torch.full((len(values),), ELEMENT_TYPES["proxy"]),
                    [torch.cat(seg0), torch.cat(seg1), torch.cat(seg2)], [proxy_off, class_off, len(items)],
                    scalars=torch.cat([it.log_norms for it in items]))

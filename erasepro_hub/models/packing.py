"""Prompts that share a prefix, run once: a causal encoder's forward pass over a prefix tree.

In a causal encoder (CLIP) the features at position ``p`` depend only on the tokens ``0 … p`` (absolute
positions, causal attention). The target prompts of a solve share most of their prefixes — every prompt
starts with BOS, and the misspellings of one name share the tokens of the word they leave intact — and the
pass reads each prompt only up to its last constrained position. So the pass can run on the prefix *tree*
of what it reads: one token per distinct prefix, each attending to its own ancestors, at its depth as
position: at many names with their misspellings, well under half the tokens of a rectangular batch cut
after the last read position.

The tree is laid out in rows (a row holds whole subtrees below BOS, its own BOS first) with a boolean
attention mask per row and explicit position ids; :class:`PackedPrompts` maps ``(prompt, position)`` to
``(row, column)`` and back. The results are those of the rectangular pass up to floating-point rounding
(the attention sums over the same keys in a different layout).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: pack only when the tree saves at least this fraction of the rectangular batch's tokens
MIN_SAVING = 0.25


@dataclass(frozen=True)
class PackedPrompts:
    """The prefix tree of a batch, laid out in rows.

    ``ids``/``position_ids``: ``(rows, length)``; ``mask``: ``(rows, 1, length, length)``, ``True`` where a token
    attends (its ancestors and itself; a padding slot only itself); ``row``: ``(n,)`` the row that holds each
    prompt's prefixes; ``column``: ``(n, L)`` where prompt ``i``'s position ``p`` sits in that row (``-1`` where it is
    not read).
    """

    ids: torch.Tensor
    position_ids: torch.Tensor
    mask: torch.Tensor
    row: torch.Tensor
    column: torch.Tensor

    def additive_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """The mask as attention implementations add it to the scores: ``0`` where a token attends, the
        dtype's minimum elsewhere."""
        return torch.zeros(self.mask.shape, dtype=dtype).masked_fill(~self.mask, torch.finfo(dtype).min)

    def locate(self, rows: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(row, column)`` in the packed batch of each ``(prompt, position)``; every one must be in the tree."""
        column = self.column[rows, pos]
        if bool((column < 0).any()):
            raise ValueError("a position outside the packed prefixes was asked for")
        return self.row[rows], column

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """``(rows, length, …)`` → ``(n, L, …)``: each prompt's positions from the tree, zero where not read."""
        n, length = self.column.shape
        out = packed.new_zeros((n, length) + tuple(packed.shape[2:]))
        read = self.column >= 0
        prompt, pos = read.nonzero(as_tuple=True)
        out[prompt, pos] = packed[self.row[prompt].to(packed.device), self.column[prompt, pos].to(packed.device)]
        return out


def pack_prefixes(ids: torch.Tensor, last: torch.Tensor) -> PackedPrompts | None:
    """The prefix tree of ``ids`` (``(n, L)``, every prompt starting with the same token), each prompt read up
    to position ``last[i]`` (``-1``: not read), or ``None`` where it would not save :data:`MIN_SAVING` of the
    rectangular pass (``n × L`` tokens)."""
    if ids.ndim != 2 or last.shape != (ids.shape[0],) or bool((last >= ids.shape[-1]).any()) or bool((last < -1).any()):
        raise ValueError(
            f"pack_prefixes needs ids of shape (n, L) and one last read position per prompt in [-1, L); got ids "
            f"{tuple(ids.shape)} and last {tuple(last.shape)}"
        )
    n, length = ids.shape
    last = last.tolist()
    rows = ids.tolist()
    if n == 0 or any(r[0] != rows[0][0] for r in rows):
        return None
    # node 0 is the shared first token; a node is (parent, token); children in first-seen order
    node_of: dict[tuple[int, int], int] = {}
    parent, token, depth = [-1], [rows[0][0]], [0]
    path: list[list[int]] = []  # per prompt: node of each read position
    for i in range(n):
        nodes = [0] if last[i] >= 0 else []
        for p in range(1, last[i] + 1):
            key = (nodes[-1], rows[i][p])
            if key not in node_of:
                node_of[key] = len(parent)
                parent.append(nodes[-1])
                token.append(rows[i][p])
                depth.append(p)
            nodes.append(node_of[key])
        path.append(nodes)
    if len(parent) > (1 - MIN_SAVING) * n * length:
        return None
    # subtrees below the first token, whole, into rows: each row starts with its own copy of the first token
    top = [i for i in range(1, len(parent)) if parent[i] == 0]
    size = [1] * len(parent)
    for i in range(len(parent) - 1, 0, -1):  # children come after their parent: sizes bottom-up
        size[parent[i]] += size[i]
    capacity = max(length, max((size[t] for t in top), default=0) + 1)
    bins: list[list[int]] = []
    room: list[int] = []
    for t in sorted(top, key=lambda t: -size[t]):  # first fit, largest first
        for b, free in enumerate(room):
            if free >= size[t]:
                bins[b].append(t)
                room[b] -= size[t]
                break
        else:
            bins.append([t])
            room.append(capacity - 1 - size[t])
    if not bins:
        bins = [[]]
    children: dict[int, list[int]] = {}
    for i in range(1, len(parent)):
        children.setdefault(parent[i], []).append(i)
    width = max(1 + sum(size[t] for t in b) for b in bins)
    n_rows = len(bins)
    packed_ids = torch.full((n_rows, width), token[0], dtype=ids.dtype)
    position_ids = torch.zeros((n_rows, width), dtype=torch.long)
    mask = torch.zeros((n_rows, 1, width, width), dtype=torch.bool)
    mask[:, 0].diagonal(dim1=-2, dim2=-1).fill_(True)  # padding slots see themselves only
    where: dict[int, tuple[int, int]] = {}  # node → (row, column); the first token is in every row
    for b, subtrees in enumerate(bins):
        column = {0: 0}
        order = []
        stack = list(reversed(subtrees))
        while stack:  # preorder: a node after its ancestors
            node = stack.pop()
            column[node] = len(column)
            order.append(node)
            stack.extend(reversed(children.get(node, [])))
        for node in order:
            c = column[node]
            packed_ids[b, c] = token[node]
            position_ids[b, c] = depth[node]
            a = node
            while a != -1:
                mask[b, 0, c, column[a]] = True
                a = parent[a]
            where[node] = (b, c)
    row = torch.zeros(n, dtype=torch.long)
    col = torch.full((n, length), -1, dtype=torch.long)
    for i, nodes in enumerate(path):
        if len(nodes) > 1:
            row[i] = where[nodes[1]][0]
        for p, node in enumerate(nodes):
            col[i, p] = 0 if node == 0 else where[node][1]
    return PackedPrompts(packed_ids, position_ids, mask, row, col)


__all__ = ["MIN_SAVING", "PackedPrompts", "pack_prefixes"]

"""Which parameters form the blocks, and in which order the active block moves.

``infer_blocks`` partitions a model's parameters into blocks the way BlockOptimizers does — one block per repeated
layer, the embedding first if ``include_embedding``, everything else last if ``include_lm_head`` (the embedding too,
when it has no block of its own, as in the reference) — but finds the
layers structurally through :func:`bread_kernels.patch` when the model is patched, and falls back to the
reference's name patterns otherwise.  :class:`BlockOrder` is the switching order (``descending``, ``ascending``,
``random``, ``fixed``) with a state that ``state_dict`` can save and restore.
"""

from __future__ import annotations

import re

import torch

SWITCH_MODES = ("descending", "ascending", "random", "fixed")


def infer_blocks(param_names: list[str], layer_prefixes: list[str] | None, embedding_prefix: str | None,
                 include_embedding: bool, include_lm_head: bool, n_layer_per_block: int) -> list[list[str]]:
    """A list of blocks, each a list of name prefixes (BlockOptimizers' ``block_prefix_list``)."""
    if layer_prefixes is None:  # not patched: the reference's patterns
        layer_prefixes, seen = [], set()
        for name in param_names:
            match = re.match(r"(.*layers\.[^.]*\.)", name) or re.match(r"(.*\.h\.[^.]*\.)", name)
            if match and match.group(1) not in seen:
                seen.add(match.group(1))
                layer_prefixes.append(match.group(1))
        if embedding_prefix is None:
            embedding_prefix = next((m.group(1) for n in param_names
                                     if (m := re.match(r"(.*(?:embed[^.]*|\bwte)\.)", n))), None)  # GPT-2: wte
    if not layer_prefixes:
        raise ValueError(
            "BlockOptimizer: could not infer the blocks: no repeated layers found in the parameter names. Patch the "
            "model first (bread_kernels.patch finds the layers structurally) or pass block_prefix_list"
        )
    layers = [[p] for p in layer_prefixes]
    if n_layer_per_block > 1:
        layers = [sum(layers[i:i + n_layer_per_block], []) for i in range(0, len(layers), n_layer_per_block)]
    blocks = []
    if include_embedding:
        if embedding_prefix is None:
            raise ValueError("BlockOptimizer: include_embedding=True but no input embedding was found")
        blocks.append([embedding_prefix])
    blocks.extend(layers)
    if include_lm_head:
        covered = [p for block in blocks for p in block]
        rest = [n for n in param_names if not any(n.startswith(p) for p in covered)]
        if rest:
            blocks.append(rest)
    return blocks


class BlockOrder:
    """The index of the active block and how it moves at a switch."""

    def __init__(self, n_blocks: int, mode: str, start_block: int | None):
        if mode not in SWITCH_MODES:
            raise ValueError(f"BlockOptimizer: unknown switch_mode {mode!r}; use one of {', '.join(SWITCH_MODES)}")
        if start_block is not None and not 0 <= start_block < n_blocks:
            raise ValueError(f"BlockOptimizer: start_block={start_block} is outside the {n_blocks} blocks")
        if mode == "fixed" and start_block is None:
            raise ValueError("BlockOptimizer: switch_mode='fixed' trains one block only: say which with start_block=")
        self.n_blocks, self.mode = n_blocks, mode
        self.pending: list[int] = []
        if mode == "random":
            self.pending = torch.randperm(n_blocks).tolist()
            self.current = self.pending.pop()
        elif mode == "descending":
            self.current = n_blocks - 1
        else:
            self.current = 0
        if start_block is not None:
            self.current = start_block

    def advance(self) -> int:
        if self.mode == "descending":
            self.current = (self.current - 1) % self.n_blocks
        elif self.mode == "ascending":
            self.current = (self.current + 1) % self.n_blocks
        elif self.mode == "random":
            if not self.pending:
                self.pending = torch.randperm(self.n_blocks).tolist()
            self.current = self.pending.pop()
        return self.current

    def state_dict(self) -> dict:
        return {"mode": self.mode, "current": self.current, "pending": list(self.pending)}

    def load_state_dict(self, state: dict) -> None:
        if state["mode"] != self.mode:
            raise ValueError(f"BlockOptimizer.load_state_dict: saved switch_mode {state['mode']!r} != {self.mode!r}")
        self.current, self.pending = state["current"], list(state["pending"])

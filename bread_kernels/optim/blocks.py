"""Which parameters form the blocks, and in which order the active block moves.

``infer_blocks`` partitions a model's parameters into blocks the way BlockOptimizers does — one block per repeated
layer, the embedding first if ``include_embedding``, everything else last if ``include_lm_head`` (the embedding too,
when it has no block of its own, as in the reference).  The layers are the reference's name patterns' wherever
they find the patched stack's layers (and every stack they match: an encoder-decoder's two), and the stacks
:func:`bread_kernels.patch.block_stacks` finds structurally where the patterns miss them (BERT, T5); the embedding
is the patched model's input embedding, or the reference's pattern's.  :class:`BlockOrder` is the switching order
(``descending``, ``ascending``, ``random``, ``fixed``) with a state that ``state_dict`` can save and restore.
"""

from __future__ import annotations

import re

import torch

SWITCH_MODES = ("descending", "ascending", "random", "fixed")


def reference_layer_prefixes(param_names: list[str]) -> list[str]:
    """The repeated layers' name prefixes by the reference's patterns (``…layers.<i>.``, GPT-2's ``….h.<i>.``), in
    parameter order.  The patterns are greedy, so a name that holds ``layers.`` again inside a layer (peft's LN
    tuning: ``….layers.0.input_layernorm.ln_tuning_layers.default.weight``) matches a prefix that lies inside
    another one's layer: such a prefix is no layer (the reference skips a name that holds a prefix it found)."""
    prefixes: list[str] = []
    for name in param_names:
        match = re.match(r"(.*layers\.[^.]*\.)", name) or re.match(r"(.*\.h\.[^.]*\.)", name)
        if match and match.group(1) not in prefixes:
            prefixes.append(match.group(1))
    return [prefix for prefix in prefixes if not any(prefix.startswith(outer) and prefix != outer
                                                     for outer in prefixes)]


def layer_prefixes(param_names: list[str], patched_stack: list[str] | None = None,
                   stacks: list[list[str]] = ()) -> list[str]:
    """The layers that become blocks, in parameter order: the reference's patterns' (every stack they match: an
    encoder's and a decoder's, a vision tower's and a language model's) where no model is patched or where they
    find a layer and every layer of the patched stack (``patched_stack``: its blocks' prefixes); otherwise every
    stack found structurally (``stacks``: each a list of its blocks' prefixes, the patched one among them), which
    finds what the patterns miss (BERT's ``encoder.layer``, T5's ``encoder.block`` and ``decoder.block``, Qwen2-VL's
    ``visual.blocks`` trained without the language model).  A layer none of whose parameters ``param_names`` holds
    (left out of the optimizer's list) is no block, as it is none of the patterns'."""
    found = reference_layer_prefixes(param_names)
    if patched_stack is None:
        return found

    def listed(stack) -> list[str]:  # a layer the caller left out of the list (all its parameters) is no block
        return [prefix for prefix in stack if any(n.startswith(prefix) for n in param_names)]

    patched_stack = listed(patched_stack)
    if found and set(patched_stack) <= set(found):
        return found
    stacks = [kept for kept in map(listed, stacks) if kept]
    if patched_stack and not any(stack == patched_stack for stack in stacks):
        stacks = [patched_stack, *stacks]

    def first_parameter(stack: list[str]) -> int:
        return next((i for i, n in enumerate(param_names) if n.startswith(stack[0])), len(param_names))

    return [prefix for stack in sorted(stacks, key=first_parameter) for prefix in stack]


def reference_embedding_prefix(param_names: list[str]) -> str | None:
    """The input embedding's name prefix by the reference's pattern (``…embed….``, GPT-2's ``wte.``)."""
    return next((m.group(1) for n in param_names if (m := re.match(r"(.*(?:embed[^.]*|\bwte)\.)", n))), None)


def infer_blocks(param_names: list[str], layers: list[str], embedding_prefix: str | None,
                 include_embedding: bool, include_lm_head: bool, n_layer_per_block: int) -> list[list[str]]:
    """A list of blocks, each a list of name prefixes (BlockOptimizers' ``block_prefix_list``): one per layer of
    ``layers`` (their prefixes: :func:`layer_prefixes`), ``n_layer_per_block`` layers a block; ``embedding_prefix``
    (None: :func:`reference_embedding_prefix`) first where ``include_embedding``."""
    if embedding_prefix is None:
        embedding_prefix = reference_embedding_prefix(param_names)
    if not layers:
        raise ValueError(
            "BlockOptimizer: could not infer the blocks: no repeated layers found in the parameter names. Patch the "
            "model first (bread_kernels.patch finds the layers structurally) or pass block_prefix_list"
        )
    layers = [[p] for p in layers]
    if n_layer_per_block > 1:
        layers = [sum(layers[i:i + n_layer_per_block], []) for i in range(0, len(layers), n_layer_per_block)]
    blocks = []
    if include_embedding:
        if embedding_prefix is None:
            raise ValueError("BlockOptimizer: include_embedding=True but no input embedding was found (neither the "
                             "model's get_input_embeddings() nor a parameter named like '…embed….' or 'wte.'); pass "
                             "block_prefix_list with the embedding's block first")
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
        self.check(n_blocks, mode, start_block)
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

    @staticmethod
    def check(n_blocks: int, mode: str, start_block: int | None) -> None:
        """Refuse an unknown ``mode``, a ``start_block`` outside the blocks, and ``"fixed"`` without one."""
        if mode not in SWITCH_MODES:
            raise ValueError(f"BlockOptimizer: unknown switch_mode {mode!r}; use one of {', '.join(SWITCH_MODES)}")
        if start_block is not None and not 0 <= start_block < n_blocks:
            raise ValueError(f"BlockOptimizer: start_block={start_block} is outside the {n_blocks} blocks (0 to "
                             f"{n_blocks - 1})")
        if mode == "fixed" and start_block is None:
            raise ValueError("BlockOptimizer: switch_mode='fixed' trains one block only: say which with start_block=")

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

"""Other libraries' forwards that read the head's weight outside the head module: TRL's fused LM head.

TRL (1.16; ``trl.trainer.utils.add_fused_lm_head``, which ``SFTTrainer``, ``DPOTrainer``, ``GRPOTrainer``,
``KTOTrainer`` and ``RLOOTrainer`` call on their model at construction) replaces the causal LM's ``forward`` (an
instance attribute, ``types.MethodType(_fused_forward, model)``) with one that, given ``fused_lm_head=True``, runs
the base model and then its own chunked log-probability function on ``model.get_output_embeddings().weight``::

    h = model.<base_model>(...).last_hidden_state[:, :-1]          # [B, S-1, H]
    log_probs = ChunkedLogProbFunction.apply(h[mask], lm_head.weight, lm_head.bias, labels[mask], ...)

The head module's forward — the fused linear this library installs, which carries out the head's Role — never
runs, so a head whose Role updates it on the fly (SGD/SIGN: its ``requires_grad`` off, its update inside the
fused backward) would silently never be updated.  :func:`head_reader` recognises such a forward on a model, so the
engine can leave the head's on-the-fly update to its post-accumulate-grad hook (autograd's ``dW``, then the update:
the reference's way), which works whoever computes the head.

The recognition is by the forward's code (TRL wraps it with ``functools.wraps(type(model).forward)``, so its
name is the model class's), checked against the TRL versions listed in :data:`TESTED_TRL`; another version warns
once.
"""

from __future__ import annotations

import sys
import warnings

from torch import nn

__all__ = ["TESTED_TRL", "head_reader"]

#: the TRL minor versions whose ``add_fused_lm_head`` this module recognises (tested)
TESTED_TRL = ("1.16",)
_TRL_FORWARD = ("_fused_forward", "trl/trainer/utils.py")  # (code name, end of the code's file)
_MAX_WRAPPERS = 8  # how deep a __wrapped__ chain is followed

_warned = False


def _is_trl_fused_forward(forward) -> bool:
    """Whether ``forward`` (a module's instance attribute) is the one TRL's ``add_fused_lm_head`` installs, or
    wraps it: accelerate's ``prepare`` (the Trainer's) replaces it with ``convert_outputs_to_fp32(forward.__func__)``
    (and its autocast wrapper), each a ``functools.wraps`` of the one before, so the ``__wrapped__`` chain leads to
    TRL's function (and from there to the model class's forward)."""
    name, path = _TRL_FORWARD
    fn = getattr(forward, "__func__", forward)
    for _ in range(_MAX_WRAPPERS):
        code = getattr(fn, "__code__", None)
        if code is not None and code.co_name == name and code.co_filename.replace("\\", "/").endswith(path):
            return True
        fn = getattr(fn, "__wrapped__", None)
        if fn is None:
            return False
    return False


def _warn_if_untested() -> None:
    global _warned
    if _warned:
        return
    _warned = True
    trl = sys.modules.get("trl")
    version = getattr(trl, "__version__", "unknown")
    if not any(version == tested or version.startswith(tested + ".") for tested in TESTED_TRL):
        warnings.warn(f"bread_kernels: the head's on-the-fly update under TRL's fused LM head was written for TRL "
                      f"{', '.join(TESTED_TRL)}; this TRL {version} may compute the head elsewhere. Check that the "
                      "head trains (or use an include_lm_head block, whose active head trains from .grad)",
                      RuntimeWarning, stacklevel=3)


def head_reader(model: nn.Module) -> str | None:
    """What, in ``model``, computes the head from its weight outside the head module (a description), or None.

    Looked at: ``model`` itself and the model a peft wrapper holds (``get_base_model()``), where TRL installs its
    forward; cheap enough for every forward (two dictionary reads)."""
    candidates = [model]
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base):
        base = get_base()
        if base is not model:
            candidates.append(base)
    for module in candidates:
        if _is_trl_fused_forward(module.__dict__.get("forward")):
            _warn_if_untested()
            return "TRL's fused LM head (trl.trainer.utils.add_fused_lm_head)"
    return None

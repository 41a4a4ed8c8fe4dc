"""A patched model trained under ``torch.autocast`` (Hugging Face Trainer's ``bf16=True``) against the unpatched
model under the same autocast: BREAD-SGD (``sgd_mode="all"``: every inactive weight, the embedding and the head
included, takes ``W -= lr·s·dW`` inside the backward) through :class:`bread_kernels.BlockOptimizer`, whose hook path
on the unpatched model is the reference (plain autograd, full gradients read back by hooks).

As the Trainer does, the forward (and the loss) runs under ``torch.autocast("cpu", dtype=torch.bfloat16)`` and the
backward after the region; the weights are fp32.

Tolerance: every parameter after 3 steps within 1e-3 of the reference relative to the tensor's norm
(``‖W − W_ref‖ / ‖W_ref‖``), and the losses within 1e-3 relative.  Both sides run the same bf16 GEMMs on the same
operands, but the engine's dW chunks, its fp32 bias sums and the recompute's summation orders move a bf16 GEMM
result by about one bf16 ulp (2⁻⁸ relative) here and there; from the second step on the weights differ by such
amounts, which can flip the bf16 rounding of an activation (2⁻⁸ relative, on a few elements).  Adam normalises the
active block's gradients, so its updates (lr = 1e-3 per element) move by a fraction of lr where a gradient moved by
an ulp, and by up to 2·lr on the few elements whose gradient is ~0 and changes sign: with |W| ~ 0.02 (HF's init)
that is far below 1e-3 of a tensor's norm unless many elements disagree.  A wrong update (a missing cast, a dW in
the wrong dtype or scale, a skipped layer) moves whole tensors by 1e-2..1 relative, and an engine that ignored
autocast (fp32 GEMMs against the reference's bf16 ones) lands ~7e-3 away here.  (On this machine the runs agree
bit for bit with the model's own head, and up to the loss's chunked sums with ``fused_loss=True``.)
"""

from __future__ import annotations

import warnings

import pytest
import torch

import bread_kernels
from bread_kernels.patch import patched_state
from tests import model_zoo as models

LR, SCALE, STEPS = 1e-3, 0.5, 3


def train(patched: bool, fused_loss: bool = False):
    model = models.llama()
    if patched:
        bread_kernels.patch(model, fused_loss=fused_loss)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="BlockOptimizer: the model is not patched")
        opt = bread_kernels.BlockOptimizer(torch.optim.AdamW(model.parameters(), lr=LR),
                                           list(model.named_parameters()), switch_block_every=2,
                                           switch_mode="descending", sgd_mode="all", sgd_lr_scaling=SCALE, verbose=0)
    losses = []
    for step in range(STEPS):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = models.loss_of(model, models.batch(step))
        assert loss.dtype == torch.float32
        loss.backward()
        losses.append(loss.item())
        opt.step()
        opt.zero_grad()
    opt.close()
    return model, losses


@pytest.mark.parametrize("fused_loss", [False, True], ids=["head", "fused-loss"])
def test_bread_sgd_under_bf16_autocast_trains_like_the_unpatched_model(fused_loss):
    reference, reference_losses = train(patched=False)
    model, losses = train(patched=True, fused_loss=fused_loss)
    assert patched_state(model).stream.recomputes  # the streaming backward ran (and recomputed under autocast)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference_losses), rtol=1e-3, atol=0)
    initial = dict(models.llama().named_parameters())
    moved = 0
    for (name, p), (_, ref) in zip(model.named_parameters(), reference.named_parameters()):
        assert p.dtype == torch.float32
        error = (p.detach() - ref.detach()).norm() / ref.detach().norm()
        assert error <= 1e-3, f"{name}: ‖W − W_ref‖/‖W_ref‖ = {error:.3g}"
        moved += not torch.equal(ref.detach(), initial[name].detach())
    assert moved == len(initial)  # every parameter was trained (Adam or the on-the-fly SGD)

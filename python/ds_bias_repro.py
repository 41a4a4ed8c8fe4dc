"""Repro (not a test): DeepSpeed 0.19.8 ZeRO-3 alone seemed to differ from plain torch when the trained layer has
biases.  The cause is DeepSpeed's default ``gradient_clipping`` of 1.0 (``GRADIENT_CLIPPING_DEFAULT``), which
the larger gradient norm with biases exceeds; ``zero3_worker.ds_config`` now sets it to 0 (``ZERO3_WORKER_CLIP``).

    BIAS=1 ZERO3_WORKER_CLIP=1.0 torchrun --nproc_per_node 1 python/ds_bias_repro.py   # differs from step 1
    BIAS=1 torchrun --nproc_per_node 1 python/ds_bias_repro.py     # clipping off: identical at every step
    BIAS=0 ZERO3_WORKER_CLIP=1.0 torchrun --nproc_per_node 1 python/ds_bias_repro.py   # no biases

No bread_kernels code is involved: the tiny Llama of ``tests/integrations/zero3_worker.py`` (with or without ``mlp_bias``), layer 2
trainable, torch SGD(momentum 0.9) given to ``deepspeed.initialize`` (ZeRO-3, 1 CPU rank) against the same SGD on
a deep copy.  The same clipping made the LoRA (BREAD) runs differ by ~2.7% of a step, the adapters' and active
block's gradient norm being just above 1.
"""

import copy
import os
import sys

import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
# BIAS=0 builds the model without biases: the worker takes any value of its variable, "0" too, as biases
if os.environ.get("BIAS", "1") not in ("", "0"):
    os.environ["ZERO3_WORKER_MLP_BIAS"] = "1"
else:
    os.environ.pop("ZERO3_WORKER_MLP_BIAS", None)

import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402

from tests.integrations import zero3_worker as zw  # noqa: E402


def trainable(model):
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("model.layers.2."))
        if p.requires_grad:
            params.append(p)
    return params


def main():
    deepspeed.init_distributed(dist_backend="gloo")
    model = zw.build_model()
    reference = copy.deepcopy(model)
    ref_opt = torch.optim.SGD(trainable(reference), lr=5e-2, momentum=0.9)
    config = zw.ds_config(1, 0) | {"zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(trainable(model), lr=5e-2, momentum=0.9),
                                      config=config)
    for t in range(4):
        ids = zw.micro_batches(t, 1, 1)[0]
        ref_loss = zw.loss_of(reference, ids)
        ref_loss.backward()
        ref_opt.step()
        ref_opt.zero_grad()
        loss = zw.loss_of(engine, ids)
        engine.backward(loss)
        engine.step()
        print(f"step {t}: DeepSpeed loss - torch loss = {loss.item() - ref_loss.item():.3g}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

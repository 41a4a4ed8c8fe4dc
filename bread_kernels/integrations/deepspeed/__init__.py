"""ZeRO-3 under DeepSpeed: the one package that touches DeepSpeed's internals (supported: 0.19.x).

DeepSpeed stays the distributed engine; this module plugs the fused backward into it.

* **Inactive weights** (roles SGD/SIGN) stay outside DeepSpeed's optimizer.  Their update runs inside the fused
  Linear/embedding backward (or, for parameters without a fused function such as norm weights, in the block
  optimizer's post-accumulate-grad hook) while DeepSpeed's parameter coordinator has the weight gathered:
  dX from the gathered (old) weight, then dW chunk by chunk, ``reduce_scatter`` over the parameter's own process
  group, averaged over its ranks and unscaled by the loss scale, and the SGD/sign step (fp32, rounded once) on
  this rank's shard ``param.ds_tensor`` only (padding untouched).  No ``.grad`` is left behind and the full
  gradient is never all-reduced.  The maths and the memory bound are in :mod:`.sharded_update`.
* **Persistent parameters** (``ds_persist``: small ones that stay gathered between steps) get their gathered copy
  refreshed from the updated shards at the end of the backward that updated them (one all-gather per backward for
  all of them), so the next micro-batch sees the update on every rank.
* **The active block** goes through DeepSpeed's own stage-3 optimizer.  At a block switch, after
  ``engine.step()`` has returned (so the outgoing block's last step is kept), :class:`ZeroBlockEngine` destroys
  the stage-3 optimizer, drops the backward Functions DeepSpeed caches on each module (they close over the old
  coordinator), and builds a new one for the new block: every module keeps one set of hooks.
* **Gradient accumulation** (``gradient_accumulation_steps`` = A > 1): the on-the-fly update runs in every
  micro-batch's backward, with the gradient of ``loss / A`` that DeepSpeed back-propagates — as the reference
  ``block_optim.py`` (hooks on every backward) and a single-process ``BlockOptimizer`` with accumulation do.
  SGD therefore moves an inactive weight by ``lr·s·Σ_i g_i / A`` per optimizer step (each ``g_i`` taken at the
  weight the previous micro-batch left), and SIGN by ``lr·s·Σ_i sign(g_i)`` (A sign steps).  The active block
  gets DeepSpeed's accumulated gradient and one optimizer step.  Block switches count optimizer steps.

* **Memory**: no ``.grad`` of an inactive parameter survives its backward, and no whole dW need exist: a Linear's
  dW is computed and reduced in chunks of ``S`` elements per rank (``BREAD_ZERO_CHUNK_BYTES``, default 32 MiB of
  fp32 send buffer: ``S = budget / (4·w) − 1``), so the update of one weight allocates at most
  ``4·(w·(S+1) + (S+1)) + (S + 2K)·itemsize`` bytes (send, receive, one GEMM block of dW rows; K = in features)
  beyond the collective backend's own buffers.  The embedding's row-sparse update all-gathers the batch's
  distinct rows (tokens × hidden × ranks), never a vocabulary-sized gradient.
* **Collectives** per backward: one reduce-scatter per chunk of each inactive Linear weight, one per bias and per
  inactive hook-path parameter (norms), in fp32; two all-gathers for an inactive embedding; one all-gather of the
  updated persistent parameters.  Never an all-reduce.
* **LoRA** (BREAD, peft ``lora.Linear`` layers): a patched LoRA layer computes its base layer and adapters in one
  fused function, so :func:`initialize` makes every LoRA layer a ZeRO-3 leaf module (its forward and backward
  gather base weight and adapters together; DeepSpeed reduces the adapters' gradients from the leaf's full backward
  hook).  The base weight's on-the-fly update runs in that backward like a plain Linear's.  Torch runs a full
  backward hook from the output side — before the module's backward has made the adapters' gradients — when no
  input of the module requires grad (the lowest layers with BAdam-style frozen norms), so a forward pre-hook gives
  such an input a detached copy that requires grad.  Adapters that stay active across a block switch keep their
  optimizer state (Adam's moments and step, as one process does): before the stage-3 optimizer is rebuilt their
  state slices are read from it, they get flat groups of their own (one per step count, since DeepSpeed keeps one
  state per flat group) and the slices are written into the new optimizer.  Dropout in the adapters draws its mask
  per rank, as any data-parallel run does.
* **Checkpoints**: :meth:`ZeroBlockEngine.save_checkpoint` is DeepSpeed's, plus the block optimizer's schedule
  (order, counters, draw counter, lr, and the optimizer groups' layout, which the kept adapters split) in the
  checkpoint's folder, and the parameters a hook updates on the fly saved with the frozen ones (DeepSpeed tells
  the parameters its optimizer owns by ``requires_grad``: :func:`.internals.checkpointed_as_frozen`);
  :meth:`ZeroBlockEngine.load_checkpoint` activates the saved block with those groups and rebuilds the stage-3
  optimizer before DeepSpeed loads, so a fresh engine trains on as the uninterrupted run would have.
* **The Hugging Face Trainer** (``deepspeed=``, ``BreadCallback``, a :class:`ZeroBlockOptimizer` from its
  ``create_optimizer``): the Trainer hands DeepSpeed the block optimizer itself and steps DeepSpeed inside
  ``accelerator.backward``; :mod:`.trainer` connects that engine at ``on_train_begin`` and splits
  :meth:`ZeroBlockEngine.step` around DeepSpeed's step into the callback's ``on_step_begin`` (block lr) and
  ``on_optimizer_step`` (bookkeeping, switch).  The Trainer's ``resume_from_checkpoint`` loads through DeepSpeed
  before any callback runs: ``BreadTrainerMixin`` among the Trainer's bases connects the engine in
  ``create_scheduler``, just before, so the load goes through :meth:`ZeroBlockEngine.load_checkpoint`; without it the
  load is refused (a ``load_state_dict`` pre-hook on the model).  Its checkpoints also resume in a loop over
  :func:`initialize`'s engine.
* **Gradient clipping**: DeepSpeed clips the gradients it reduces (the active block's, and the adapters') to
  ``gradient_clipping``, whose default in 0.19 is **1.0**, not off; the on-the-fly updates are never clipped (as in
  the reference).  Set ``"gradient_clipping": 0`` to train like an unclipped single-process run.

Refused with a clear error (they would be silently wrong): ZeRO stages other than 3, hpZ secondary partitions
(``zero_hpz_partition_size`` > 1), quantized weights (``zero_quantized_weights`` /
``zero_quantized_nontrainable_weights``), parameter offload (``offload_param``: the frozen weights' shards would
live on the host or NVMe), and ZenFlow.

The package, one job per module: :mod:`.internals` (the version gate, the ZeRO-3 parameter attributes this
integration reads, and the canary that says when they move), :mod:`.config` (the DeepSpeed configs it refuses),
:mod:`.shards` (the :class:`~bread_kernels.update.UpdateTarget` that writes ZeRO-3 shards, and the refresh of
persistent parameters), :mod:`.optimizer` (:class:`ZeroBlockOptimizer` and the adapters' kept optimizer state),
:mod:`.lora_leaves` (peft LoRA layers as ZeRO-3 leaf modules), :mod:`.engine` (:func:`initialize` and the stage-3
optimizer's rebuild at a switch), :mod:`.trainer` (the engine the Hugging Face Trainer made with ``deepspeed=``,
connected for ``BreadCallback``).  The DeepSpeed-free maths of the sharded updates is
:mod:`bread_kernels.integrations.sharded_update`.

Usage::

    model = bread_kernels.patch(model)
    opt = ZeroBlockOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-5), list(model.named_parameters()),
                             sgd_mode="all", ...)        # BlockOptimizer's arguments
    engine = initialize(model, opt, config=ds_config)     # deepspeed.initialize + the switching
    for batch in data:
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
"""

from __future__ import annotations

from ...patch import register_whole_shape
from .config import check_config
from .engine import ZeroBlockEngine, initialize
from .internals import SUPPORTED_VERSIONS, check_version, internals_problems, is_partitioned, shard_layout, \
    whole_shape
from .optimizer import ZeroBlockOptimizer
from .shards import ZeroShards

register_whole_shape(whole_shape)  # patch weighs a model built partitioned (zero.Init) and finds its experts by it

__all__ = ["SUPPORTED_VERSIONS", "check_version", "check_config", "internals_problems", "is_partitioned",
           "shard_layout", "ZeroShards", "ZeroBlockOptimizer", "ZeroBlockEngine", "initialize"]

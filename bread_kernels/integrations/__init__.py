"""Integrations with distributed engines and trainers: :mod:`.deepspeed` (ZeRO-3), whose DeepSpeed-free maths of
sharded on-the-fly updates lives in :mod:`.sharded_update`.

They sit at the top of the package: they import the optimizer and the engine, never the other way round.  The
engine learns where an update writes only through the :class:`~bread_kernels.update.UpdateTarget` a plan carries
(the DeepSpeed integration supplies one for ZeRO-3 shards).  DeepSpeed is imported only when its integration is
used."""

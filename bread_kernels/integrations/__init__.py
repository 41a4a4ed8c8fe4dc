"""Integrations with distributed engines and trainers: :mod:`.deepspeed` (ZeRO-3), whose DeepSpeed-free maths of
sharded on-the-fly updates lives in :mod:`.sharded_update`.  Nothing here is imported by ``bread_kernels``
itself; DeepSpeed is imported only when its integration is used."""

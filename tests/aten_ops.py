"""A ``TorchDispatchMode`` that records the name of every aten op run under it (tests that count a path's ops)."""

from torch.utils._python_dispatch import TorchDispatchMode


class AtenOps(TorchDispatchMode):
    """``with AtenOps() as ops: ...`` then ``ops.names``: the ops' packet names (``"mm"``, ``"rotary_"``), in order."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))

"""Modeling code that computes with a linear layer's weight outside the layer's own forward.

Mamba's and Jamba's mixers (and FalconMamba's) compute the time step as ``self.dt_proj.weight @ time_step`` and read
``dt_proj.bias`` in their scan; the Mamba-2 family (Mamba2, Bamba, FalconH1, NemotronH, GraniteMoeHybrid, Zamba2)
hands ``self.out_proj.weight`` to mamba_ssm's fused CUDA kernel; Bloom with ``slow_but_exact`` slices
``self.dense.weight``.  The layer's forward — the fused linear :func:`bread_kernels.patch` installs, which carries
out the weight's Role — never runs on that path, so a weight whose Role updates it on the fly (SGD/SIGN: its
``requires_grad`` off, its update inside the fused backward) would silently never be updated there.

:func:`linears_read_outside` finds such layers in a block by the source of the classes of the modules above them
(every method and property but the initialisers: a name with ``init``; in every module class of their MRO, also
those after a plain mixin): an attribute chain from ``self`` to a linear's ``weight`` or ``bias`` that is
not only asked for its metadata (``.dtype``, ``.shape``, ...).  ``patch`` leaves
those layers unfused: plain autograd, their on-the-fly updates through the hook path (autograd's dW, then the
update: the reference's way), which is right whoever computes with the weight.  A read in a module-level function
the class calls, or in a class whose source cannot be read, is not seen.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap

from torch import nn

__all__ = ["linears_read_outside"]

#: what a read may ask of a weight without computing with it
_METADATA = frozenset({"dtype", "device", "shape", "size", "ndim", "dim", "numel", "is_cuda", "is_meta",
                       "requires_grad", "data_ptr", "element_size", "nbytes", "itemsize", "layout", "is_contiguous",
                       "is_floating_point"})


def _dotted_from_self(node: ast.AST) -> list[str] | None:
    """``["a", "b"]`` for the expression ``self.a.b``; None for anything else."""
    path = []
    while isinstance(node, ast.Attribute):
        path.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name) and node.id == "self" and path:
        return path[::-1]
    return None


def _functions_of(cls: type):
    """The functions defined in ``cls`` itself (unwrapped from their decorators; a property's getter and setter),
    by name."""
    for name, value in vars(cls).items():
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        accessors = (value.fget, value.fset) if isinstance(value, property) else (value,)
        for function in accessors:
            if inspect.isfunction(function):
                yield name, inspect.unwrap(function)


@functools.lru_cache(maxsize=None)
def _reads_of_class(cls: type) -> tuple[tuple[str, str, str], ...]:
    """``(submodule path, "weight"/"bias", method)`` for each read ``self.<path>.weight`` (or ``.bias``) in the
    methods of ``cls`` itself (not its bases; not its initialisers) that computes with the tensor."""
    found = []
    for method, function in _functions_of(cls):
        if "init" in method or method == "reset_parameters":
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
        except (OSError, TypeError, SyntaxError, IndentationError):
            continue
        parents = {id(child): node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and node.attr in ("weight", "bias")):
                continue
            path = _dotted_from_self(node.value)
            if path is None:
                continue
            above = parents.get(id(node))
            if isinstance(above, ast.Attribute) and above.attr in _METADATA:
                continue  # self.x.weight.dtype: metadata only
            if isinstance(above, ast.Call) and isinstance(above.func, ast.Name) and \
                    above.func.id in ("isinstance", "hasattr", "getattr", "type"):
                continue
            found.append((".".join(path), node.attr, method))
    return tuple(found)


def linears_read_outside(root: nn.Module, prefix: str, linears: list[tuple[str, nn.Module]]) -> dict[str, str]:
    """Of ``linears`` (qualified name, module) under ``root`` (named ``prefix``), those whose weight or bias a
    module's code between ``root`` and them computes with directly, each with what reads it
    (``"MambaMixer.forward reads self.dt_proj.weight"``)."""
    wanted = {id(module): name for name, module in linears}
    found: dict[str, str] = {}
    for _, module in root.named_modules(prefix=prefix):
        for cls in type(module).__mro__:  # every module class above nn.Module, past a plain mixin among them
            if cls is nn.Module or not issubclass(cls, nn.Module):
                continue
            for path, attr, method in _reads_of_class(cls):
                try:
                    target = module.get_submodule(path)
                except AttributeError:
                    continue
                name = wanted.get(id(target))
                if name is not None and name not in found:
                    found[name] = f"{cls.__name__}.{method} reads self.{path}.{attr}"
    return found

"""Mends Triton's interpreter (TRITON_INTERPRET=1: Triton kernels on CPU tensors) where a version we support
breaks on a newer numpy."""
from __future__ import annotations


def squeeze_before_index() -> None:
    """Triton 3.6's interpreter turns a scalar (a numpy array of shape (1,)) into an index with int(), which
    numpy >= 2.4 refuses, so every kernel whose loop bound is computed at run time failed
    (triton-lang/triton#9171). Later Triton squeezes the array first; this does the same, in the same place,
    for any version. Safe to call more than once."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_tensor is None or getattr(patch_tensor, "squeezes_before_index", False):
        return  # another layout of the interpreter (nothing of this to mend), or mended already

    def patch_tensor_then_index(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_tensor_then_index.squeezes_before_index = True
    interpreter._patch_lang_tensor = patch_tensor_then_index

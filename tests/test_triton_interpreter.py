"""llmfast mends Triton's interpreter where a Triton we support breaks on a newer numpy (Triton 3.6 with
numpy >= 2.4: every kernel whose loop bound is computed at run time failed)."""
import operator
import os

import numpy as np
import pytest

import llmfast  # noqa: F401  (importing it mends the interpreter when TRITON_INTERPRET=1)

interpreter = pytest.importorskip("triton.runtime.interpreter")
tl = pytest.importorskip("triton.language")


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the interpreter is off (a GPU machine)")
def test_a_scalar_of_shape_1_is_an_index():
    assert getattr(interpreter._patch_lang_tensor, "squeezes_before_index", False)
    scope = interpreter._LangPatchScope()
    interpreter._patch_lang_tensor(tl.core.tensor, scope)  # what the interpreter does around each kernel run
    try:
        scalar = tl.core.tensor(interpreter.TensorHandle(np.array([3], dtype=np.int32), tl.int32), tl.int32)
        assert operator.index(scalar) == 3
    finally:
        scope.restore()

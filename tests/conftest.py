import os

import torch

# The Triton interpreter must be switched on before any @triton.jit function is defined, so this
# runs before the test modules (and through them the kernels) are imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

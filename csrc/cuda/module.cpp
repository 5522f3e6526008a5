// The Python module entry point of llmfast._C_cuda: `import llmfast._C_cuda` loads the .so, which runs the
// static TORCH_LIBRARY_FRAGMENT/IMPL registrations of cuda/*.cu; Python needs PyInit__C_cuda to import it.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}

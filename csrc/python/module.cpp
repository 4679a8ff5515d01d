// rlhf_engine._C: the C++ host twins (backend "cpp") and the CUDA kernels (backend "cuda")
// of the bandwidth-bound ops. Entry points take raw addresses, sizes, strides and, on the
// GPU, a device index and a stream, so the module needs no libtorch and links the CUDA
// runtime statically: it imports on any machine, driver or not.
#include "registry.h"

namespace rlhf::python {

std::vector<Binder>& binders() {
  static std::vector<Binder> all;
  return all;
}

}  // namespace rlhf::python

PYBIND11_MODULE(_C, m) {
  m.doc() = "rlhf_engine's C++ host twins and CUDA kernels (see rlhf_engine/native)";
#ifdef RLHF_WITH_CUDA
  m.attr("built_with_cuda") = true;
#else
  m.attr("built_with_cuda") = false;
#endif
  for (rlhf::python::Binder bind : rlhf::python::binders()) bind(m);
}

// How each op family's bindings join the one module: a family's binding file (csrc/python/
// <family>.cpp) defines a static Register with a function that adds its entry points;
// module.cpp runs them all. Families are independent files; module.cpp never lists them.
#pragma once

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <utility>
#include <vector>

#include "rlhf/elements.h"

namespace rlhf::python {

namespace py = pybind11;

using Binder = void (*)(py::module_&);

std::vector<Binder>& binders();

struct Register {
  explicit Register(Binder binder) { binders().push_back(binder); }
};

// A tensor from Python: (data_ptr, dtype code), address 0 for an absent optional tensor.
using Tensor = std::pair<std::uintptr_t, int>;

inline In in(const Tensor& t) { return In{reinterpret_cast<const void*>(t.first), t.second}; }
inline float* f32_out(std::uintptr_t address) { return reinterpret_cast<float*>(address); }

// Every binding releases the GIL: the host twins run OpenMP loops, the CUDA launches are
// asynchronous; neither touches Python objects.
using NoGil = py::call_guard<py::gil_scoped_release>;

}  // namespace rlhf::python

// The body of a CUDA entry point's binding: select the device, then run `call`. Built
// without nvcc, every CUDA entry point raises instead (the module still imports).
#ifdef RLHF_WITH_CUDA
#include "rlhf/cuda_runtime.h"
#define RLHF_CUDA_CALL(device, call)     \
  do {                                   \
    rlhf::cuda::select_device(device);   \
    call;                                \
  } while (0)
#else
#define RLHF_CUDA_CALL(device, call)                                                                  \
  throw std::runtime_error(                                                                           \
      "rlhf_engine._C was built without CUDA (no nvcc at install, or RLHF_ENGINE_SKIP_CUDA_BUILD=1): " \
      "the 'cuda' backend cannot run; reinstall with nvcc on PATH")
#endif

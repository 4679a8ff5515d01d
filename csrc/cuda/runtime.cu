// Device selection and launch checks for every CUDA entry point (see cuda_runtime.h).
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "rlhf/cuda_runtime.h"

namespace rlhf::cuda {

void select_device(int device) {
  int count = 0;
  const cudaError_t probe = cudaGetDeviceCount(&count);
  if (probe != cudaSuccess) {
    throw std::runtime_error(std::string("rlhf_engine._C: the 'cuda' backend needs a CUDA driver and device: ") +
                             cudaGetErrorString(probe));
  }
  if (device < 0 || device >= count) {
    throw std::runtime_error("rlhf_engine._C: CUDA device " + std::to_string(device) + " does not exist (" +
                             std::to_string(count) + " visible)");
  }
  const cudaError_t selected = cudaSetDevice(device);
  if (selected != cudaSuccess) {
    throw std::runtime_error(std::string("rlhf_engine._C: cannot select CUDA device ") + std::to_string(device) +
                             ": " + cudaGetErrorString(selected));
  }
}

void check_launch(const char* kernel) {
  const cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string("rlhf_engine._C: launching ") + kernel + " failed: " +
                             cudaGetErrorString(status));
  }
}

}  // namespace rlhf::cuda

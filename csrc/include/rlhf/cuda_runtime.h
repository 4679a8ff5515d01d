// The CUDA side's contract with the bindings: every CUDA entry point first calls
// select_device (which raises a clear error without a driver or a device) and ends with
// check_launch. Nothing here includes CUDA headers, so host-only code can include it.
#pragma once

#include <cstdint>

namespace rlhf::cuda {

// Makes `device` current for this runtime (the module links its own static CUDA runtime,
// whose current device is not torch's) or throws std::runtime_error saying why not.
void select_device(int device);

// Throws std::runtime_error naming `kernel` if its launch failed.
void check_launch(const char* kernel);

}  // namespace rlhf::cuda

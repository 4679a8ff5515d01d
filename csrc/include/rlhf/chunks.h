// Fixed-size chunks of a flat range for the host twins: work is split by chunk, not by
// thread, so every reduction adds the same partial sums in the same order whatever the
// OpenMP thread count.
#pragma once

#include <algorithm>
#include <cstdint>

namespace rlhf::cpu {

constexpr int64_t kChunk = 1 << 14;  // elements: large enough to amortize a task, small enough to balance

inline int64_t chunk_count(int64_t n) { return (n + kChunk - 1) / kChunk; }
inline int64_t chunk_begin(int64_t c) { return c * kChunk; }
inline int64_t chunk_end(int64_t c, int64_t n) { return std::min(n, (c + 1) * kChunk); }

}  // namespace rlhf::cpu

// Launch geometry shared by the CUDA kernels. Every kernel here is a grid-stride loop over n elements, so the
// grid can be capped: past the cap each thread simply handles several elements.
#pragma once

#include <algorithm>
#include <cstdint>

namespace eyecool {

constexpr int kThreads = 256;

inline int64_t num_blocks(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return std::min<int64_t>(std::max<int64_t>(blocks, 1), 65535LL * 8);
}

}  // namespace eyecool

#include "engine/buffer.h"

#include <atomic>

namespace rnnserve::engine {
namespace {
std::atomic<int64_t> allocation_count{0};
}  // namespace

int64_t BufferAllocationCount() {
  return allocation_count.load(std::memory_order_relaxed);
}

namespace internal {
void CountBufferAllocation() {
  allocation_count.fetch_add(1, std::memory_order_relaxed);
}
}  // namespace internal

}  // namespace rnnserve::engine

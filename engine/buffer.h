// Aligned, growable storage for the engine's arrays.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <utility>

namespace rnnserve::engine {

// Counts every heap block Buffer has asked for since the process started.
// Tests use it to show that steady-state execution allocates nothing.
int64_t BufferAllocationCount();

namespace internal {
void CountBufferAllocation();
}  // namespace internal

// A 64-byte aligned array of trivially copyable T that only grows: Resize to
// a size at or below the capacity keeps the block, so a workspace sized for
// the largest batch seen is reused by every smaller one. Contents are not
// preserved across a Resize that grows. Not thread-safe; movable, not
// copyable.
template <typename T>
class Buffer {
 public:
  Buffer() = default;
  explicit Buffer(size_t size) { Resize(size); }
  ~Buffer() { std::free(data_); }
  Buffer(Buffer&& other) noexcept { *this = std::move(other); }
  Buffer& operator=(Buffer&& other) noexcept {
    std::swap(data_, other.data_);
    std::swap(size_, other.size_);
    std::swap(capacity_, other.capacity_);
    return *this;
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  void Resize(size_t size) {
    if (size > capacity_) {
      std::free(data_);
      size_t bytes = ((size * sizeof(T) + 63) / 64) * 64;
      data_ = static_cast<T*>(std::aligned_alloc(64, bytes));
      if (data_ == nullptr) throw std::bad_alloc();
      internal::CountBufferAllocation();
      capacity_ = size;
    }
    size_ = size;
  }
  void Zero() {
    if (size_ > 0) std::memset(data_, 0, size_ * sizeof(T));
  }

  T* data() { return data_; }
  const T* data() const { return data_; }
  size_t size() const { return size_; }
  size_t capacity() const { return capacity_; }
  T& operator[](size_t i) { return data_[i]; }
  const T& operator[](size_t i) const { return data_[i]; }

 private:
  T* data_ = nullptr;
  size_t size_ = 0;
  size_t capacity_ = 0;
};

}  // namespace rnnserve::engine

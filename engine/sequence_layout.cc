#include "engine/sequence_layout.h"

#include <algorithm>
#include <numeric>

#include "absl/strings/str_format.h"

namespace rnnserve::engine {

absl::Status SequenceLayout::Plan(absl::Span<const int64_t> lengths) {
  const size_t n = lengths.size();
  for (size_t i = 0; i < n; ++i) {
    if (lengths[i] < 1) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "sequence %d has length %d; sequences need at least one element", i,
          lengths[i]));
    }
  }

  // Equal-length sequences stay in caller order, so the layout of a batch
  // is a pure function of its lengths. The index breaks ties rather than a
  // stable sort, which would allocate a temporary buffer on every run.
  order_.resize(n);
  std::iota(order_.begin(), order_.end(), 0);
  std::sort(order_.begin(), order_.end(), [&](int64_t a, int64_t b) {
    return lengths[a] != lengths[b] ? lengths[a] > lengths[b] : a < b;
  });
  position_.resize(n);
  sorted_lengths_.resize(n);
  for (size_t s = 0; s < n; ++s) {
    position_[order_[s]] = static_cast<int64_t>(s);
    sorted_lengths_[s] = lengths[order_[s]];
  }

  const int64_t max_len = n == 0 ? 0 : sorted_lengths_[0];
  batch_sizes_.assign(max_len, 0);
  offsets_.assign(max_len, 0);
  int64_t live = static_cast<int64_t>(n);
  total_rows_ = 0;
  for (int64_t t = 0; t < max_len; ++t) {
    while (live > 0 && sorted_lengths_[live - 1] <= t) --live;
    batch_sizes_[t] = live;
    offsets_[t] = total_rows_;
    total_rows_ += live;
  }
  return absl::OkStatus();
}

}  // namespace rnnserve::engine

// The packed layout of a batch of variable-length sequences.
//
// Sequences are sorted by length, longest first, and stored time-major: the
// rows of step t are the elements at position t of every sequence still live
// at t. Because the sort puts live sequences first, the live batch at step t
// is always the prefix [0, batch_size(t)) of the sorted order, and step t's
// rows start at offset(t). This is the layout of cuDNN's packed RNN data and
// of PyTorch's PackedSequence; no row is ever padding.
//
//   lengths 3, 1, 2  ->  sorted order (0, 2, 1), batch sizes (3, 2, 1)
//   rows: t=0: s0 s2 s1 | t=1: s0 s2 | t=2: s0
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"

namespace rnnserve::engine {

class SequenceLayout {
 public:
  SequenceLayout() = default;

  // Lays out sequences of the given lengths (in caller order). Every length
  // must be at least 1 (INVALID_ARGUMENT otherwise). Reuses this object's
  // storage, so re-planning for a new batch allocates only when it grows.
  absl::Status Plan(absl::Span<const int64_t> lengths);

  int64_t batch() const { return static_cast<int64_t>(order_.size()); }
  int64_t max_length() const {
    return static_cast<int64_t>(batch_sizes_.size());
  }
  int64_t total_rows() const { return total_rows_; }

  // Number of sequences live at step t.
  int64_t batch_size(int64_t t) const { return batch_sizes_[t]; }
  // First row of step t.
  int64_t offset(int64_t t) const { return offsets_[t]; }

  // Sorted position -> caller's index, and the reverse.
  int64_t original_index(int64_t sorted) const { return order_[sorted]; }
  int64_t sorted_position(int64_t original) const {
    return position_[original];
  }
  // Length of the sequence at a sorted position.
  int64_t sorted_length(int64_t sorted) const {
    return sorted_lengths_[sorted];
  }

  // The packed row of element t of the sequence at a sorted position.
  int64_t row(int64_t sorted, int64_t t) const { return offsets_[t] + sorted; }

 private:
  std::vector<int64_t> order_;
  std::vector<int64_t> position_;
  std::vector<int64_t> sorted_lengths_;
  std::vector<int64_t> batch_sizes_;
  std::vector<int64_t> offsets_;
  int64_t total_rows_ = 0;
};

}  // namespace rnnserve::engine

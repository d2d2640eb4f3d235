// Single steps of a recurrence, on states the caller holds.
//
// The engine runs whole sequences itself (Net::Run). Decoding loops and
// server-held sessions instead advance a recurrence one element at a time,
// keep each row's state between steps, and add, drop or reorder rows as
// requests come and go (or as beam search reorders hypotheses). StepRunner
// exposes that form for a net's recurrent layers and NetFold operators:
//
//   auto runner = StepRunner::Create(model->net(), "lstm");
//   std::vector<float> h(rows * H, 0), c(rows * H, 0);   // zero states
//   float* states[] = {h.data(), c.data()};
//   runner->Step(x_t, rows, states);                      // one element
//   GatherRows(h.data(), H, {2, 0}, kept.data());         // rows 2 and 0
//
// A step gives bit for bit the state the layer computes at that element of
// a whole sequence, whatever the rows beside it.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "engine/layer.h"
#include "engine/net.h"

namespace rnnserve::engine {

// One thread at a time; create one per thread. The net must outlive it.
class StepRunner {
 public:
  // NOT_FOUND when the net has no top-level layer `layer`;
  // INVALID_ARGUMENT when that layer is not a recurrence that can step (a
  // recurrent layer, or a NetFold operator over float elements).
  static absl::StatusOr<std::unique_ptr<StepRunner>> Create(
      const Net& net, const std::string& layer);

  int64_t input_width() const { return steppable_->input_width(); }
  // One width per state: {H} for BasicRecurrentLayer and
  // GatedRecurrentLayer, {H, H} (state, cell) for LongShortTermMemoryLayer,
  // the state inputs' widths for a NetFold cell.
  const std::vector<int64_t>& state_widths() const { return widths_; }

  // Advances `rows` rows by one element: `input` is [rows, input_width()],
  // states[i] is [rows, state_widths()[i]] and is replaced by the new
  // state. INVALID_ARGUMENT for a wrong number of states or rows < 1.
  absl::Status Step(const float* input, int64_t rows,
                    absl::Span<float* const> states);

 private:
  StepRunner() = default;
  const Steppable* steppable_ = nullptr;
  std::vector<int64_t> widths_;
  LayerScratch scratch_;
};

// dst row i = src row index[i], rows of `width` floats: selects, drops,
// repeats or reorders rows between steps. REQUIRES: dst does not overlap
// src.
void GatherRows(const float* src, int64_t width,
                absl::Span<const int64_t> index, float* dst);

}  // namespace rnnserve::engine

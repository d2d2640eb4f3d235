#include "engine/step.h"

#include <cstring>

#include "absl/strings/str_format.h"

namespace rnnserve::engine {

absl::StatusOr<std::unique_ptr<StepRunner>> StepRunner::Create(
    const Net& net, const std::string& layer) {
  const Layer* found = net.FindLayer(layer);
  if (found == nullptr) {
    return absl::NotFoundError(
        absl::StrFormat("the net has no layer named '%s'", layer));
  }
  const Steppable* steppable = found->AsSteppable();
  if (steppable == nullptr) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "layer '%s' (%s) is not a recurrence that can run single steps", layer,
        found->type()));
  }
  auto runner = std::unique_ptr<StepRunner>(new StepRunner());
  runner->steppable_ = steppable;
  runner->widths_ = steppable->state_widths();
  steppable->InitStepScratch(&runner->scratch_);
  return runner;
}

absl::Status StepRunner::Step(const float* input, int64_t rows,
                              absl::Span<float* const> states) {
  if (rows < 1) {
    return absl::InvalidArgumentError(
        absl::StrFormat("a step needs at least one row, got %d", rows));
  }
  if (states.size() != widths_.size()) {
    return absl::InvalidArgumentError(
        absl::StrFormat("this recurrence has %d states, %d were given",
                        widths_.size(), states.size()));
  }
  return steppable_->StepOnce(input, rows, states, &scratch_);
}

void GatherRows(const float* src, int64_t width,
                absl::Span<const int64_t> index, float* dst) {
  for (size_t i = 0; i < index.size(); ++i) {
    std::memcpy(dst + i * width, src + index[i] * width, width * sizeof(float));
  }
}

}  // namespace rnnserve::engine

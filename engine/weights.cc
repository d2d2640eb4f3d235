#include "engine/weights.h"

#include <cstring>

#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"

namespace rnnserve::engine {

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

WeightSource::WeightSource(std::unique_ptr<SafetensorsFile> file)
    : file_(std::move(file)) {}

absl::StatusOr<Buffer<float>> WeightSource::Take(
    const std::string& name, const std::vector<int64_t>& shape) {
  const TensorView* view = file_->Find(name);
  if (view == nullptr) {
    return absl::NotFoundError(
        absl::StrFormat("%s: no array '%s'; the net needs one of shape %s",
                        path(), name, ShapeString(shape)));
  }
  if (view->dtype != DType::kF32) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: array '%s' is %s; the net needs F32", path(), name,
                        DTypeName(view->dtype)));
  }
  if (view->shape != shape) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: array '%s' has shape %s; the net needs %s", path(),
                        name, ShapeString(view->shape), ShapeString(shape)));
  }
  Buffer<float> out(view->nbytes / sizeof(float));
  if (view->nbytes > 0) std::memcpy(out.data(), view->data, view->nbytes);
  taken_.insert(name);
  return out;
}

absl::Status WeightSource::Finish() const {
  std::vector<std::string> unused;
  for (const TensorView& t : file_->tensors()) {
    if (taken_.count(t.name) == 0) unused.push_back(t.name);
  }
  if (unused.empty()) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrFormat(
      "%s: arrays no layer uses: %s (does a layer name differ?)", path(),
      absl::StrJoin(unused, ", ")));
}

}  // namespace rnnserve::engine

// Hands a net's arrays to its layers, checking every shape.
#pragma once

#include <cstdint>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "engine/buffer.h"
#include "engine/safetensors.h"

namespace rnnserve::engine {

// Formats a shape as "[4, 8]".
std::string ShapeString(const std::vector<int64_t>& shape);

// Wraps one open weights file. Layers take their arrays by name; every
// mismatch is an error that names the file, the array and both shapes, and
// Finish() reports any array in the file that no layer used (usually a
// misspelt layer name). Not thread-safe; used only while a net is built.
class WeightSource {
 public:
  explicit WeightSource(std::unique_ptr<SafetensorsFile> file);

  // Copies out the F32 array `name` after checking it has `shape`.
  // NOT_FOUND when absent; INVALID_ARGUMENT for another dtype or shape.
  absl::StatusOr<Buffer<float>> Take(const std::string& name,
                                     const std::vector<int64_t>& shape);

  // INVALID_ARGUMENT naming the arrays nobody took.
  absl::Status Finish() const;

  const std::string& path() const { return file_->path(); }

 private:
  std::unique_ptr<SafetensorsFile> file_;
  std::set<std::string> taken_;
};

}  // namespace rnnserve::engine

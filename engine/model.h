// One loaded model version: its net, arrays and codecs.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/codec.h"
#include "engine/net.h"

namespace rnnserve::engine {

// Immutable after Load; thread-safe.
class Model {
 public:
  // Loads `version_dir`/net.pbtxt and `version_dir`/weights.safetensors.
  // Every error names the file at fault: NOT_FOUND for a missing file,
  // INVALID_ARGUMENT for a malformed description, an unknown layer, or
  // arrays that do not match it, DATA_LOSS for a truncated or corrupt
  // weights file.
  // `options` choose the device (see Net::Create).
  static absl::StatusOr<std::unique_ptr<Model>> Load(
      const std::string& version_dir, const NetOptions& options = {});

  const Net& net() const { return *net_; }
  const v1::NetSpec& spec() const { return net_->spec(); }

  // The text encoder of input i, or nullptr when it takes no text.
  const CharactersEncoder* text_encoder(int i) const {
    return encoders_[i] ? &*encoders_[i] : nullptr;
  }
  // The class labels of output i; empty when it has no class decoder.
  const std::vector<std::string>& labels(int i) const { return labels_[i]; }

 private:
  Model() = default;

  std::unique_ptr<Net> net_;
  std::vector<std::optional<CharactersEncoder>> encoders_;
  std::vector<std::vector<std::string>> labels_;
};

}  // namespace rnnserve::engine

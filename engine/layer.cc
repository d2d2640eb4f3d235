#include "engine/layer.h"

#include "absl/strings/str_format.h"

namespace rnnserve::engine {

std::string PortType::DebugString() const {
  if (tokens) {
    return absl::StrFormat("%s of token ids < %d",
                           sequence ? "a sequence" : "a vector", width);
  }
  return absl::StrFormat(
      "%s of width %d", sequence ? "a sequence of vectors" : "a vector", width);
}

std::string LayerContext::ArrayName(const char* array) const {
  return absl::StrCat(prefix, spec.name(), ".", array);
}

std::string LayerContext::Describe() const {
  return absl::StrFormat("layer '%s%s' (%s)", prefix, spec.name(), spec.type());
}

const std::map<std::string, LayerType>& LayerTypes() {
  static const auto* types = [] {
    auto* t = new std::map<std::string, LayerType>;
    RegisterBasicLayers(t);
    RegisterRecurrentLayers(t);
    RegisterSequenceLayers(t);
    RegisterOperators(t);
    return t;
  }();
  return *types;
}

const std::vector<std::string>& KnownLayerTypes() {
  static const auto* names = [] {
    auto* v = new std::vector<std::string>;
    for (const auto& [name, type] : LayerTypes()) v->push_back(name);
    return v;
  }();
  return *names;
}

absl::Status NeedFloat(const LayerContext& ctx, int port) {
  if (ctx.input(port).tokens) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s needs float input but receives token ids; put an EmbeddingLayer "
        "before it",
        ctx.Describe()));
  }
  return absl::OkStatus();
}

absl::Status NeedSequence(const LayerContext& ctx, int port) {
  if (absl::Status s = NeedFloat(ctx, port); !s.ok()) return s;
  if (!ctx.input(port).sequence) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s needs a sequence input but receives %s",
                        ctx.Describe(), ctx.input(port).DebugString()));
  }
  return absl::OkStatus();
}

absl::Status NeedVector(const LayerContext& ctx, int port) {
  if (absl::Status s = NeedFloat(ctx, port); !s.ok()) return s;
  if (ctx.input(port).sequence) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s needs a vector input but receives %s",
                        ctx.Describe(), ctx.input(port).DebugString()));
  }
  return absl::OkStatus();
}

absl::Status NeedPositiveSize(const LayerContext& ctx) {
  if (ctx.spec.size() <= 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s needs a positive 'size', got %d", ctx.Describe(), ctx.spec.size()));
  }
  return absl::OkStatus();
}

}  // namespace rnnserve::engine

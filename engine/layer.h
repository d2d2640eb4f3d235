// The layer interface the net executor drives. Internal to the engine.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/buffer.h"
#include "engine/sequence_layout.h"
#include "engine/value.h"
#include "engine/weights.h"
#include "rnnserve/v1/net.pb.h"

namespace rnnserve::engine {

// Per-layer working memory owned by an Execution; grows to the largest
// batch seen and is then reused, so steady-state runs allocate nothing.
struct LayerScratch {
  Buffer<float> a;
  Buffer<float> b;
  Buffer<float> c;
};

// One node of a net. Immutable after Create, so one Layer serves every
// thread at once; all per-run memory lives in the caller's Value and
// LayerScratch.
class Layer {
 public:
  virtual ~Layer() = default;

  const std::string& name() const { return name_; }
  const std::string& type() const { return type_; }
  const PortType& output_type() const { return output_type_; }
  int64_t parameter_count() const { return parameter_count_; }

  // Computes `out` from `in` for the batch laid out by `layout`.
  virtual void Run(const SequenceLayout& layout, const Value& in, Value* out,
                   LayerScratch* scratch) const = 0;

 protected:
  Layer(const v1::LayerSpec& spec, PortType output_type)
      : name_(spec.name()), type_(spec.type()), output_type_(output_type) {}

  std::string name_;
  std::string type_;
  PortType output_type_;
  int64_t parameter_count_ = 0;
};

// Builds the layer `spec` describes for an input of type `input`, taking
// its arrays from `weights`. INVALID_ARGUMENT for an unknown type, a missing
// or bad field, or an input of the wrong kind; NOT_FOUND or
// INVALID_ARGUMENT from `weights` for a missing or misshapen array. Every
// message names the layer.
absl::StatusOr<std::unique_ptr<Layer>> CreateLayer(const v1::LayerSpec& spec,
                                                   const PortType& input,
                                                   WeightSource* weights);

// The layer types CreateLayer knows, for error messages and docs.
const std::vector<std::string>& KnownLayerTypes();

}  // namespace rnnserve::engine

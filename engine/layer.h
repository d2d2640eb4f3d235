// The layer interface the graph executor drives. Internal to the engine.
//
// A layer has named input ports (declared by its type, see LayerType) and
// named output ports (declared by the layer when it is built, each with a
// static PortType). Layers are immutable after they are built, so one layer
// serves every thread at once; per-run memory lives in the LayerScratch
// of the caller's execution.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "engine/buffer.h"
#include "engine/sequence_layout.h"
#include "engine/value.h"
#include "engine/weights.h"
#include "rnnserve/v1/net.pb.h"

namespace rnnserve::engine {

class Graph;
class GraphState;

// Per-layer working memory owned by an execution. It grows to the largest
// batch seen and is then reused, so steady-state runs allocate nothing.
struct LayerScratch {
  LayerScratch();
  ~LayerScratch();
  LayerScratch(LayerScratch&&) noexcept;
  LayerScratch& operator=(LayerScratch&&) noexcept;

  Buffer<float> a, b, c, d;
  Buffer<int64_t> index;
  // A layout the layer derives (SequenceMost, SequenceRest, NetNestList);
  // values it outputs point here.
  SequenceLayout layout;
  std::vector<int64_t> lengths;
  // Working memory of operator sub-nets.
  std::vector<std::unique_ptr<GraphState>> nested;
  // needed[p]: whether anything reads output port p. A layer may skip the
  // work of an unread port other than 0 (leaving its Value untouched).
  std::vector<bool> needed;
  // Values an operator feeds to its sub-nets, and pointers to them.
  std::vector<Value> values;
  std::vector<const Value*> args;
};

class Layer {
 public:
  virtual ~Layer() = default;

  const std::string& name() const { return name_; }
  const std::string& type() const { return type_; }
  int num_outputs() const { return static_cast<int>(outputs_.size()); }
  const std::string& output_name(int port) const {
    return outputs_[port].first;
  }
  const PortType& output_type(int port) const { return outputs_[port].second; }
  int64_t parameter_count() const { return parameter_count_; }
  // The description the layer was built from.
  const v1::LayerSpec& spec() const { return spec_; }
  // What its array names start with: "<prefix><name>.".
  const std::string& array_prefix() const { return array_prefix_; }
  // The sub-nets of an operator, for backends that compile the same graph
  // for another device (NetBidirectional: forward, backward); empty for
  // layers.
  virtual std::vector<const Graph*> subnets() const { return {}; }

  // Prepares per-execution memory, for layers with sub-nets.
  virtual void InitScratch(LayerScratch* scratch) const {}

  // Layers that are recurrences (recurrent layers, NetFold operators) can
  // also run one step on rows whose states the caller holds; see
  // engine/step.h. Others return nullptr.
  virtual const class Steppable* AsSteppable() const { return nullptr; }

  // Computes every output port from the inputs. `in` has one entry per
  // input port of the layer's type (nullptr for an unconnected optional
  // port); `out` one per output port. Fails only on run-time conditions the
  // static types cannot rule out (INVALID_ARGUMENT, naming the layer), for
  // example a sequence too short for SequenceRestLayer.
  virtual absl::Status Run(absl::Span<const Value* const> in,
                           absl::Span<Value* const> out,
                           LayerScratch* scratch) const = 0;

 protected:
  explicit Layer(const v1::LayerSpec& spec)
      : name_(spec.name()), type_(spec.type()), spec_(spec) {}
  void AddOutput(std::string name, PortType type) {
    outputs_.emplace_back(std::move(name), type);
  }

  std::string name_;
  std::string type_;
  std::vector<std::pair<std::string, PortType>> outputs_;
  int64_t parameter_count_ = 0;

 private:
  friend class Graph;
  v1::LayerSpec spec_;
  std::string array_prefix_;
};

// One step of a recurrence on `rows` rows: `input` holds their elements
// ([rows, input_width()]), states[i] their states ([rows, state_width(i)]),
// which the step replaces with the new ones. The result is bit for bit what
// the layer computes at that step of a whole sequence.
class Steppable {
 public:
  virtual ~Steppable() = default;
  virtual int64_t input_width() const = 0;
  virtual std::vector<int64_t> state_widths() const = 0;
  virtual void InitStepScratch(LayerScratch* scratch) const {}
  virtual absl::Status StepOnce(const float* input, int64_t rows,
                                absl::Span<float* const> states,
                                LayerScratch* scratch) const = 0;
};

// What a layer factory gets.
struct LayerContext {
  const v1::LayerSpec& spec;
  // One per input port of the type; nullopt for an unconnected optional
  // port. Variadic types get one per connection.
  std::vector<std::optional<PortType>> inputs;
  WeightSource* weights;
  // Prepended to the layer's array names: empty at the top level,
  // "<operator>.<part>." inside sub-nets.
  std::string prefix;
  // Issues ids for layouts that layers derive.
  int* next_layout;

  // "<prefix><layer name>.<array>".
  std::string ArrayName(const char* array) const;
  // "layer 'name' (Type)", for messages.
  std::string Describe() const;
  const PortType& input(int port = 0) const { return *inputs[port]; }
};

using LayerFactory =
    std::function<absl::StatusOr<std::unique_ptr<Layer>>(LayerContext&)>;

struct LayerType {
  // Input port names, in order; connections name them or go by position.
  std::vector<std::string> ports;
  // The first `required` ports must be connected.
  int required = 1;
  // Takes any number (at least `required`) of positional inputs.
  bool variadic = false;
  LayerFactory create;
  // For types whose ports depend on the spec (NetFold's states): replaces
  // `ports` when set.
  std::function<std::vector<std::string>(const v1::LayerSpec&)> ports_of;
};

// The registry of layer types by name. Each layers/*.cc file adds its own.
const std::map<std::string, LayerType>& LayerTypes();
const std::vector<std::string>& KnownLayerTypes();

// Registration hooks, one per layers/*.cc file.
void RegisterBasicLayers(std::map<std::string, LayerType>* types);
void RegisterRecurrentLayers(std::map<std::string, LayerType>* types);
void RegisterSequenceLayers(std::map<std::string, LayerType>* types);
void RegisterOperators(std::map<std::string, LayerType>* types);

// Reverses each sequence of `x` within its own length into `y`.
void ReverseSequence(const Value& x, Value* y);

// Shared checks for factories; each returns INVALID_ARGUMENT naming the
// layer.
absl::Status NeedFloat(const LayerContext& ctx, int port = 0);
absl::Status NeedSequence(const LayerContext& ctx, int port = 0);
absl::Status NeedVector(const LayerContext& ctx, int port = 0);
absl::Status NeedPositiveSize(const LayerContext& ctx);

}  // namespace rnnserve::engine

// A compiled graph of layers: the body of a net, or an operator's sub-net.
//
// Connections are written in a LayerSpec's `inputs` as "source" or
// "port=source", where source is a graph input, a layer (its first output
// port) or "layer.port". Unnamed connections fill the layer's ports in
// order. A layer with no connections reads the previous layer (the graph's
// first input, for the first layer). Graph outputs are the NetSpec's
// `outputs` (by `source`), or the last layer's first port when none are
// listed.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "engine/layer.h"
#include "engine/value.h"
#include "rnnserve/v1/net.pb.h"

namespace rnnserve::engine {

class Graph;

// The values and scratch memory of one graph for one thread.
class GraphState {
 public:
  ~GraphState();

 private:
  friend class Graph;
  std::vector<std::vector<Value>> values_;  // per node, per output port
  std::vector<LayerScratch> scratch_;       // per node
  std::vector<const Value*> inputs_;        // the current run's inputs
  std::vector<const Value*> in_ptrs_;       // reused argument lists
  std::vector<Value*> out_ptrs_;
};

class Graph {
 public:
  // Builds the layers of `spec` for inputs of the given types (one per
  // spec.inputs(), in order; an operator passes the types its sub-net
  // receives). Arrays come from `weights`, named with `prefix`. Errors are
  // INVALID_ARGUMENT (NOT_FOUND for a missing array) naming the layer.
  static absl::StatusOr<std::unique_ptr<Graph>> Build(
      const v1::NetSpec& spec, const std::vector<PortType>& input_types,
      WeightSource* weights, const std::string& prefix, int* next_layout);

  ~Graph();

  int num_inputs() const { return static_cast<int>(input_names_.size()); }
  int num_outputs() const { return static_cast<int>(outputs_.size()); }
  const std::string& output_name(int i) const { return output_names_[i]; }
  const PortType& output_type(int i) const;
  int64_t parameter_count() const;

  // The layer named `name`, or nullptr.
  const Layer* FindLayer(const std::string& name) const;

  // The structure, read-only, for backends that compile the graph for
  // another device. A port reference is a node with a port, or graph input
  // i as node -1 - i.
  struct Source {
    int node = 0;
    int port = 0;
  };
  const PortType& input_type(int i) const { return input_types_[i]; }
  int num_nodes() const { return static_cast<int>(nodes_.size()); }
  const Layer& layer(int node) const { return *nodes_[node].layer; }
  // One entry per input port; nullopt for an unconnected optional port.
  const std::vector<std::optional<Source>>& node_inputs(int node) const {
    return nodes_[node].inputs;
  }
  Source output_source(int i) const { return outputs_[i]; }

  std::unique_ptr<GraphState> NewState() const;

  // Runs every layer on `inputs` (one per graph input, which must outlive
  // the use of the outputs). Status: as Layer::Run.
  absl::Status Run(absl::Span<const Value* const> inputs,
                   GraphState* state) const;
  // Output i of the last Run.
  const Value& output(const GraphState& state, int i) const;

 private:
  struct Node {
    std::unique_ptr<Layer> layer;
    std::vector<std::optional<Source>> inputs;
  };

  Graph() = default;
  const Value& Resolve(const GraphState& state, Source s) const;

  std::vector<std::string> input_names_;
  std::vector<PortType> input_types_;
  std::vector<Node> nodes_;
  std::vector<Source> outputs_;
  std::vector<std::string> output_names_;
};

}  // namespace rnnserve::engine

// Which recurrent layers of a graph run as one cuDNN call. cuDNN runs a
// stack of layers (each direction pair of a bidirectional layer too) in one
// multi-layer descriptor, which overlaps the layers' steps on the device.
// A run of graph nodes fuses when each node is the same kind of recurrence
// (cell, size, directions) reading only the previous node's sequence, and
// nothing else reads the sequences between them or any state they expose.
// No CUDA in here, so the planning is tested on any machine.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "engine/cuda/rnn_weights.h"

namespace rnnserve::engine::cuda {

// What the planner needs to know of one graph node.
struct RnnNode {
  // A recurrence cuDNN runs: a recurrent layer (not the reset-before GRU),
  // or a bidirectional operator over one such layer per side with the
  // catenate join.
  bool cudnn = false;
  RnnCell cell = RnnCell::kLstm;
  int64_t hidden = 0;
  bool bidirectional = false;
  // Its only connected input is the previous node's first output.
  bool reads_only_previous = false;
  // Its first output is read by anything besides the next node (a graph
  // output, another node, or a second input of the next node).
  bool output_read_elsewhere = false;
  // Initial states come in, or final states are read.
  bool uses_states = false;
};

// Runs [first, last] of two or more nodes that fuse, in order.
std::vector<std::pair<int, int>> FuseRecurrentRuns(
    const std::vector<RnnNode>& nodes);

}  // namespace rnnserve::engine::cuda

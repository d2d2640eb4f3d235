// Placing the engine's recurrent arrays into cuDNN's weight space.
//
// cuDNN keeps all the matrices and biases of an RNN descriptor in one
// opaque block whose layout only cudnnGetRNNWeightParams reveals: for each
// pseudo-layer (layer * directions + direction) and each "linear layer id"
// it gives the address and shape of a matrix and a bias. This file does
// the mapping from the engine's arrays (PyTorch's layout: weight_ih
// [G*H, in], weight_hh [G*H, H], bias_ih and bias_hh [G*H], gates in
// PyTorch order) to those places, on a host image of the weight space that
// the program then copies to the device once. It needs no GPU, so the
// mapping is tested on any machine against a model of the layout.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace rnnserve::engine::cuda {

enum class RnnCell { kTanh, kRelu, kGru, kLstm };

// Gates per cell: 1, 1, 3, 4.
int GateCount(RnnCell cell);

// cuDNN's linear layer id for the engine's gate `gate` (PyTorch order) of
// the input matrices (recurrent = false) or the recurrent ones. cuDNN
// numbers the input matrices 0..G-1 and the recurrent ones G..2G-1; its
// LSTM gates are input, forget, new memory, output and its GRU gates
// reset, update, new memory, which are PyTorch's orders.
int CudnnLinearId(RnnCell cell, int gate, bool recurrent);

// One matrix or bias inside the weight space, in elements from its start.
struct ParamPlace {
  int64_t offset = 0;
  int64_t rows = 0;
  int64_t cols = 0;  // 1 for a bias
};

// Where the matrix and the bias of (pseudo_layer, linear_id) live. The
// program asks cudnnGetRNNWeightParams; tests pass a model.
using PlaceFn = std::function<absl::StatusOr<std::pair<ParamPlace, ParamPlace>>(
    int pseudo_layer, int linear_id)>;

// The arrays of one direction of one layer, as the engine loaded them.
struct RecurrentArrays {
  const float* weight_ih = nullptr;
  const float* weight_hh = nullptr;
  const float* bias_ih = nullptr;
  const float* bias_hh = nullptr;
  int64_t input = 0;
  int64_t hidden = 0;
};

// Writes `layers` (in pseudo-layer order) into `space`, a host image of
// `space_size` elements, zeroed first. INTERNAL naming the pseudo-layer and
// id when a place has the wrong shape, falls outside the space or overlaps
// another: the descriptor and the arrays disagree, which is the engine's
// bug, not the model's.
absl::Status FillWeightSpace(RnnCell cell,
                             absl::Span<const RecurrentArrays> layers,
                             const PlaceFn& place, float* space,
                             int64_t space_size);

}  // namespace rnnserve::engine::cuda

// Values that flow between the layers of a net during one run.
#pragma once

#include <cstdint>
#include <string>

#include "engine/buffer.h"

namespace rnnserve::engine {

// The static type of a layer's output or a net input, fixed at load.
struct PortType {
  // True: one row per element of each sequence, in the batch's packed
  // SequenceLayout. False: one row per sequence, in the layout's sorted
  // order.
  bool sequence = true;
  // True: rows are token ids in [0, width); false: float rows of `width`.
  bool tokens = false;
  int64_t width = 0;

  std::string DebugString() const;
};

// The data of one port for one batch. Buffers only grow, so a Value kept
// in an Execution is reused by every later run.
struct Value {
  PortType type;
  int64_t rows = 0;
  Buffer<float> data;    // rows * type.width floats, unless type.tokens
  Buffer<int32_t> ids;   // rows token ids, when type.tokens

  void Reshape(const PortType& t, int64_t n) {
    type = t;
    rows = n;
    if (t.tokens) {
      ids.Resize(n);
    } else {
      data.Resize(n * t.width);
    }
  }
};

}  // namespace rnnserve::engine

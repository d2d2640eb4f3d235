// Values that flow between the layers of a net during one run.
#pragma once

#include <cstdint>
#include <string>

#include "engine/buffer.h"
#include "engine/sequence_layout.h"

namespace rnnserve::engine {

// The static type of a port, fixed when a net is built.
struct PortType {
  // True: one row per element of each sequence, packed in a SequenceLayout.
  // False: one row per instance, in the caller's instance order (inside a
  // NetMap or NetFold sub-net: one row per element or live sequence).
  bool sequence = true;
  // True: rows are token ids in [0, width); false: float rows of `width`.
  bool tokens = false;
  int64_t width = 0;
  // For sequences: which layout the rows follow. Two sequences with the
  // same id have the same lengths at run time, so row-wise layers may
  // combine them; -1 for vectors.
  int layout = -1;

  std::string DebugString() const;
};

// The data of one port for one batch. Buffers only grow, so a Value kept
// in an execution is reused by every later run.
struct Value {
  PortType type;
  int64_t rows = 0;
  // For sequences: the layout of the rows, owned by the execution.
  const SequenceLayout* layout = nullptr;
  Buffer<float> data;   // rows * type.width floats, unless type.tokens
  Buffer<int32_t> ids;  // rows token ids, when type.tokens

  void Reshape(const PortType& t, int64_t n,
               const SequenceLayout* l = nullptr) {
    type = t;
    rows = n;
    layout = l;
    if (t.tokens) {
      ids.Resize(n);
    } else {
      data.Resize(n * t.width);
    }
  }
  float* row(int64_t r) { return data.data() + r * type.width; }
  const float* row(int64_t r) const { return data.data() + r * type.width; }
};

}  // namespace rnnserve::engine

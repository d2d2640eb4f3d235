#include "engine/cuda/rnn_weights.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_format.h"

namespace rnnserve::engine::cuda {

int GateCount(RnnCell cell) {
  switch (cell) {
    case RnnCell::kGru:
      return 3;
    case RnnCell::kLstm:
      return 4;
    default:
      return 1;
  }
}

int CudnnLinearId(RnnCell cell, int gate, bool recurrent) {
  // PyTorch gate q is cuDNN gate kGateOrder[q]: the orders agree for every
  // cell (see the header), so the table is the identity, kept explicit so
  // that a cell with another order changes one line.
  static constexpr int kLstmOrder[4] = {0, 1, 2, 3};  // i, f, g, o
  static constexpr int kGruOrder[3] = {0, 1, 2};      // r, z, n
  int id = gate;
  if (cell == RnnCell::kLstm) id = kLstmOrder[gate];
  if (cell == RnnCell::kGru) id = kGruOrder[gate];
  return recurrent ? GateCount(cell) + id : id;
}

absl::Status FillWeightSpace(RnnCell cell,
                             absl::Span<const RecurrentArrays> layers,
                             const PlaceFn& place, float* space,
                             int64_t space_size) {
  std::memset(space, 0, space_size * sizeof(float));
  // Which elements are already written, to catch overlapping places.
  std::vector<bool> written(space_size, false);
  const int gates = GateCount(cell);
  for (int pl = 0; pl < static_cast<int>(layers.size()); ++pl) {
    const RecurrentArrays& a = layers[pl];
    const int64_t h = a.hidden;
    for (int recurrent = 0; recurrent < 2; ++recurrent) {
      const float* matrix = recurrent ? a.weight_hh : a.weight_ih;
      const float* bias = recurrent ? a.bias_hh : a.bias_ih;
      const int64_t cols = recurrent ? h : a.input;
      for (int q = 0; q < gates; ++q) {
        const int id = CudnnLinearId(cell, q, recurrent);
        absl::StatusOr<std::pair<ParamPlace, ParamPlace>> p = place(pl, id);
        if (!p.ok()) return p.status();
        auto put = [&](const ParamPlace& at, int64_t rows, int64_t width,
                       const float* from, const char* what) -> absl::Status {
          if (at.rows != rows || at.cols != width) {
            return absl::InternalError(absl::StrFormat(
                "cuDNN weight space: pseudo-layer %d id %d: the %s is "
                "[%d, %d] there, the engine's is [%d, %d]",
                pl, id, what, at.rows, at.cols, rows, width));
          }
          const int64_t n = rows * width;
          if (at.offset < 0 || at.offset + n > space_size) {
            return absl::InternalError(absl::StrFormat(
                "cuDNN weight space: pseudo-layer %d id %d: the %s at "
                "[%d, %d) falls outside the %d-element space",
                pl, id, what, at.offset, at.offset + n, space_size));
          }
          for (int64_t i = 0; i < n; ++i) {
            if (written[at.offset + i]) {
              return absl::InternalError(absl::StrFormat(
                  "cuDNN weight space: pseudo-layer %d id %d: the %s "
                  "overlaps another array at element %d",
                  pl, id, what, at.offset + i));
            }
            written[at.offset + i] = true;
          }
          std::memcpy(space + at.offset, from, n * sizeof(float));
          return absl::OkStatus();
        };
        absl::Status s =
            put(p->first, h, cols, matrix + q * h * cols, "matrix");
        if (s.ok()) s = put(p->second, h, 1, bias + q * h, "bias");
        if (!s.ok()) return s;
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace rnnserve::engine::cuda

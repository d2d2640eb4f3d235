// Matrix products for the CPU engine.
//
// Every product here multiplies activations A [m, k] (row-major) by the
// transpose of a weight matrix W [n, k] (the layout of PyTorch's and the net
// format's weights), which is packed once at load into column panels.
//
// Results are batch-invariant: each output element is one fused
// multiply-add chain over k in a fixed order, whatever m, the row's position
// in the batch, or the thread count. So a sequence computes bit for bit the
// same alone as inside any batch, which tests rely on and users can too.
#pragma once

#include <cstdint>

#include "absl/functional/function_ref.h"
#include "absl/types/span.h"
#include "engine/buffer.h"

namespace rnnserve::engine::cpu {

// Columns per packed panel: two 16-float vectors.
inline constexpr int64_t kPanelWidth = 32;

// A weight matrix W [n, k] repacked for Gemm: panel p holds columns
// [32p, 32p + 32) of W^T as k rows of 32 floats, zero-padded past n.
// Immutable after Pack; thread-safe.
class PackedWeights {
 public:
  PackedWeights() = default;
  // Packs the row-major matrix `w` of n rows and k columns.
  static PackedWeights Pack(const float* w, int64_t n, int64_t k);

  int64_t n() const { return n_; }
  int64_t k() const { return k_; }
  int64_t panels() const { return (n_ + kPanelWidth - 1) / kPanelWidth; }
  const float* panel(int64_t p) const {
    return data_.data() + p * k_ * kPanelWidth;
  }

 private:
  int64_t n_ = 0;
  int64_t k_ = 0;
  Buffer<float> data_;
};

// C[m, n] = A[m, k] W^T (+ C when `accumulate`) (+ bias[n] when `bias` is
// not null), each sum taken in that order. lda and ldc are row strides in
// elements. Splits the work over OpenMP threads when it is large enough to
// pay for them. Thread-safe.
void Gemm(int64_t m, const float* a, int64_t lda, const PackedWeights& w,
          float* c, int64_t ldc, bool accumulate, const float* bias = nullptr);

// Called after a tile of a GatedGemm with the rows [row0, row1) and units
// [unit0, unit1) whose gate columns are all computed.
using TileEpilogue = absl::FunctionRef<void(int64_t row0, int64_t row1,
                                            int64_t unit0, int64_t unit1)>;

// The product of Gemm for recurrent weights, whose n columns form `gates`
// gate-major blocks of n / gates units each. Each tile computes every gate
// of a group of units for a block of rows and then runs `epilogue` on them
// while they are still in cache, on the same thread; so the cell update is
// spread over the threads with the product. Each (row, unit) is passed to
// the epilogue exactly once. Results equal Gemm's bit for bit.
void GatedGemm(int64_t m, const float* a, int64_t lda, const PackedWeights& w,
               int64_t gates, float* c, int64_t ldc, bool accumulate,
               TileEpilogue epilogue);

// One gate of a StepGemm: x W_x^T + bias goes to x_out, then h W_h^T is
// added to h_out (or written there, without h_accumulate). Pointers are the
// gate's first column in row 0.
struct StepGate {
  float* x_out;
  int64_t x_ld;
  float* h_out;
  int64_t h_ld;
  bool h_accumulate;
};

// One recurrent step with its input projection: for each tile of rows and
// units, every gate's x product (plus its bias) and then h product, then
// `epilogue`. `x` may be null (the projection is already in h_out) and `h`
// may be null (zero states: no h product). The x and h
// products of each element are the same fused multiply-add chains, summed
// in the same order, as a Gemm over all x rows followed by a GatedGemm, so
// the two ways give identical results. REQUIRES: units per gate a multiple
// of kPanelWidth; wx and wh have the same n; at most 4 gates.
void StepGemm(int64_t m, const float* x, int64_t ldx, const PackedWeights& wx,
              const float* bias, const float* h, int64_t ldh,
              const PackedWeights& wh, absl::Span<const StepGate> gates,
              TileEpilogue epilogue);

}  // namespace rnnserve::engine::cpu

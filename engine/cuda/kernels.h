// The CUDA backend's own kernels, for everything that is not a matrix
// product (cuBLAS) or a recurrence cuDNN runs. Each launch returns the
// launch's error; all rows are row-major floats.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace rnnserve::engine::cuda {

// The functions of ElementwiseLayer, with the CPU engine's definitions.
enum class Activation {
  kTanh,
  kSigmoid,
  kRelu,
  kElu,
  kSoftplus,
  kGelu,
  kIdentity,
  kNegate,
  kOneMinus,
  kExp,
  kSquare,
};

// y[r] = x[index[r]] for r < rows: embedding lookups, sequence gathers and
// reorders by index.
cudaError_t GatherRows(const float* x, int64_t width, const int32_t* index,
                       int64_t rows, float* y, cudaStream_t stream);

// y[r, c0 + j] = x[r, j] for j < x_width: one input of a catenation, into
// columns [c0, c0 + x_width) of y's y_width.
cudaError_t CopyColumns(const float* x, int64_t x_width, int64_t rows, float* y,
                        int64_t y_width, int64_t c0, cudaStream_t stream);

// y[r] = bias for every row: the start of a biased product.
cudaError_t BroadcastRows(const float* bias, int64_t width, int64_t rows,
                          float* y, cudaStream_t stream);

cudaError_t Activate(Activation f, const float* x, float* y, int64_t n,
                     cudaStream_t stream);

// Row-wise softmax, max-subtracted.
cudaError_t Softmax(const float* x, float* y, int64_t rows, int64_t width,
                    cudaStream_t stream);

enum class Combine { kAdd, kMultiply, kSubtract };
// y = a op b, element by element; y may be a.
cudaError_t CombineElements(Combine op, const float* a, const float* b,
                            float* y, int64_t n, cudaStream_t stream);
// y[r, j] = x[r, j] op v[j] for `rows` rows of `width`: one vector applied
// to every row (ConstantTimesLayer, ConstantPlusLayer); y may be x.
cudaError_t CombineRows(Combine op, const float* x, const float* v,
                        int64_t width, int64_t rows, float* y,
                        cudaStream_t stream);
// y *= s.
cudaError_t Scale(float s, float* y, int64_t n, cudaStream_t stream);

// One step of the original GRU (reset before the product) for `rows` rows
// of width h. `x` holds the input projections [rows, 3h] (biases folded,
// r | z | n), `hr` the recurrent r|z products [rows, 2h]; writes
// reset = sigmoid(x_r + hr_r) * prev into `reset` [rows, h].
cudaError_t GruResetState(const float* x, const float* hr, const float* prev,
                          int64_t rows, int64_t h, float* reset,
                          cudaStream_t stream);
// Then, with `hn` = W_hn (reset) [rows, h] (its bias folded in x):
// next = (1 - z) * tanh(x_n + hn) + z * prev.
cudaError_t GruUpdate(const float* x, const float* hr, const float* hn,
                      const float* prev, int64_t rows, int64_t h, float* next,
                      cudaStream_t stream);

}  // namespace rnnserve::engine::cuda

namespace rnnserve::engine::cuda {

// pool[index[r]] = x[r] for r < rows: the other half of GatherRows.
cudaError_t ScatterRows(const float* x, int64_t width, const int32_t* index,
                        int64_t rows, float* pool, cudaStream_t stream);

// One step's cell updates, from the two products of the step (each with its
// own bias already added): gx = x W_ih^T + b_ih, gh = h W_hh^T + b_hh, both
// [rows, G*h] in PyTorch gate order. h and c are [rows, h], updated in
// place.
cudaError_t LstmStep(const float* gx, const float* gh, int64_t rows, int64_t h,
                     float* state, float* cell, cudaStream_t stream);
cudaError_t GruStep(const float* gx, const float* gh, int64_t rows, int64_t h,
                    float* state, cudaStream_t stream);
// relu when `relu`, else tanh.
cudaError_t RnnStep(const float* gx, const float* gh, int64_t rows, int64_t h,
                    bool relu, float* state, cudaStream_t stream);

}  // namespace rnnserve::engine::cuda

namespace rnnserve::engine::cuda {

// Conversions between fp32 and the reduced storage types: `bf16` selects
// bfloat16, else IEEE half. Round to nearest even.
cudaError_t FloatToReduced(const float* x, void* y, int64_t n, bool bf16,
                           cudaStream_t stream);
cudaError_t ReducedToFloat(const void* x, float* y, int64_t n, bool bf16,
                           cudaStream_t stream);

}  // namespace rnnserve::engine::cuda

namespace rnnserve::engine::cuda {

// Attention of one query per instance over its sequence, one block per
// instance. Instance i's rows are offsets[t] + position[i] for t <
// length[i]. Scores are query . key (keys [rows, width], query [batch,
// width]) or, when `vector` is given, vector . tanh(query + key + bias)
// with keys already projected. Writes the softmaxed scores to weights
// [rows] and sum_t weight_t * values_t to context [batch, value_width].
cudaError_t Attention(const float* query, const float* keys, int64_t width,
                      const float* vector, const float* bias,
                      const float* values, int64_t value_width,
                      const int32_t* offsets, const int32_t* position,
                      const int32_t* length, int64_t batch, float* weights,
                      float* context, cudaStream_t stream);

}  // namespace rnnserve::engine::cuda

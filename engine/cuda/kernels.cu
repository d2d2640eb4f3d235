#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "engine/cuda/kernels.h"

namespace rnnserve::engine::cuda {
namespace {

constexpr int kThreads = 256;

int Blocks(int64_t n) {
  const int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<int>(b < 65535 * 32 ? (b > 0 ? b : 1) : 65535 * 32);
}

// Launches a grid-stride `kernel` over n elements on `stream`; nothing when
// n is 0.
template <typename... Params, typename... Args>
cudaError_t LaunchOver(int64_t n, cudaStream_t stream,
                       void (*kernel)(Params...), Args... args) {
  if (n == 0) return cudaSuccess;
  kernel<<<Blocks(n), kThreads, 0, stream>>>(args...);
  return cudaGetLastError();
}

__global__ void GatherRowsKernel(const float* __restrict__ x, int64_t width,
                                 const int32_t* __restrict__ index,
                                 int64_t rows, float* __restrict__ y) {
  const int64_t n = rows * width;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t r = i / width, j = i - r * width;
    y[i] = x[int64_t{index[r]} * width + j];
  }
}

__global__ void CopyColumnsKernel(const float* __restrict__ x, int64_t xw,
                                  int64_t rows, float* __restrict__ y,
                                  int64_t yw, int64_t c0) {
  const int64_t n = rows * xw;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t r = i / xw, j = i - r * xw;
    y[r * yw + c0 + j] = x[i];
  }
}

__global__ void BroadcastRowsKernel(const float* __restrict__ bias,
                                    int64_t width, int64_t rows,
                                    float* __restrict__ y) {
  const int64_t n = rows * width;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    y[i] = bias[i % width];
  }
}

__device__ float Apply(Activation f, float v) {
  switch (f) {
    case Activation::kTanh:
      return tanhf(v);
    case Activation::kSigmoid:
      return 1.0f / (1.0f + expf(-v));
    case Activation::kRelu:
      return v > 0.0f ? v : 0.0f;
    case Activation::kElu:
      return v > 0.0f ? v : expm1f(v);
    case Activation::kSoftplus:
      return v > 20.0f ? v : log1pf(expf(v));
    case Activation::kGelu:
      return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
    case Activation::kIdentity:
      return v;
    case Activation::kNegate:
      return -v;
    case Activation::kOneMinus:
      return 1.0f - v;
    case Activation::kExp:
      return expf(v);
    case Activation::kSquare:
      return v * v;
  }
  return v;
}

__global__ void ActivateKernel(Activation f, const float* __restrict__ x,
                               float* __restrict__ y, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    y[i] = Apply(f, x[i]);
  }
}

// One block per row; a block-wide max and sum through shared memory.
__global__ void SoftmaxKernel(const float* __restrict__ x,
                              float* __restrict__ y, int64_t width) {
  __shared__ float reduce[kThreads];
  const float* in = x + blockIdx.x * width;
  float* out = y + blockIdx.x * width;
  float m = -INFINITY;
  for (int64_t j = threadIdx.x; j < width; j += blockDim.x) m = fmaxf(m, in[j]);
  reduce[threadIdx.x] = m;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) {
      reduce[threadIdx.x] = fmaxf(reduce[threadIdx.x], reduce[threadIdx.x + s]);
    }
    __syncthreads();
  }
  m = reduce[0];
  __syncthreads();
  float sum = 0.0f;
  for (int64_t j = threadIdx.x; j < width; j += blockDim.x) {
    const float e = expf(in[j] - m);
    out[j] = e;
    sum += e;
  }
  reduce[threadIdx.x] = sum;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) reduce[threadIdx.x] += reduce[threadIdx.x + s];
    __syncthreads();
  }
  const float inv = 1.0f / reduce[0];
  for (int64_t j = threadIdx.x; j < width; j += blockDim.x) out[j] *= inv;
}

__device__ float CombineOne(Combine op, float u, float v) {
  return op == Combine::kAdd ? u + v
                             : (op == Combine::kMultiply ? u * v : u - v);
}

__global__ void CombineKernel(Combine op, const float* a, const float* b,
                              float* y, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    y[i] = CombineOne(op, a[i], b[i]);
  }
}

__global__ void CombineRowsKernel(Combine op, const float* x,
                                  const float* __restrict__ v, int64_t width,
                                  int64_t rows, float* y) {
  const int64_t n = rows * width;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    y[i] = CombineOne(op, x[i], v[i % width]);
  }
}

__global__ void ScaleKernel(float s, float* y, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    y[i] *= s;
  }
}

__device__ float Sigmoid(float v) { return 1.0f / (1.0f + expf(-v)); }

__global__ void GruResetStateKernel(const float* __restrict__ x,
                                    const float* __restrict__ hr,
                                    const float* __restrict__ prev,
                                    int64_t rows, int64_t h,
                                    float* __restrict__ reset) {
  const int64_t n = rows * h;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t r = i / h, j = i - r * h;
    const float g = Sigmoid(x[r * 3 * h + j] + hr[r * 2 * h + j]);
    reset[i] = g * prev[i];
  }
}

__global__ void GruUpdateKernel(const float* __restrict__ x,
                                const float* __restrict__ hr,
                                const float* __restrict__ hn,
                                const float* __restrict__ prev, int64_t rows,
                                int64_t h, float* __restrict__ next) {
  const int64_t n = rows * h;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t r = i / h, j = i - r * h;
    const float z = Sigmoid(x[r * 3 * h + h + j] + hr[r * 2 * h + h + j]);
    const float c = tanhf(x[r * 3 * h + 2 * h + j] + hn[i]);
    next[i] = (1.0f - z) * c + z * prev[i];
  }
}

__global__ void ScatterRowsKernel(const float* __restrict__ x, int64_t width,
                                  const int32_t* __restrict__ index,
                                  int64_t rows, float* __restrict__ pool) {
  const int64_t n = rows * width;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t r = i / width, j = i - r * width;
    pool[int64_t{index[r]} * width + j] = x[i];
  }
}

__global__ void LstmStepKernel(const float* __restrict__ gx,
                               const float* __restrict__ gh, int64_t rows,
                               int64_t h, float* __restrict__ state,
                               float* __restrict__ cell) {
  const int64_t n = rows * h;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t r = i / h, j = i - r * h;
    const float* x = gx + r * 4 * h + j;
    const float* g = gh + r * 4 * h + j;
    const float in = Sigmoid(x[0] + g[0]);
    const float forget = Sigmoid(x[h] + g[h]);
    const float candidate = tanhf(x[2 * h] + g[2 * h]);
    const float out = Sigmoid(x[3 * h] + g[3 * h]);
    const float c = forget * cell[i] + in * candidate;
    cell[i] = c;
    state[i] = out * tanhf(c);
  }
}

__global__ void GruStepKernel(const float* __restrict__ gx,
                              const float* __restrict__ gh, int64_t rows,
                              int64_t h, float* __restrict__ state) {
  const int64_t n = rows * h;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t r = i / h, j = i - r * h;
    const float* x = gx + r * 3 * h + j;
    const float* g = gh + r * 3 * h + j;
    const float reset = Sigmoid(x[0] + g[0]);
    const float update = Sigmoid(x[h] + g[h]);
    const float candidate = tanhf(x[2 * h] + reset * g[2 * h]);
    state[i] = (1.0f - update) * candidate + update * state[i];
  }
}

__global__ void RnnStepKernel(const float* __restrict__ gx,
                              const float* __restrict__ gh, int64_t rows,
                              int64_t h, bool relu, float* __restrict__ state) {
  const int64_t n = rows * h;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const float v = gx[i] + gh[i];
    state[i] = relu ? fmaxf(v, 0.0f) : tanhf(v);
  }
}

__global__ void ToHalfKernel(const float* __restrict__ x, __half* y,
                             int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    y[i] = __float2half_rn(x[i]);
  }
}

__global__ void ToBf16Kernel(const float* __restrict__ x, __nv_bfloat16* y,
                             int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    y[i] = __float2bfloat16_rn(x[i]);
  }
}

__global__ void FromHalfKernel(const __half* x, float* __restrict__ y,
                               int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    y[i] = __half2float(x[i]);
  }
}

__global__ void FromBf16Kernel(const __nv_bfloat16* x, float* __restrict__ y,
                               int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    y[i] = __bfloat162float(x[i]);
  }
}

// Block-wide reduction through shared memory; every thread gets the result.
template <bool kMax>
__device__ float BlockReduce(float v, float* shared) {
  shared[threadIdx.x] = v;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) {
      const float o = shared[threadIdx.x + s];
      shared[threadIdx.x] =
          kMax ? fmaxf(shared[threadIdx.x], o) : shared[threadIdx.x] + o;
    }
    __syncthreads();
  }
  const float r = shared[0];
  __syncthreads();
  return r;
}

__global__ void AttentionKernel(
    const float* __restrict__ query, const float* __restrict__ keys,
    int64_t width, const float* __restrict__ vector,
    const float* __restrict__ bias, const float* __restrict__ values,
    int64_t value_width, const int32_t* __restrict__ offsets,
    const int32_t* __restrict__ position, const int32_t* __restrict__ length,
    float* __restrict__ weights, float* __restrict__ context) {
  __shared__ float shared[kThreads];
  const int64_t i = blockIdx.x;
  const int64_t s = position[i], len = length[i];
  const float* q = query + i * width;
  float local_max = -INFINITY;
  for (int64_t t = threadIdx.x; t < len; t += blockDim.x) {
    const int64_t row = offsets[t] + s;
    const float* k = keys + row * width;
    float score = 0.0f;
    if (vector != nullptr) {
      for (int64_t j = 0; j < width; ++j) {
        score += vector[j] * tanhf(q[j] + k[j] + bias[j]);
      }
    } else {
      for (int64_t j = 0; j < width; ++j) score += q[j] * k[j];
    }
    weights[row] = score;
    local_max = fmaxf(local_max, score);
  }
  const float max = BlockReduce<true>(local_max, shared);
  float local_sum = 0.0f;
  for (int64_t t = threadIdx.x; t < len; t += blockDim.x) {
    const int64_t row = offsets[t] + s;
    const float e = expf(weights[row] - max);
    weights[row] = e;
    local_sum += e;
  }
  const float inv = 1.0f / BlockReduce<false>(local_sum, shared);
  for (int64_t t = threadIdx.x; t < len; t += blockDim.x) {
    weights[offsets[t] + s] *= inv;
  }
  __syncthreads();
  for (int64_t j = threadIdx.x; j < value_width; j += blockDim.x) {
    float c = 0.0f;
    for (int64_t t = 0; t < len; ++t) {
      const int64_t row = offsets[t] + s;
      c += weights[row] * values[row * value_width + j];
    }
    context[i * value_width + j] = c;
  }
}

}  // namespace

cudaError_t FloatToReduced(const float* x, void* y, int64_t n, bool bf16,
                           cudaStream_t stream) {
  return bf16 ? LaunchOver(n, stream, ToBf16Kernel, x,
                           static_cast<__nv_bfloat16*>(y), n)
              : LaunchOver(n, stream, ToHalfKernel, x, static_cast<__half*>(y),
                           n);
}

cudaError_t ReducedToFloat(const void* x, float* y, int64_t n, bool bf16,
                           cudaStream_t stream) {
  return bf16 ? LaunchOver(n, stream, FromBf16Kernel,
                           static_cast<const __nv_bfloat16*>(x), y, n)
              : LaunchOver(n, stream, FromHalfKernel,
                           static_cast<const __half*>(x), y, n);
}

cudaError_t GatherRows(const float* x, int64_t width, const int32_t* index,
                       int64_t rows, float* y, cudaStream_t stream) {
  return LaunchOver(rows * width, stream, GatherRowsKernel, x, width, index,
                    rows, y);
}

cudaError_t CopyColumns(const float* x, int64_t x_width, int64_t rows, float* y,
                        int64_t y_width, int64_t c0, cudaStream_t stream) {
  return LaunchOver(rows * x_width, stream, CopyColumnsKernel, x, x_width, rows,
                    y, y_width, c0);
}

cudaError_t BroadcastRows(const float* bias, int64_t width, int64_t rows,
                          float* y, cudaStream_t stream) {
  return LaunchOver(rows * width, stream, BroadcastRowsKernel, bias, width,
                    rows, y);
}

cudaError_t Activate(Activation f, const float* x, float* y, int64_t n,
                     cudaStream_t stream) {
  return LaunchOver(n, stream, ActivateKernel, f, x, y, n);
}

cudaError_t Softmax(const float* x, float* y, int64_t rows, int64_t width,
                    cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  // Rows beyond the grid's x limit cannot occur: batches are capped far
  // below 2^31 rows.
  SoftmaxKernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(x, y,
                                                                      width);
  return cudaGetLastError();
}

cudaError_t CombineElements(Combine op, const float* a, const float* b,
                            float* y, int64_t n, cudaStream_t stream) {
  return LaunchOver(n, stream, CombineKernel, op, a, b, y, n);
}

cudaError_t CombineRows(Combine op, const float* x, const float* v,
                        int64_t width, int64_t rows, float* y,
                        cudaStream_t stream) {
  return LaunchOver(rows * width, stream, CombineRowsKernel, op, x, v, width,
                    rows, y);
}

cudaError_t Scale(float s, float* y, int64_t n, cudaStream_t stream) {
  return LaunchOver(n, stream, ScaleKernel, s, y, n);
}

cudaError_t GruResetState(const float* x, const float* hr, const float* prev,
                          int64_t rows, int64_t h, float* reset,
                          cudaStream_t stream) {
  return LaunchOver(rows * h, stream, GruResetStateKernel, x, hr, prev, rows, h,
                    reset);
}

cudaError_t GruUpdate(const float* x, const float* hr, const float* hn,
                      const float* prev, int64_t rows, int64_t h, float* next,
                      cudaStream_t stream) {
  return LaunchOver(rows * h, stream, GruUpdateKernel, x, hr, hn, prev, rows, h,
                    next);
}

cudaError_t ScatterRows(const float* x, int64_t width, const int32_t* index,
                        int64_t rows, float* pool, cudaStream_t stream) {
  return LaunchOver(rows * width, stream, ScatterRowsKernel, x, width, index,
                    rows, pool);
}

cudaError_t LstmStep(const float* gx, const float* gh, int64_t rows, int64_t h,
                     float* state, float* cell, cudaStream_t stream) {
  return LaunchOver(rows * h, stream, LstmStepKernel, gx, gh, rows, h, state,
                    cell);
}

cudaError_t GruStep(const float* gx, const float* gh, int64_t rows, int64_t h,
                    float* state, cudaStream_t stream) {
  return LaunchOver(rows * h, stream, GruStepKernel, gx, gh, rows, h, state);
}

cudaError_t RnnStep(const float* gx, const float* gh, int64_t rows, int64_t h,
                    bool relu, float* state, cudaStream_t stream) {
  return LaunchOver(rows * h, stream, RnnStepKernel, gx, gh, rows, h, relu,
                    state);
}

cudaError_t Attention(const float* query, const float* keys, int64_t width,
                      const float* vector, const float* bias,
                      const float* values, int64_t value_width,
                      const int32_t* offsets, const int32_t* position,
                      const int32_t* length, int64_t batch, float* weights,
                      float* context, cudaStream_t stream) {
  if (batch == 0) return cudaSuccess;
  AttentionKernel<<<static_cast<unsigned>(batch), kThreads, 0, stream>>>(
      query, keys, width, vector, bias, values, value_width, offsets, position,
      length, weights, context);
  return cudaGetLastError();
}

}  // namespace rnnserve::engine::cuda

#include "engine/cpu/activations.h"

#include <algorithm>
#include <cmath>

namespace rnnserve::engine::cpu {

void Tanh(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = FastTanh(x[i]);
}

void Sigmoid(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = FastSigmoid(x[i]);
}

void Relu(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = std::max(x[i], 0.0f);
}

void Elu(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    y[i] = x[i] > 0.0f ? x[i] : std::expm1(x[i]);
  }
}

// PyTorch's Softplus (beta 1) switches to the identity above 20, where
// log1p(exp(x)) equals x in float; matching it keeps parity exact there.
void Softplus(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    y[i] = x[i] > 20.0f ? x[i] : std::log1p(std::exp(x[i]));
  }
}

void Gelu(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    y[i] = 0.5f * x[i] * (1.0f + std::erf(x[i] * 0.70710678118654752f));
  }
}

void Softmax(const float* x, float* y, int64_t rows, int64_t width) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* in = x + r * width;
    float* out = y + r * width;
    float max = in[0];
    for (int64_t i = 1; i < width; ++i) max = std::max(max, in[i]);
    float sum = 0.0f;
    for (int64_t i = 0; i < width; ++i) {
      out[i] = FastExp(in[i] - max);
      sum += out[i];
    }
    const float inv = 1.0f / sum;
    for (int64_t i = 0; i < width; ++i) out[i] *= inv;
  }
}

}  // namespace rnnserve::engine::cpu

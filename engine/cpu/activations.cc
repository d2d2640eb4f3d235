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

void LstmCell(const float* __restrict gi, const float* __restrict gf,
              const float* __restrict gg, const float* __restrict go,
              float* __restrict c, float* __restrict h, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const float cj =
        FastSigmoid(gf[j]) * c[j] + FastSigmoid(gi[j]) * FastTanh(gg[j]);
    c[j] = cj;
    h[j] = FastSigmoid(go[j]) * FastTanh(cj);
  }
}

void GruCell(const float* __restrict rz_r, const float* __restrict rz_z,
             const float* __restrict x_n, const float* __restrict s_n,
             const float* __restrict b_hn, const float* __restrict prev,
             float* __restrict h, int64_t n) {
  // Four loops rather than one with branches inside, so each vectorizes.
  if (b_hn != nullptr && prev != nullptr) {
    for (int64_t j = 0; j < n; ++j) {
      const float r = FastSigmoid(rz_r[j]);
      const float z = FastSigmoid(rz_z[j]);
      const float c = FastTanh(x_n[j] + r * (s_n[j] + b_hn[j]));
      h[j] = c + z * (prev[j] - c);
    }
  } else if (b_hn != nullptr) {
    for (int64_t j = 0; j < n; ++j) {
      const float r = FastSigmoid(rz_r[j]);
      const float z = FastSigmoid(rz_z[j]);
      const float c = FastTanh(x_n[j] + r * (s_n[j] + b_hn[j]));
      h[j] = c + z * (0.0f - c);
    }
  } else if (prev != nullptr) {
    for (int64_t j = 0; j < n; ++j) {
      const float z = FastSigmoid(rz_z[j]);
      const float c = FastTanh(x_n[j] + s_n[j]);
      h[j] = c + z * (prev[j] - c);
    }
  } else {
    for (int64_t j = 0; j < n; ++j) {
      const float z = FastSigmoid(rz_z[j]);
      const float c = FastTanh(x_n[j] + s_n[j]);
      h[j] = c + z * (0.0f - c);
    }
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

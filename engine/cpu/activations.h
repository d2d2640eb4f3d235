// Elementwise functions for the CPU engine, written so the compiler
// vectorizes them. Accuracy: within a few float ulps of the C library for
// exp, so that results agree with PyTorch to well under 1e-6 absolute.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace rnnserve::engine::cpu {

// exp(x) by range reduction to [-ln2/2, ln2/2] and a degree-6 polynomial
// (the Cephes coefficients); saturates to +inf above 88.72 and to 0 below
// -87.33, where the float result underflows anyway.
inline float FastExp(float x) {
  const float xc = std::min(std::max(x, -87.33654f), 88.3762626647949f);
  float n = std::floor(xc * 1.44269504088896341f + 0.5f);
  float r = xc - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const float y = p * scale;
  return x > 88.7228f ? INFINITY : (x < -87.33654f ? 0.0f : y);
}

inline float FastSigmoid(float x) { return 1.0f / (1.0f + FastExp(-x)); }

// tanh through exp(-2|x|), which never overflows; for |x| below 2^-12 the
// identity tanh(x) = x is exact in float and avoids cancellation.
inline float FastTanh(float x) {
  float ax = std::fabs(x);
  float e = FastExp(-2.0f * ax);
  float t = (1.0f - e) / (1.0f + e);
  t = ax < 2.44140625e-4f ? ax : t;
  return std::copysign(t, x);
}

void Tanh(const float* x, float* y, int64_t n);
void Sigmoid(const float* x, float* y, int64_t n);
void Relu(const float* x, float* y, int64_t n);
void Elu(const float* x, float* y, int64_t n);
void Softplus(const float* x, float* y, int64_t n);
void Gelu(const float* x, float* y, int64_t n);

// The LSTM cell update for n units: gates i, f, g, o (pre-activation),
// c <- sigmoid(f) c + sigmoid(i) tanh(g), h <- sigmoid(o) tanh(c).
void LstmCell(const float* gi, const float* gf, const float* gg,
              const float* go, float* c, float* h, int64_t n);

// The GRU update for n units. rz_r and rz_z are the full r and z
// pre-activations; x_n is n's input projection (with its biases) and s_n
// n's recurrent product. With b_hn (the default form) the reset gate scales
// s_n + b_hn; with b_hn null (the original form) s_n already holds
// W_hn (r * h) and is added as it is. prev is the previous state (null:
// zeros).
void GruCell(const float* rz_r, const float* rz_z, const float* x_n,
             const float* s_n, const float* b_hn, const float* prev, float* h,
             int64_t n);

// Softmax over each of `rows` rows of `width` elements.
void Softmax(const float* x, float* y, int64_t rows, int64_t width);

}  // namespace rnnserve::engine::cpu

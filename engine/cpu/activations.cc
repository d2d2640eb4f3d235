#include "engine/cpu/activations.h"

#include <algorithm>
#include <cmath>

#if defined(__AVX512F__)
// GCC 12's AVX-512 intrinsics pass _mm512_undefined_ps() as the source of
// an all-ones mask, and once inlined here it warns that they may read an
// uninitialized value; no lane of that source is ever used.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#endif

namespace rnnserve::engine::cpu {

#if defined(__AVX512F__)
namespace {

// Sixteen lanes of FastExp: the same range reduction, polynomial and
// saturation, with the power of two applied by scalef. Each lane's result
// depends on that lane's input only, so the array functions below give an
// element the same value wherever it sits in an array.
inline __m512 Exp16(__m512 x) {
  const __m512 xc = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.33654f)),
                                  _mm512_set1_ps(88.3762626647949f));
  const __m512 n = _mm512_roundscale_ps(
      _mm512_fmadd_ps(xc, _mm512_set1_ps(1.44269504088896341f),
                      _mm512_set1_ps(0.5f)),
      _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xc);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r),
                    _mm512_set1_ps(1.0f));
  __m512 y = _mm512_scalef_ps(p, n);
  y = _mm512_mask_blend_ps(
      _mm512_cmp_ps_mask(x, _mm512_set1_ps(88.7228f), _CMP_GT_OQ), y,
      _mm512_set1_ps(INFINITY));
  return _mm512_maskz_mov_ps(
      _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.33654f), _CMP_NLT_UQ), y);
}

inline __m512 Sigmoid16(__m512 x) {
  const __m512 one = _mm512_set1_ps(1.0f);
  return _mm512_div_ps(
      one, _mm512_add_ps(one, Exp16(_mm512_sub_ps(_mm512_setzero_ps(), x))));
}

inline __m512 Tanh16(__m512 x) {
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 ax = _mm512_abs_ps(x);
  const __m512 e = Exp16(_mm512_mul_ps(_mm512_set1_ps(-2.0f), ax));
  __m512 t = _mm512_div_ps(_mm512_sub_ps(one, e), _mm512_add_ps(one, e));
  t = _mm512_mask_blend_ps(
      _mm512_cmp_ps_mask(ax, _mm512_set1_ps(2.44140625e-4f), _CMP_LT_OQ), t,
      ax);
  // copysign: t is never negative, so or-ing in x's sign bit is enough.
  const __m512i sign =
      _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(INT32_MIN));
  return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(t), sign));
}

// Runs body(offset, mask) over [0, n) in lanes of 16, the last masked.
template <typename Body>
inline void ForLanes(int64_t n, Body body) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) body(j, static_cast<__mmask16>(0xFFFF));
  if (j < n) body(j, static_cast<__mmask16>((1u << (n - j)) - 1));
}

}  // namespace

void Tanh(const float* x, float* y, int64_t n) {
  ForLanes(n, [&](int64_t j, __mmask16 m) {
    _mm512_mask_storeu_ps(y + j, m, Tanh16(_mm512_maskz_loadu_ps(m, x + j)));
  });
}

void Sigmoid(const float* x, float* y, int64_t n) {
  ForLanes(n, [&](int64_t j, __mmask16 m) {
    _mm512_mask_storeu_ps(y + j, m, Sigmoid16(_mm512_maskz_loadu_ps(m, x + j)));
  });
}

#else

void Tanh(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = FastTanh(x[i]);
}

void Sigmoid(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = FastSigmoid(x[i]);
}

#endif

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

#if defined(__AVX512F__)

void LstmCell(const float* __restrict gi, const float* __restrict gf,
              const float* __restrict gg, const float* __restrict go,
              float* __restrict c, float* __restrict h, int64_t n) {
  ForLanes(n, [&](int64_t j, __mmask16 m) {
    const __m512 i = Sigmoid16(_mm512_maskz_loadu_ps(m, gi + j));
    const __m512 f = Sigmoid16(_mm512_maskz_loadu_ps(m, gf + j));
    const __m512 g = Tanh16(_mm512_maskz_loadu_ps(m, gg + j));
    const __m512 o = Sigmoid16(_mm512_maskz_loadu_ps(m, go + j));
    const __m512 cj = _mm512_fmadd_ps(f, _mm512_maskz_loadu_ps(m, c + j),
                                      _mm512_mul_ps(i, g));
    _mm512_mask_storeu_ps(c + j, m, cj);
    _mm512_mask_storeu_ps(h + j, m, _mm512_mul_ps(o, Tanh16(cj)));
  });
}

void GruCell(const float* __restrict rz_r, const float* __restrict rz_z,
             const float* __restrict x_n, const float* __restrict s_n,
             const float* __restrict b_hn, const float* __restrict prev,
             float* __restrict h, int64_t n) {
  ForLanes(n, [&](int64_t j, __mmask16 m) {
    const __m512 z = Sigmoid16(_mm512_maskz_loadu_ps(m, rz_z + j));
    __m512 s = _mm512_maskz_loadu_ps(m, s_n + j);
    if (b_hn != nullptr) {
      const __m512 r = Sigmoid16(_mm512_maskz_loadu_ps(m, rz_r + j));
      s = _mm512_mul_ps(r,
                        _mm512_add_ps(s, _mm512_maskz_loadu_ps(m, b_hn + j)));
    }
    const __m512 c =
        Tanh16(_mm512_add_ps(_mm512_maskz_loadu_ps(m, x_n + j), s));
    const __m512 p = prev != nullptr ? _mm512_maskz_loadu_ps(m, prev + j)
                                     : _mm512_setzero_ps();
    // h = c + z (prev - c)
    _mm512_mask_storeu_ps(h + j, m, _mm512_fmadd_ps(z, _mm512_sub_ps(p, c), c));
  });
}

#else

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

#endif

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

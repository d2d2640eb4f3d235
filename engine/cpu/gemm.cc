#include "engine/cpu/gemm.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace rnnserve::engine::cpu {
namespace {

// Rows per micro-kernel call: 8 rows x 2 vectors = 16 accumulators, which
// leaves registers for the panel loads and the broadcasts.
constexpr int64_t kRows = 8;
// Rows per cache block: this many rows of A stay in L2 while every panel
// streams past them.
constexpr int64_t kBlockRows = 96;
// The most gates a recurrent cell has (the LSTM's four).
constexpr int64_t kMaxGates = 4;
// Below this many multiply-adds a product runs on the calling thread.
constexpr int64_t kParallelWork = 1 << 18;

#if defined(__AVX512F__)

// C rows [0, rows) x panel columns [0, cols) of one panel.
template <int kR>
void MicroKernel(int64_t k, const float* a, int64_t lda, const float* panel,
                 float* c, int64_t ldc, int64_t cols, bool accumulate,
                 const float* bias) {
  __m512 acc[kR][2];
  for (int r = 0; r < kR; ++r) {
    acc[r][0] = _mm512_setzero_ps();
    acc[r][1] = _mm512_setzero_ps();
  }
  for (int64_t p = 0; p < k; ++p) {
    const __m512 b0 = _mm512_load_ps(panel + p * kPanelWidth);
    const __m512 b1 = _mm512_load_ps(panel + p * kPanelWidth + 16);
    for (int r = 0; r < kR; ++r) {
      const __m512 av = _mm512_set1_ps(a[r * lda + p]);
      acc[r][0] = _mm512_fmadd_ps(av, b0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(av, b1, acc[r][1]);
    }
  }
  const __mmask16 m0 = cols >= 16 ? 0xFFFF : (1u << cols) - 1;
  const __mmask16 m1 =
      cols >= 32 ? 0xFFFF : (cols <= 16 ? 0 : (1u << (cols - 16)) - 1);
  const __m512 bias0 =
      bias ? _mm512_maskz_loadu_ps(m0, bias) : _mm512_setzero_ps();
  const __m512 bias1 =
      bias ? _mm512_maskz_loadu_ps(m1, bias + 16) : _mm512_setzero_ps();
  for (int r = 0; r < kR; ++r) {
    float* row = c + r * ldc;
    __m512 v0 = acc[r][0], v1 = acc[r][1];
    if (accumulate) {
      v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, row));
      v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, row + 16));
    }
    if (bias) {
      v0 = _mm512_add_ps(v0, bias0);
      v1 = _mm512_add_ps(v1, bias1);
    }
    _mm512_mask_storeu_ps(row, m0, v0);
    _mm512_mask_storeu_ps(row + 16, m1, v1);
  }
}

#else

// Portable form with the same arithmetic: one fused multiply-add chain per
// element, so results match the vector kernel bit for bit.
template <int kR>
void MicroKernel(int64_t k, const float* a, int64_t lda, const float* panel,
                 float* c, int64_t ldc, int64_t cols, bool accumulate,
                 const float* bias) {
  float acc[kR][kPanelWidth] = {};
  for (int64_t p = 0; p < k; ++p) {
    const float* b = panel + p * kPanelWidth;
    for (int r = 0; r < kR; ++r) {
      const float av = a[r * lda + p];
      for (int j = 0; j < kPanelWidth; ++j) {
        acc[r][j] = std::fma(av, b[j], acc[r][j]);
      }
    }
  }
  for (int r = 0; r < kR; ++r) {
    for (int64_t j = 0; j < cols; ++j) {
      float v = accumulate ? acc[r][j] + c[r * ldc + j] : acc[r][j];
      if (bias) v += bias[j];
      c[r * ldc + j] = v;
    }
  }
}

#endif

using Kernel = void (*)(int64_t, const float*, int64_t, const float*, float*,
                        int64_t, int64_t, bool, const float*);
constexpr Kernel kKernels[kRows + 1] = {
    nullptr,        MicroKernel<1>, MicroKernel<2>,
    MicroKernel<3>, MicroKernel<4>, MicroKernel<5>,
    MicroKernel<6>, MicroKernel<7>, MicroKernel<8>};

// One tile: rows [row0, row1) against panel p.
void Tile(int64_t row0, int64_t row1, int64_t p, const float* a, int64_t lda,
          const PackedWeights& w, float* c, int64_t ldc, bool accumulate,
          const float* bias) {
  const int64_t col0 = p * kPanelWidth;
  const int64_t cols = std::min(kPanelWidth, w.n() - col0);
  for (int64_t r = row0; r < row1; r += kRows) {
    const int64_t rows = std::min(kRows, row1 - r);
    kKernels[rows](w.k(), a + r * lda, lda, w.panel(p), c + r * ldc + col0, ldc,
                   cols, accumulate, bias ? bias + col0 : nullptr);
  }
}

// Rows per block for an m-row product. Blocks handed to different threads
// should carry equal work: 96-row blocks cut 128 rows into 96 and 32, and
// the thread with 32 waited for the other. So the rows are split into the
// fewest blocks of at most kBlockRows, or one more if that leaves less of
// the last block empty (256 rows: 4 x 64 rather than 88 + 88 + 80), each a
// whole number of kernel calls.
int64_t BlockRows(int64_t m) {
  auto rows_for = [m](int64_t blocks) {
    const int64_t rows = (m + blocks - 1) / blocks;
    return (rows + kRows - 1) / kRows * kRows;
  };
  auto empty = [m](int64_t rows) { return (m + rows - 1) / rows * rows - m; };
  const int64_t fewest = (m + kBlockRows - 1) / kBlockRows;
  const int64_t a = rows_for(fewest), b = rows_for(fewest + 1);
  return empty(b) < empty(a) ? b : a;
}

}  // namespace

PackedWeights PackedWeights::Pack(const float* w, int64_t n, int64_t k) {
  PackedWeights packed;
  packed.n_ = n;
  packed.k_ = k;
  packed.data_.Resize(packed.panels() * k * kPanelWidth);
  packed.data_.Zero();
  for (int64_t j = 0; j < n; ++j) {
    float* dst = packed.data_.data() + (j / kPanelWidth) * k * kPanelWidth +
                 j % kPanelWidth;
    for (int64_t p = 0; p < k; ++p) dst[p * kPanelWidth] = w[j * k + p];
  }
  return packed;
}

void Gemm(int64_t m, const float* a, int64_t lda, const PackedWeights& w,
          float* c, int64_t ldc, bool accumulate, const float* bias) {
  if (m == 0 || w.n() == 0) return;
  if (w.k() == 0) {
    for (int64_t r = 0; r < m; ++r) {
      for (int64_t j = 0; j < w.n(); ++j) {
        float& v = c[r * ldc + j];
        v = (accumulate ? v : 0.0f) + (bias ? bias[j] : 0.0f);
      }
    }
    return;
  }
  // Tiles are (row block, panel) pairs, row block major, so that a small m
  // spreads its panels over the threads and a large m gives each thread its
  // own row blocks. Each output element belongs to exactly one tile, so the
  // split never changes a result.
  const int64_t block_rows = BlockRows(m);
  const int64_t blocks = (m + block_rows - 1) / block_rows;
  const int64_t panels = w.panels();
  const int64_t tiles = blocks * panels;
  const bool parallel = m * w.n() * w.k() >= kParallelWork;
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t block = t / panels;
    const int64_t row0 = block * block_rows;
    const int64_t row1 = std::min(m, row0 + block_rows);
    Tile(row0, row1, t % panels, a, lda, w, c, ldc, accumulate, bias);
  }
}

void GatedGemm(int64_t m, const float* a, int64_t lda, const PackedWeights& w,
               int64_t gates, float* c, int64_t ldc, bool accumulate,
               TileEpilogue epilogue) {
  if (m == 0) return;
  const int64_t units = w.n() / gates;
  const bool parallel = m * w.n() * w.k() >= kParallelWork;
  if (units % kPanelWidth != 0 || w.k() == 0 || gates > kMaxGates) {
    // Gate blocks do not start on panel boundaries (or are more than a tile
    // handles): multiply first, then run the epilogue over blocks of rows.
    Gemm(m, a, lda, w, c, ldc, accumulate);
    const int64_t blocks = (m + kRows - 1) / kRows;
#pragma omp parallel for schedule(static) if (parallel)
    for (int64_t b = 0; b < blocks; ++b) {
      epilogue(b * kRows, std::min(m, (b + 1) * kRows), 0, units);
    }
    return;
  }
  StepGate outputs[kMaxGates];
  for (int64_t q = 0; q < gates; ++q) {
    outputs[q] = {nullptr, 0, c + q * units, ldc, accumulate};
  }
  StepGemm(m, nullptr, 0, w, nullptr, a, lda, w,
           absl::MakeConstSpan(outputs, gates), epilogue);
}

void StepGemm(int64_t m, const float* x, int64_t ldx, const PackedWeights& wx,
              const float* bias, const float* h, int64_t ldh,
              const PackedWeights& wh, absl::Span<const StepGate> gates,
              TileEpilogue epilogue) {
  if (m == 0) return;
  const int64_t count = static_cast<int64_t>(gates.size());
  const int64_t units = wh.n() / count;
  // Gate q of unit group u is panel q * groups + u, in both matrices.
  const int64_t groups = units / kPanelWidth;
  const int64_t block_rows = BlockRows(m);
  const int64_t blocks = (m + block_rows - 1) / block_rows;
  const int64_t tiles = blocks * groups;
  const int64_t work = m * wh.n() * ((x ? wx.k() : 0) + (h ? wh.k() : 0));
#pragma omp parallel for schedule(static) if (work >= kParallelWork)
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t row0 = (t / groups) * block_rows;
    const int64_t row1 = std::min(m, row0 + block_rows);
    const int64_t u = t % groups;
    const int64_t col = u * kPanelWidth;
    for (int64_t q = 0; q < count; ++q) {
      const StepGate& gate = gates[q];
      const int64_t p = q * groups + u;
      for (int64_t r = row0; r < row1; r += kRows) {
        const int64_t rows = std::min(kRows, row1 - r);
        if (x != nullptr) {
          kKernels[rows](wx.k(), x + r * ldx, ldx, wx.panel(p),
                         gate.x_out + r * gate.x_ld + col, gate.x_ld,
                         kPanelWidth, false, bias + p * kPanelWidth);
        }
        if (h != nullptr) {
          kKernels[rows](wh.k(), h + r * ldh, ldh, wh.panel(p),
                         gate.h_out + r * gate.h_ld + col, gate.h_ld,
                         kPanelWidth, gate.h_accumulate, nullptr);
        }
      }
    }
    epilogue(row0, row1, col, col + kPanelWidth);
  }
}

}  // namespace rnnserve::engine::cpu

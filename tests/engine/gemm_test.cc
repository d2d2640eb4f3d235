#include "engine/cpu/gemm.h"

#include <omp.h>

#include <atomic>
#include <cmath>
#include <random>
#include <vector>

#include "gtest/gtest.h"

namespace rnnserve::engine::cpu {
namespace {

std::vector<float> Random(int64_t n, std::mt19937* rng) {
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  std::vector<float> v(n);
  for (float& x : v) x = dist(*rng);
  return v;
}

TEST(Gemm, MatchesADoublePrecisionProductAtEveryRemainder) {
  std::mt19937 rng(3);
  for (int64_t m : {1, 2, 7, 8, 9, 17, 100, 193, 256}) {
    for (int64_t n : {1, 16, 31, 32, 33, 100}) {
      for (int64_t k : {1, 7, 64}) {
        const std::vector<float> a = Random(m * k, &rng);
        const std::vector<float> w = Random(n * k, &rng);
        const std::vector<float> c0 = Random(m * n, &rng);
        const PackedWeights packed = PackedWeights::Pack(w.data(), n, k);
        for (bool accumulate : {false, true}) {
          std::vector<float> c = c0;
          Gemm(m, a.data(), k, packed, c.data(), n, accumulate);
          for (int64_t i = 0; i < m; ++i) {
            for (int64_t j = 0; j < n; ++j) {
              double want = accumulate ? c0[i * n + j] : 0.0;
              for (int64_t p = 0; p < k; ++p) {
                want += double{a[i * k + p]} * w[j * k + p];
              }
              ASSERT_NEAR(c[i * n + j], want, 1e-5 * (k + 1))
                  << m << "x" << n << "x" << k << " at " << i << "," << j;
            }
          }
        }
      }
    }
  }
}

TEST(Gemm, LeavesColumnsPastNUntouched) {
  std::mt19937 rng(4);
  const int64_t m = 3, n = 5, k = 4, ldc = 40;
  const std::vector<float> a = Random(m * k, &rng);
  const std::vector<float> w = Random(n * k, &rng);
  std::vector<float> c(m * ldc, 7.0f);
  Gemm(m, a.data(), k, PackedWeights::Pack(w.data(), n, k), c.data(), ldc,
       false);
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = n; j < ldc; ++j) ASSERT_EQ(c[i * ldc + j], 7.0f);
  }
}

// The property the engine's batch invariance rests on: a row's result does
// not depend on how many rows are multiplied with it, where it sits, or how
// many threads share the work.
TEST(Gemm, EachRowIsBitIdenticalWhateverTheBatchAndThreads) {
  std::mt19937 rng(5);
  const int64_t m = 203, n = 300, k = 257;
  const std::vector<float> a = Random(m * k, &rng);
  const std::vector<float> w = Random(n * k, &rng);
  const PackedWeights packed = PackedWeights::Pack(w.data(), n, k);
  std::vector<float> all(m * n);
  Gemm(m, a.data(), k, packed, all.data(), n, false);

  const int threads = omp_get_max_threads();
  omp_set_num_threads(1);
  std::vector<float> serial(m * n);
  Gemm(m, a.data(), k, packed, serial.data(), n, false);
  omp_set_num_threads(threads);
  EXPECT_EQ(serial, all);

  for (int64_t i : {0L, 1L, 7L, 8L, 100L, 202L}) {
    std::vector<float> one(n);
    Gemm(1, a.data() + i * k, k, packed, one.data(), n, false);
    for (int64_t j = 0; j < n; ++j) {
      ASSERT_EQ(one[j], all[i * n + j]) << "row " << i << " column " << j;
    }
  }
}

// GatedGemm must compute what Gemm computes and hand every (row, unit) to
// the epilogue once, after all of that unit's gates are final; both for
// unit counts that fill whole panels (the tiled path) and ones that do not.
TEST(GatedGemm, EpilogueSeesEveryFinishedUnitOnceAndResultsEqualGemm) {
  std::mt19937 rng(6);
  for (int64_t units : {64L, 96L, 7L, 40L}) {
    for (int64_t m : {1L, 13L, 97L, 200L, 256L}) {
      const int64_t gates = 4, n = gates * units, k = 48;
      const std::vector<float> a = Random(m * k, &rng);
      const std::vector<float> w = Random(n * k, &rng);
      const std::vector<float> c0 = Random(m * n, &rng);
      const PackedWeights packed = PackedWeights::Pack(w.data(), n, k);
      std::vector<float> want = c0;
      Gemm(m, a.data(), k, packed, want.data(), n, true);

      std::vector<float> got = c0;
      std::vector<int> seen(m * units, 0);
      std::atomic<int> unfinished{0};
      GatedGemm(m, a.data(), k, packed, gates, got.data(), n, true,
                [&](int64_t r0, int64_t r1, int64_t u0, int64_t u1) {
                  for (int64_t r = r0; r < r1; ++r) {
                    for (int64_t u = u0; u < u1; ++u) {
                      ++seen[r * units + u];
                      for (int64_t q = 0; q < gates; ++q) {
                        const int64_t col = q * units + u;
                        if (got[r * n + col] != want[r * n + col]) ++unfinished;
                      }
                    }
                  }
                });
      EXPECT_EQ(unfinished, 0) << "units " << units << " m " << m;
      EXPECT_EQ(got, want) << "units " << units << " m " << m;
      for (int s : seen) ASSERT_EQ(s, 1) << "units " << units << " m " << m;
    }
  }
}

// StepGemm fuses the input projection into a recurrent step; it must give
// the bits of the two-stage form (Gemm with bias over the inputs, then
// GatedGemm adding the recurrent product) that the engine also uses.
TEST(StepGemm, EqualsProjectionThenRecurrentProductBitForBit) {
  std::mt19937 rng(8);
  const int64_t gates = 4, units = 64, n = gates * units, in = 40, h = 64;
  for (int64_t m : {1L, 9L, 100L, 256L}) {
    const std::vector<float> x = Random(m * in, &rng);
    const std::vector<float> state = Random(m * h, &rng);
    const std::vector<float> wx = Random(n * in, &rng);
    const std::vector<float> wh = Random(n * h, &rng);
    const std::vector<float> bias = Random(n, &rng);
    const PackedWeights px = PackedWeights::Pack(wx.data(), n, in);
    const PackedWeights ph = PackedWeights::Pack(wh.data(), n, h);

    std::vector<float> want(m * n);
    Gemm(m, x.data(), in, px, want.data(), n, false, bias.data());
    GatedGemm(m, state.data(), h, ph, gates, want.data(), n, true,
              [](int64_t, int64_t, int64_t, int64_t) {});

    std::vector<float> got(m * n, -1.0f);
    std::vector<StepGate> outputs;
    for (int64_t q = 0; q < gates; ++q) {
      outputs.push_back(
          {got.data() + q * units, n, got.data() + q * units, n, true});
    }
    std::vector<int> seen(m * units, 0);
    StepGemm(m, x.data(), in, px, bias.data(), state.data(), h, ph, outputs,
             [&](int64_t r0, int64_t r1, int64_t u0, int64_t u1) {
               for (int64_t r = r0; r < r1; ++r) {
                 for (int64_t u = u0; u < u1; ++u) ++seen[r * units + u];
               }
             });
    EXPECT_EQ(got, want) << "m " << m;
    for (int s : seen) ASSERT_EQ(s, 1) << "m " << m;
  }
}

}  // namespace
}  // namespace rnnserve::engine::cpu

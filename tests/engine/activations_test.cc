#include "engine/cpu/activations.h"

#include <cmath>
#include <random>
#include <vector>

#include "gtest/gtest.h"

namespace rnnserve::engine::cpu {
namespace {

std::vector<float> Grid(float lo, float hi, int n) {
  std::vector<float> x(n);
  for (int i = 0; i < n; ++i) x[i] = lo + (hi - lo) * i / (n - 1);
  return x;
}

TEST(FastExp, WithinTwoUlpsOfTheCLibraryOverTheNormalRange) {
  for (float x : Grid(-87.0f, 88.0f, 200001)) {
    const double want = std::exp(double{x});
    const double got = FastExp(x);
    ASSERT_LE(std::fabs(got - want) / want, 2.5e-7) << "x = " << x;
  }
}

TEST(FastExp, SaturatesAtTheEndsOfTheFloatRange) {
  EXPECT_EQ(FastExp(-100.0f), 0.0f);
  EXPECT_EQ(FastExp(100.0f), INFINITY);
  EXPECT_EQ(FastExp(0.0f), 1.0f);
}

TEST(FastTanh, AgreesWithTheCLibraryTo1e7Absolute) {
  std::vector<float> x = Grid(-20.0f, 20.0f, 400001);
  x.push_back(1e-30f);
  x.push_back(-3e-5f);
  std::vector<float> y(x.size());
  Tanh(x.data(), y.data(), x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    ASSERT_NEAR(y[i], std::tanh(double{x[i]}), 1e-7) << "x = " << x[i];
  }
}

TEST(FastSigmoid, AgreesWithTheCLibraryTo1e7Absolute) {
  std::vector<float> x = Grid(-100.0f, 100.0f, 400001);
  std::vector<float> y(x.size());
  Sigmoid(x.data(), y.data(), x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    ASSERT_NEAR(y[i], 1.0 / (1.0 + std::exp(-double{x[i]})), 1e-7)
        << "x = " << x[i];
  }
}

double Sig(double x) { return 1.0 / (1.0 + std::exp(-x)); }

std::vector<float> Random(int n, float scale, std::mt19937* rng) {
  std::uniform_real_distribution<float> u(-scale, scale);
  std::vector<float> v(n);
  for (float& x : v) x = u(*rng);
  return v;
}

// Lengths around the 16-lane vectors, so that full and partial lanes are
// both checked.
constexpr int kLengths[] = {1, 7, 15, 16, 17, 32, 33, 100};

TEST(GruCell, MatchesTheFormulaInBothFormsForEveryLength) {
  std::mt19937 rng(3);
  for (int n : kLengths) {
    for (bool reset_after : {true, false}) {
      for (bool has_prev : {true, false}) {
        SCOPED_TRACE(testing::Message() << "n " << n << " reset_after "
                                        << reset_after << " prev " << has_prev);
        const auto r = Random(n, 6, &rng), z = Random(n, 6, &rng),
                   xn = Random(n, 3, &rng), sn = Random(n, 3, &rng),
                   bhn = Random(n, 1, &rng), prev = Random(n, 1, &rng);
        std::vector<float> h(n + 1, 42.0f);
        GruCell(r.data(), z.data(), xn.data(), sn.data(),
                reset_after ? bhn.data() : nullptr,
                has_prev ? prev.data() : nullptr, h.data(), n);
        for (int j = 0; j < n; ++j) {
          const double s =
              reset_after ? Sig(r[j]) * (double{sn[j]} + bhn[j]) : sn[j];
          const double c = std::tanh(xn[j] + s);
          const double p = has_prev ? prev[j] : 0.0;
          ASSERT_NEAR(h[j], c + Sig(z[j]) * (p - c), 3e-7) << "unit " << j;
        }
        EXPECT_EQ(h[n], 42.0f) << "wrote past the end";
      }
    }
  }
}

TEST(LstmCell, MatchesTheFormulaForEveryLength) {
  std::mt19937 rng(4);
  for (int n : kLengths) {
    SCOPED_TRACE(testing::Message() << "n " << n);
    const auto i = Random(n, 6, &rng), f = Random(n, 6, &rng),
               g = Random(n, 3, &rng), o = Random(n, 6, &rng),
               c0 = Random(n, 2, &rng);
    std::vector<float> c = c0;
    std::vector<float> h(n + 1, 42.0f);
    c.push_back(42.0f);
    LstmCell(i.data(), f.data(), g.data(), o.data(), c.data(), h.data(), n);
    for (int j = 0; j < n; ++j) {
      const double cj = Sig(f[j]) * c0[j] + Sig(i[j]) * std::tanh(double{g[j]});
      ASSERT_NEAR(c[j], cj, 3e-7) << "unit " << j;
      ASSERT_NEAR(h[j], Sig(o[j]) * std::tanh(cj), 3e-7) << "unit " << j;
    }
    EXPECT_EQ(h[n], 42.0f) << "wrote past the end";
    EXPECT_EQ(c[n], 42.0f) << "wrote past the end";
  }
}

// A unit's result depends on that unit's inputs only, not on where it sits
// among the vector lanes: results are the same computed one unit at a time.
TEST(GruCell, EachUnitIsIndependentOfItsPosition) {
  std::mt19937 rng(5);
  const int n = 37;
  const auto r = Random(n, 6, &rng), z = Random(n, 6, &rng),
             xn = Random(n, 3, &rng), sn = Random(n, 3, &rng),
             bhn = Random(n, 1, &rng), prev = Random(n, 1, &rng);
  std::vector<float> all(n);
  GruCell(r.data(), z.data(), xn.data(), sn.data(), bhn.data(), prev.data(),
          all.data(), n);
  for (int j = 0; j < n; ++j) {
    float one;
    GruCell(&r[j], &z[j], &xn[j], &sn[j], &bhn[j], &prev[j], &one, 1);
    ASSERT_EQ(one, all[j]) << "unit " << j;
  }
}

TEST(Softmax, RowsSumToOneAndSurviveLargeInputs) {
  std::vector<float> x = {1000.0f, 1001.0f, 999.0f, -5.0f, 0.0f, 5.0f};
  std::vector<float> y(6);
  Softmax(x.data(), y.data(), 2, 3);
  for (int r = 0; r < 2; ++r) {
    double sum = 0;
    for (int i = 0; i < 3; ++i) sum += y[r * 3 + i];
    EXPECT_NEAR(sum, 1.0, 1e-6);
  }
  EXPECT_NEAR(y[1], std::exp(1.0) / (1 + std::exp(1.0) + std::exp(-1.0)), 1e-6);
}

}  // namespace
}  // namespace rnnserve::engine::cpu

#include "engine/cpu/activations.h"

#include <cmath>
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

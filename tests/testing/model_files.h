// Writes model version folders for tests: a net description and its arrays.
#pragma once

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "engine/model.h"
#include "engine/safetensors.h"
#include "gtest/gtest.h"

namespace rnnserve::testing_util {

struct Array {
  std::string name;
  std::vector<int64_t> shape;
  std::vector<float> values;
};

// An array of uniform random values in [-scale, scale].
inline Array RandomArray(const std::string& name, std::vector<int64_t> shape,
                         std::mt19937* rng, float scale = 0.5f) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  std::uniform_real_distribution<float> dist(-scale, scale);
  Array a{name, std::move(shape), std::vector<float>(n)};
  for (float& v : a.values) v = dist(*rng);
  return a;
}

// Random weight_ih, weight_hh, bias_ih and bias_hh for recurrent layer
// `name` with `gates` gates, input width `in` and state size `h`.
inline std::vector<Array> RandomRecurrentArrays(const std::string& name,
                                                int64_t gates, int64_t in,
                                                int64_t h, std::mt19937* rng) {
  return {RandomArray(name + ".weight_ih", {gates * h, in}, rng),
          RandomArray(name + ".weight_hh", {gates * h, h}, rng),
          RandomArray(name + ".bias_ih", {gates * h}, rng),
          RandomArray(name + ".bias_hh", {gates * h}, rng)};
}

inline void WriteText(const std::string& path, const std::string& text) {
  std::filesystem::create_directories(
      std::filesystem::path(path).parent_path());
  std::ofstream(path) << text;
}

// Writes `dir`/net.pbtxt and `dir`/weights.safetensors.
inline void WriteVersion(const std::string& dir, const std::string& net_pbtxt,
                         const std::vector<Array>& arrays) {
  WriteText(dir + "/net.pbtxt", net_pbtxt);
  std::vector<engine::TensorToWrite> tensors;
  for (const Array& a : arrays) {
    tensors.push_back(
        {a.name, engine::DType::kF32, a.shape,
         std::string(reinterpret_cast<const char*>(a.values.data()),
                     a.values.size() * sizeof(float))});
  }
  ASSERT_TRUE(
      engine::WriteSafetensors(dir + "/weights.safetensors", tensors).ok());
}

// A fresh, empty folder under the test temp dir.
inline std::string FreshDir(const std::string& name) {
  const std::string dir = ::testing::TempDir() + "/" + name;
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir;
}

// Writes a version folder named `name` under the test temp dir and loads it.
inline absl::StatusOr<std::unique_ptr<engine::Model>> LoadModelWith(
    const std::string& name, const std::string& net_pbtxt,
    const std::vector<Array>& arrays) {
  const std::string dir = FreshDir(name);
  WriteVersion(dir, net_pbtxt, arrays);
  return engine::Model::Load(dir);
}

}  // namespace rnnserve::testing_util

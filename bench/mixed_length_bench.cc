// mixed_length_bench: what packing buys on a batch of mixed lengths.
//
// A bidirectional 2-layer LSTM (state 256 per direction, input width 256,
// outputs of the two directions joined end to end) over a batch of 32
// sequences with lengths uniform in 10..200:
//   - the engine runs the packed batch: no element past a sequence's end is
//     ever computed;
//   - oneDNN's lstm_forward primitive has no per-sequence lengths, so the
//     batch is padded to the longest sequence. Its forward direction is
//     then exact on the real positions; the backward direction would start
//     in the padding, so each sequence is reversed within its own length
//     before the backward primitive and its output reversed back (the copies
//     are timed too, and reported apart). The results on real positions are
//     then the same as the engine's, which the benchmark checks.
// Same thread count for both sides. PyTorch's packed nn.LSTM is printed
// beside them when Debian's python3 with torch is present.
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <unordered_map>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engine/model.h"
#include "engine/safetensors.h"
#include "oneapi/dnnl/dnnl.hpp"

ABSL_FLAG(int, threads, 0, "Threads for both sides; 0 means all cores.");
ABSL_FLAG(int, reps, 11, "Timed runs per side; the median is reported.");
ABSL_FLAG(int, batch, 32, "Sequences per batch.");
ABSL_FLAG(int, min_length, 10, "Shortest sequence.");
ABSL_FLAG(int, max_length, 200, "Longest sequence.");
ABSL_FLAG(std::string, python, "/usr/bin/python3",
          "Python with torch for the PyTorch column; empty skips it.");
ABSL_FLAG(std::string, torch_script, RNNSERVE_BENCH_MIXED_TORCH_SCRIPT,
          "The PyTorch side's script.");

namespace rnnserve::bench {
namespace {

constexpr int64_t kHidden = 256;
constexpr int64_t kInput = 256;
constexpr int64_t kLayers = 2;

using Clock = std::chrono::steady_clock;

template <typename Fn>
double MedianMs(Fn&& fn, int reps) {
  fn();  // warm-up: workspaces, weight layouts, caches
  fn();
  std::vector<double> ms;
  for (int i = 0; i < reps; ++i) {
    const auto start = Clock::now();
    fn();
    ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - start)
                     .count());
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

std::vector<float> Random(int64_t n, float scale, std::mt19937* rng) {
  std::uniform_real_distribution<float> dist(-scale, scale);
  std::vector<float> v(n);
  for (float& x : v) x = dist(*rng);
  return v;
}

// One direction of one layer, in PyTorch's layout (gates i, f, g, o).
struct Direction {
  int64_t in = 0;
  std::vector<float> weight_ih, weight_hh, bias_ih, bias_hh;
};

Direction RandomDirection(int64_t in, std::mt19937* rng) {
  const float scale = 1.0f / std::sqrt(static_cast<float>(kHidden));
  return {in, Random(4 * kHidden * in, scale, rng),
          Random(4 * kHidden * kHidden, scale, rng),
          Random(4 * kHidden, scale, rng), Random(4 * kHidden, scale, rng)};
}

// ---------------------------------------------------------------------------
// The engine: two NetBidirectionalOperator layers over one packed batch.

std::string Bytes(const std::vector<float>& v) {
  return std::string(reinterpret_cast<const char*>(v.data()),
                     v.size() * sizeof(float));
}

absl::StatusOr<std::unique_ptr<engine::Model>> BuildEngineModel(
    const std::vector<std::vector<Direction>>& layers, const std::string& dir) {
  std::filesystem::create_directories(dir);
  std::string net = absl::StrFormat(
      "inputs { name: \"x\" kind: VECTOR_SEQUENCE width: %d }\n", kInput);
  std::vector<engine::TensorToWrite> arrays;
  for (size_t l = 0; l < layers.size(); ++l) {
    const std::string name = absl::StrCat("bi", l);
    absl::StrAppendFormat(
        &net,
        "layers { name: \"%s\" type: \"NetBidirectionalOperator\"\n"
        "  net { inputs { name: \"x\" }\n"
        "        layers { name: \"lstm\" type: \"LongShortTermMemoryLayer\" "
        "size: %d } } }\n",
        name, kHidden);
    const char* parts[] = {"forward", "backward"};
    for (int d = 0; d < 2; ++d) {
      const Direction& w = layers[l][d];
      const std::string prefix = absl::StrCat(name, ".", parts[d], ".lstm.");
      arrays.push_back({prefix + "weight_ih",
                        engine::DType::kF32,
                        {4 * kHidden, w.in},
                        Bytes(w.weight_ih)});
      arrays.push_back({prefix + "weight_hh",
                        engine::DType::kF32,
                        {4 * kHidden, kHidden},
                        Bytes(w.weight_hh)});
      arrays.push_back({prefix + "bias_ih",
                        engine::DType::kF32,
                        {4 * kHidden},
                        Bytes(w.bias_ih)});
      arrays.push_back({prefix + "bias_hh",
                        engine::DType::kF32,
                        {4 * kHidden},
                        Bytes(w.bias_hh)});
    }
  }
  std::ofstream(dir + "/net.pbtxt") << net;
  absl::Status written =
      engine::WriteSafetensors(dir + "/weights.safetensors", arrays);
  if (!written.ok()) return written;
  return engine::Model::Load(dir);
}

// ---------------------------------------------------------------------------
// oneDNN: one unidirectional primitive per layer and direction, padded.

class OnednnDirection {
 public:
  OnednnDirection(const Direction& w, int64_t steps, int64_t batch,
                  const dnnl::engine& eng, dnnl::stream* stream) {
    using dt = dnnl::memory::data_type;
    using tag = dnnl::memory::format_tag;
    const dnnl::memory::desc src_md({steps, batch, w.in}, dt::f32, tag::tnc);
    const dnnl::memory::desc dst_md({steps, batch, kHidden}, dt::f32, tag::tnc);
    const dnnl::memory::desc bias_md({1, 1, 4, kHidden}, dt::f32, tag::ldgo);
    const dnnl::memory::dims layer_dims = {1, 1, w.in, 4, kHidden};
    const dnnl::memory::dims iter_dims = {1, 1, kHidden, 4, kHidden};
    const dnnl::memory::desc none;
    const dnnl::lstm_forward::desc desc(
        dnnl::prop_kind::forward_inference,
        dnnl::rnn_direction::unidirectional_left2right, src_md, none, none,
        dnnl::memory::desc(layer_dims, dt::f32, tag::any),
        dnnl::memory::desc(iter_dims, dt::f32, tag::any), bias_md, dst_md, none,
        none);
    const dnnl::lstm_forward::primitive_desc pd(desc, eng);
    primitive_ = dnnl::lstm_forward(pd);

    // oneDNN's LSTM gate order is PyTorch's; ldigo is W transposed.
    auto ldigo = [](const std::vector<float>& m, int64_t in) {
      std::vector<float> out(m.size());
      for (int64_t r = 0; r < 4 * kHidden; ++r) {
        for (int64_t i = 0; i < in; ++i)
          out[i * 4 * kHidden + r] = m[r * in + i];
      }
      return out;
    };
    std::vector<float> bias(4 * kHidden);
    for (int64_t i = 0; i < 4 * kHidden; ++i)
      bias[i] = w.bias_ih[i] + w.bias_hh[i];
    src_ = dnnl::memory(src_md, eng);
    dst_ = dnnl::memory(dst_md, eng);
    args_ = {{DNNL_ARG_SRC_LAYER, src_},
             {DNNL_ARG_WEIGHTS_LAYER,
              Reordered(Plain(layer_dims, ldigo(w.weight_ih, w.in), eng),
                        pd.weights_layer_desc(), eng, stream)},
             {DNNL_ARG_WEIGHTS_ITER,
              Reordered(Plain(iter_dims, ldigo(w.weight_hh, kHidden), eng),
                        pd.weights_iter_desc(), eng, stream)},
             {DNNL_ARG_BIAS, Filled(bias_md, bias, eng)},
             {DNNL_ARG_DST_LAYER, dst_}};
  }

  float* src() { return static_cast<float*>(src_.get_data_handle()); }
  const float* dst() const {
    return static_cast<const float*>(dst_.get_data_handle());
  }
  void Run(dnnl::stream* stream) {
    primitive_.execute(*stream, args_);
    stream->wait();
  }

 private:
  static dnnl::memory Filled(const dnnl::memory::desc& md,
                             const std::vector<float>& v,
                             const dnnl::engine& eng) {
    dnnl::memory m(md, eng);
    std::memcpy(m.get_data_handle(), v.data(), v.size() * sizeof(float));
    return m;
  }
  static dnnl::memory Plain(const dnnl::memory::dims& dims,
                            const std::vector<float>& v,
                            const dnnl::engine& eng) {
    return Filled(dnnl::memory::desc(dims, dnnl::memory::data_type::f32,
                                     dnnl::memory::format_tag::ldigo),
                  v, eng);
  }
  static dnnl::memory Reordered(dnnl::memory user,
                                const dnnl::memory::desc& wanted,
                                const dnnl::engine& eng, dnnl::stream* stream) {
    if (user.get_desc() == wanted) return user;
    dnnl::memory out(wanted, eng);
    dnnl::reorder(user, out).execute(*stream, user, out);
    stream->wait();
    return out;
  }

  dnnl::primitive primitive_;
  dnnl::memory src_, dst_;
  std::unordered_map<int, dnnl::memory> args_;
};

// The padded bidirectional stack. Run() leaves the last layer's output in
// output(): [T, B, 2H], exact on real positions, zero on padding.
class OnednnStack {
 public:
  OnednnStack(const std::vector<std::vector<Direction>>& layers,
              const std::vector<int64_t>& lengths, int64_t steps,
              const dnnl::engine& eng)
      : stream_(eng), lengths_(lengths), steps_(steps) {
    const int64_t batch = lengths.size();
    for (const auto& layer : layers) {
      forward_.emplace_back(layer[0], steps, batch, eng, &stream_);
      backward_.emplace_back(layer[1], steps, batch, eng, &stream_);
    }
    output_.assign(steps * batch * 2 * kHidden, 0.0f);
  }

  // `x` is [T, B, kInput], zero past each length.
  void Run(const std::vector<float>& x, double* copy_ms) {
    const int64_t batch = lengths_.size();
    const float* in = x.data();
    int64_t width = kInput;
    *copy_ms = 0;
    for (size_t l = 0; l < forward_.size(); ++l) {
      auto start = Clock::now();
      std::memcpy(forward_[l].src(), in, steps_ * batch * width * 4);
      ReverseInto(in, width, backward_[l].src());
      *copy_ms += Ms(start);

      forward_[l].Run(&stream_);
      backward_[l].Run(&stream_);

      start = Clock::now();
      Join(forward_[l].dst(), backward_[l].dst());
      *copy_ms += Ms(start);
      in = output_.data();
      width = 2 * kHidden;
    }
  }

  const std::vector<float>& output() const { return output_; }

 private:
  static double Ms(Clock::time_point start) {
    return std::chrono::duration<double, std::milli>(Clock::now() - start)
        .count();
  }

  // Element t of sequence b goes to position len - 1 - t; padding stays 0.
  void ReverseInto(const float* in, int64_t width, float* out) const {
    const int64_t batch = lengths_.size();
    std::memset(out, 0, steps_ * batch * width * 4);
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t t = 0; t < lengths_[b]; ++t) {
        std::memcpy(out + ((lengths_[b] - 1 - t) * batch + b) * width,
                    in + (t * batch + b) * width, width * 4);
      }
    }
  }

  void Join(const float* fw, const float* bw_reversed) {
    const int64_t batch = lengths_.size();
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t t = 0; t < lengths_[b]; ++t) {
        float* y = output_.data() + (t * batch + b) * 2 * kHidden;
        std::memcpy(y, fw + (t * batch + b) * kHidden, kHidden * 4);
        std::memcpy(y + kHidden,
                    bw_reversed + ((lengths_[b] - 1 - t) * batch + b) * kHidden,
                    kHidden * 4);
      }
    }
  }

  dnnl::stream stream_;
  std::vector<int64_t> lengths_;
  int64_t steps_;
  std::vector<OnednnDirection> forward_, backward_;
  std::vector<float> output_;
};

// ---------------------------------------------------------------------------
// PyTorch: packed nn.LSTM(bidirectional=True, num_layers=2), as a child.

double TorchPackedMs(const std::vector<std::vector<Direction>>& layers,
                     const std::vector<int64_t>& lengths, int threads, int reps,
                     std::string* note) {
  const std::string python = absl::GetFlag(FLAGS_python);
  if (python.empty()) {
    *note = "skipped (--python empty)";
    return -1;
  }
  std::string lens;
  for (int64_t l : lengths) absl::StrAppend(&lens, lens.empty() ? "" : ",", l);
  const std::string command = absl::StrFormat(
      "OMP_NUM_THREADS=%d OPENBLAS_NUM_THREADS=%d OMP_WAIT_POLICY=passive "
      "%s %s --threads %d --reps %d --hidden %d --input %d --layers %d "
      "--lengths %s 2>&1",
      threads, threads, python, absl::GetFlag(FLAGS_torch_script), threads,
      reps, kHidden, kInput, layers.size(), lens);
  FILE* pipe = popen(command.c_str(), "r");
  if (pipe == nullptr) {
    *note = "could not start python";
    return -1;
  }
  std::string out;
  char buf[512];
  while (fgets(buf, sizeof(buf), pipe) != nullptr) out += buf;
  const int status = pclose(pipe);
  double ms = -1;
  if (status != 0 || std::sscanf(out.c_str(), "packed_ms %lf", &ms) != 1) {
    *note = "unavailable: " + out.substr(0, 200);
    return -1;
  }
  return ms;
}

int Main() {
  int threads = absl::GetFlag(FLAGS_threads);
  if (threads <= 0) threads = omp_get_num_procs();
  omp_set_num_threads(threads);
  const int reps = absl::GetFlag(FLAGS_reps);
  const int64_t batch = absl::GetFlag(FLAGS_batch);

  std::mt19937 rng(2024);
  std::uniform_int_distribution<int64_t> length_dist(
      absl::GetFlag(FLAGS_min_length), absl::GetFlag(FLAGS_max_length));
  std::vector<int64_t> lengths(batch);
  int64_t total = 0, steps = 0;
  for (int64_t& l : lengths) {
    l = length_dist(rng);
    total += l;
    steps = std::max(steps, l);
  }

  std::vector<std::vector<Direction>> layers;
  for (int64_t l = 0; l < kLayers; ++l) {
    const int64_t in = l == 0 ? kInput : 2 * kHidden;
    layers.push_back({RandomDirection(in, &rng), RandomDirection(in, &rng)});
  }

  // The same inputs, packed for the engine (instances concatenated) and
  // padded time-major for oneDNN.
  engine::NetInputs inputs;
  inputs.inputs.emplace_back();
  inputs.inputs[0].lengths = lengths;
  std::vector<float> padded(steps * batch * kInput, 0.0f);
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t t = 0; t < lengths[b]; ++t) {
      std::vector<float> x = Random(kInput, 1.0f, &rng);
      inputs.inputs[0].vectors.insert(inputs.inputs[0].vectors.end(), x.begin(),
                                      x.end());
      std::memcpy(&padded[(t * batch + b) * kInput], x.data(), kInput * 4);
    }
  }

  const std::string dir =
      (std::filesystem::temp_directory_path() / "rnnserve_mixed_bench")
          .string();
  auto model = BuildEngineModel(layers, dir);
  if (!model.ok()) {
    std::fprintf(stderr, "engine model: %s\n",
                 model.status().ToString().c_str());
    return 1;
  }
  const engine::Net& net = (*model)->net();
  engine::Execution exec = net.NewExecution();
  engine::NetOutputs outputs;
  const double engine_ms = MedianMs(
      [&] {
        if (!net.Run(inputs, &exec, &outputs).ok()) std::abort();
      },
      reps);

  dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  OnednnStack stack(layers, lengths, steps, eng);
  double copy_ms = 0;
  std::vector<double> copies;
  const double onednn_ms = MedianMs(
      [&] {
        stack.Run(padded, &copy_ms);
        copies.push_back(copy_ms);
      },
      reps);
  std::sort(copies.begin(), copies.end());
  const double onednn_copy_ms = copies[copies.size() / 2];

  // Same results on every real position.
  double worst = 0;
  const std::vector<float>& engine_out = outputs.outputs[0].values;
  int64_t row = 0;
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t t = 0; t < lengths[b]; ++t, ++row) {
      const float* e = &engine_out[row * 2 * kHidden];
      const float* d = &stack.output()[(t * batch + b) * 2 * kHidden];
      for (int64_t j = 0; j < 2 * kHidden; ++j) {
        worst = std::max(worst, std::fabs(double{e[j]} - d[j]));
      }
    }
  }

  std::string torch_note;
  const double torch_ms =
      TorchPackedMs(layers, lengths, threads, reps, &torch_note);

  // Multiply-adds of the products only (gate math not counted).
  auto flops = [&](int64_t rows) {
    double f = 0;
    for (int64_t l = 0; l < kLayers; ++l) {
      const int64_t in = l == 0 ? kInput : 2 * kHidden;
      f += 2.0 * 2 * rows * 4 * kHidden * (in + kHidden);
    }
    return f;
  };
  const double real = flops(total), padded_flops = flops(steps * batch);

  std::printf(
      "mixed_length_bench: bidirectional %lld-layer LSTM, state %lld per "
      "direction, input %lld, batch %lld, lengths %lld..%lld (mean %.1f, "
      "longest %lld), fp32 inference, %d threads, median of %d runs\n\n",
      static_cast<long long>(kLayers), static_cast<long long>(kHidden),
      static_cast<long long>(kInput), static_cast<long long>(batch),
      static_cast<long long>(absl::GetFlag(FLAGS_min_length)),
      static_cast<long long>(absl::GetFlag(FLAGS_max_length)),
      static_cast<double>(total) / batch, static_cast<long long>(steps),
      threads, reps);
  std::printf("  %-40s %9s %12s\n", "side", "ms/batch", "GFLOP/s");
  std::printf("  %-40s %9.2f %12.1f  (real elements only)\n", "engine, packed",
              engine_ms, real / engine_ms / 1e6);
  std::printf("  %-40s %9.2f %12.1f  (padded elements included)\n",
              "oneDNN lstm_forward, padded", onednn_ms,
              padded_flops / onednn_ms / 1e6);
  std::printf("  %-40s %9.2f\n", "  of which length-aware reversal copies",
              onednn_copy_ms);
  if (torch_ms > 0) {
    std::printf("  %-40s %9.2f %12.1f\n", "PyTorch nn.LSTM, packed", torch_ms,
                real / torch_ms / 1e6);
  } else {
    std::printf("  %-40s %s\n", "PyTorch nn.LSTM, packed", torch_note.c_str());
  }
  std::printf("\n  oneDNN / engine:                    %.2fx\n",
              onednn_ms / engine_ms);
  std::printf("  oneDNN without the copies / engine: %.2fx\n",
              (onednn_ms - onednn_copy_ms) / engine_ms);
  if (torch_ms > 0) {
    std::printf("  PyTorch / engine:                   %.2fx\n",
                torch_ms / engine_ms);
  }
  std::printf("  padded elements / real elements:    %.2f\n",
              static_cast<double>(steps * batch) / total);
  std::printf("  max |engine - oneDNN| on real positions: %.3g%s\n", worst,
              worst <= 1e-5 ? " (they agree)" : " (DISAGREEMENT)");
  return worst <= 1e-5 ? 0 : 1;
}

}  // namespace
}  // namespace rnnserve::bench

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  return rnnserve::bench::Main();
}

// rnn_bench: how fast the engine's recurrent layers are next to what this
// machine can do.
//
// On one shape family (state size 512, input width 512, 100 steps, batches
// 1, 16 and 64, fp32, inference) and one thread count it times
//   - the engine: a net of one LongShortTermMemoryLayer or
//     GatedRecurrentLayer, loaded from a safetensors file and run through
//     Net::Run with a reused Execution;
//   - oneDNN's own lstm_forward and lbr_gru_forward primitives, weights in
//     the layout the primitive picks;
//   - PyTorch's nn.LSTM and nn.GRU (bench/torch_rnn.py, run as a child
//     process), padded and packed;
// and measures the sgemm rate of oneDNN and OpenBLAS in the same run, so
// every recurrent rate can be read against the matrix-multiply ceiling.
// In passing it checks that the engine and oneDNN compute the same outputs
// from the same weights. bench/README.md explains every column.

#include <cblas.h>
#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <tuple>
#include <unordered_map>
#include <utility>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engine/net.h"
#include "engine/safetensors.h"
#include "engine/status_macros.h"
#include "nlohmann/json.hpp"
#include "oneapi/dnnl/dnnl.h"
#include "oneapi/dnnl/dnnl.hpp"
#include "rnnserve/v1/net.pb.h"

ABSL_FLAG(int, threads, 0,
          "Threads for every side (engine, oneDNN, OpenBLAS, PyTorch); "
          "0 means one per core.");
ABSL_FLAG(bool, quick, false,
          "Few repetitions: a smoke run that ends in under a minute.");
ABSL_FLAG(int, reps, 0,
          "Timed runs per measurement, the median is reported; 0 means 21, "
          "or 3 with --quick.");
ABSL_FLAG(std::string, json, "", "Also write every result to this file.");
ABSL_FLAG(std::vector<std::string>, cells,
          std::vector<std::string>({"lstm", "gru"}),
          "The cells to time, of lstm and gru.");
ABSL_FLAG(std::vector<std::string>, batches,
          std::vector<std::string>({"1", "16", "64"}),
          "The batches to time the engine and oneDNN on (the PyTorch side "
          "runs 1, 16 and 64).");
ABSL_FLAG(std::string, python, "/usr/bin/python3",
          "The Python interpreter for the PyTorch side.");
ABSL_FLAG(std::string, torch_script, RNNSERVE_BENCH_TORCH_SCRIPT,
          "The PyTorch side's script (bench/torch_rnn.py).");
ABSL_FLAG(bool, torch, true, "Run the PyTorch side.");
ABSL_FLAG(std::string, torch_omp_wait_policy, "passive",
          "OMP_WAIT_POLICY for the PyTorch side; empty leaves it to the "
          "environment. Debian's torch runs OpenMP and OpenBLAS thread pools "
          "side by side, and spinning OpenMP workers slow its products "
          "several times over.");

namespace rnnserve::bench {
namespace {

using json = nlohmann::json;

constexpr int64_t kInput = 512;
constexpr int64_t kHidden = 512;
constexpr int64_t kSteps = 100;
constexpr int64_t kBatches[] = {1, 16, 64};

// The sgemm shapes: all rows of a batch-64 run at once (the input
// projection), and one step of the batch-64 recurrence. N is the width of
// the LSTM's four gates.
constexpr int64_t kGemmShapes[][3] = {{64 * kSteps, kInput, 4 * kHidden},
                                      {64, kHidden, 4 * kHidden}};

// A recurrent cell as each side names it.
struct CellKind {
  const char* name;
  const char* engine_layer;
  // Gate blocks in the PyTorch (and engine) weight matrices.
  int64_t gates;
  // oneDNN's gate g is PyTorch's gate torch_gate[g]. oneDNN's LSTM gates are
  // i, f, c~, o like PyTorch's i, f, g, o; its linear-before-reset GRU gates
  // are u, r, o where PyTorch has r, z, n (u is z, o is n).
  int torch_gate[4];
  bool lstm;
};

constexpr CellKind kLstm = {
    "lstm", "LongShortTermMemoryLayer", 4, {0, 1, 2, 3}, true};
constexpr CellKind kGru = {
    "gru", "GatedRecurrentLayer", 3, {1, 0, 2, -1}, false};

// Floating-point operations of one run: the input and recurrent products of
// every step (elementwise gate work is not counted).
double RecurrentFlops(const CellKind& cell, int64_t batch) {
  return 2.0 * kSteps * batch * cell.gates * kHidden * (kInput + kHidden);
}

// Milliseconds per call over the timed runs.
struct Timing {
  double median = NAN;
  double min = NAN;
  double max = NAN;
};

template <typename Fn>
Timing TimeCalls(Fn&& fn, int reps, int warmup) {
  for (int i = 0; i < warmup; ++i) fn();
  std::vector<double> ms(reps);
  for (double& m : ms) {
    const auto start = std::chrono::steady_clock::now();
    fn();
    const auto stop = std::chrono::steady_clock::now();
    m = std::chrono::duration<double, std::milli>(stop - start).count();
  }
  std::sort(ms.begin(), ms.end());
  const size_t mid = ms.size() / 2;
  const double median =
      ms.size() % 2 == 1 ? ms[mid] : 0.5 * (ms[mid - 1] + ms[mid]);
  return {median, ms.front(), ms.back()};
}

// Times two calls alternately, a then b, rep after rep, so that the slow
// drifts of a shared machine fall on both sides of their ratio alike.
template <typename FnA, typename FnB>
std::pair<Timing, Timing> TimePaired(FnA&& a, FnB&& b, int reps, int warmup) {
  for (int i = 0; i < warmup; ++i) {
    a();
    b();
  }
  std::vector<double> ms_a(reps), ms_b(reps);
  for (int i = 0; i < reps; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    a();
    auto t1 = std::chrono::steady_clock::now();
    b();
    auto t2 = std::chrono::steady_clock::now();
    ms_a[i] = std::chrono::duration<double, std::milli>(t1 - t0).count();
    ms_b[i] = std::chrono::duration<double, std::milli>(t2 - t1).count();
  }
  auto summarize = [](std::vector<double>& ms) -> Timing {
    std::sort(ms.begin(), ms.end());
    const size_t mid = ms.size() / 2;
    const double median =
        ms.size() % 2 == 1 ? ms[mid] : 0.5 * (ms[mid - 1] + ms[mid]);
    return {median, ms.front(), ms.back()};
  };
  return {summarize(ms_a), summarize(ms_b)};
}

std::vector<float> RandomVector(int64_t n, float scale, std::mt19937* rng) {
  std::uniform_real_distribution<float> dist(-scale, scale);
  std::vector<float> v(n);
  for (float& x : v) x = dist(*rng);
  return v;
}

// ---------------------------------------------------------------------------
// Weights and inputs, in PyTorch's layouts.

struct CellWeights {
  std::vector<float> weight_ih;  // [gates * H, I]
  std::vector<float> weight_hh;  // [gates * H, H]
  std::vector<float> bias_ih;    // [gates * H]
  std::vector<float> bias_hh;    // [gates * H]
};

// PyTorch's default initialisation: uniform in +-1/sqrt(H).
CellWeights RandomWeights(const CellKind& cell, std::mt19937* rng) {
  const int64_t g = cell.gates * kHidden;
  const float scale = 1.0f / std::sqrt(static_cast<float>(kHidden));
  return {RandomVector(g * kInput, scale, rng),
          RandomVector(g * kHidden, scale, rng), RandomVector(g, scale, rng),
          RandomVector(g, scale, rng)};
}

// One batch of inputs, the same values in both layouts.
struct InputData {
  std::vector<float> batch_major;  // [B, T, I]: the engine's NetInputs
  std::vector<float> time_major;   // [T, B, I]: oneDNN's tnc
};

InputData RandomInput(int64_t batch, std::mt19937* rng) {
  InputData data;
  data.batch_major = RandomVector(batch * kSteps * kInput, 1.0f, rng);
  data.time_major.resize(data.batch_major.size());
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t t = 0; t < kSteps; ++t) {
      std::memcpy(&data.time_major[(t * batch + b) * kInput],
                  &data.batch_major[(b * kSteps + t) * kInput],
                  kInput * sizeof(float));
    }
  }
  return data;
}

// ---------------------------------------------------------------------------
// The engine side.

std::string FloatBytes(const std::vector<float>& v) {
  return std::string(reinterpret_cast<const char*>(v.data()),
                     v.size() * sizeof(float));
}

// Writes the weights to `dir`/<cell>.safetensors and builds a net of one
// input and one recurrent layer over it, output the state sequence.
absl::StatusOr<std::unique_ptr<engine::Net>> BuildEngineNet(
    const CellKind& cell, const CellWeights& w, const std::string& dir) {
  v1::NetSpec spec;
  spec.set_name(absl::StrCat("bench_", cell.name));
  v1::InputSpec* input = spec.add_inputs();
  input->set_name("x");
  input->set_kind(v1::VECTOR_SEQUENCE);
  input->set_width(kInput);
  v1::LayerSpec* layer = spec.add_layers();
  layer->set_name("rnn");
  layer->set_type(cell.engine_layer);
  layer->set_size(kHidden);

  const int64_t g = cell.gates * kHidden;
  const std::vector<engine::TensorToWrite> arrays = {
      {"rnn.weight_ih",
       engine::DType::kF32,
       {g, kInput},
       FloatBytes(w.weight_ih)},
      {"rnn.weight_hh",
       engine::DType::kF32,
       {g, kHidden},
       FloatBytes(w.weight_hh)},
      {"rnn.bias_ih", engine::DType::kF32, {g}, FloatBytes(w.bias_ih)},
      {"rnn.bias_hh", engine::DType::kF32, {g}, FloatBytes(w.bias_hh)},
  };
  const std::string path = absl::StrCat(dir, "/", cell.name, ".safetensors");
  RETURN_IF_ERROR(engine::WriteSafetensors(path, arrays));
  ASSIGN_OR_RETURN(std::unique_ptr<engine::SafetensorsFile> file,
                   engine::SafetensorsFile::Open(path));
  return engine::Net::Create(spec, std::move(file));
}

// One batch through a net, with an Execution reused across runs.
class EngineRunner {
 public:
  EngineRunner(const engine::Net* net, const InputData& data, int64_t batch)
      : net_(net), exec_(net->NewExecution()) {
    inputs_.inputs.resize(1);
    inputs_.inputs[0].lengths.assign(batch, kSteps);
    inputs_.inputs[0].vectors = data.batch_major;
  }

  absl::Status Run() { return net_->Run(inputs_, &exec_, &outputs_); }

  // [B, T, H], valid after a successful Run.
  const std::vector<float>& output() const {
    return outputs_.outputs[0].values;
  }

 private:
  const engine::Net* net_;
  engine::Execution exec_;
  engine::NetInputs inputs_;
  engine::NetOutputs outputs_;
};

// ---------------------------------------------------------------------------
// The oneDNN side.

// A PyTorch weight matrix [gates * H, in] as oneDNN's ldigo [1, 1, in, G, H],
// gates reordered as `cell` says.
std::vector<float> ToLdigo(const CellKind& cell, const std::vector<float>& w,
                           int64_t in) {
  const int64_t g_count = cell.gates;
  std::vector<float> out(w.size());
  for (int64_t i = 0; i < in; ++i) {
    for (int64_t g = 0; g < g_count; ++g) {
      const int64_t torch_g = cell.torch_gate[g];
      for (int64_t o = 0; o < kHidden; ++o) {
        out[(i * g_count + g) * kHidden + o] =
            w[(torch_g * kHidden + o) * in + i];
      }
    }
  }
  return out;
}

// The bias in oneDNN's ldgo [1, 1, G', H]. The LSTM adds both PyTorch
// biases per gate. The linear-before-reset GRU adds both for u and r, takes
// only the input bias for o, and has a fourth block for the recurrent bias
// that sits inside the reset product (PyTorch's b_hn).
std::vector<float> ToLdgoBias(const CellKind& cell, const CellWeights& w) {
  const int64_t blocks = cell.lstm ? cell.gates : cell.gates + 1;
  std::vector<float> out(blocks * kHidden);
  for (int64_t g = 0; g < cell.gates; ++g) {
    const int64_t torch_g = cell.torch_gate[g];
    const bool recurrent_inside_reset = !cell.lstm && g == 2;
    for (int64_t o = 0; o < kHidden; ++o) {
      const int64_t k = torch_g * kHidden + o;
      out[g * kHidden + o] =
          w.bias_ih[k] + (recurrent_inside_reset ? 0.0f : w.bias_hh[k]);
    }
  }
  if (!cell.lstm) {
    std::copy(w.bias_hh.begin() + 2 * kHidden, w.bias_hh.end(),
              out.begin() + 3 * kHidden);
  }
  return out;
}

dnnl::memory MemoryFrom(const dnnl::memory::desc& md,
                        const std::vector<float>& values,
                        const dnnl::engine& eng) {
  dnnl::memory mem(md, eng);
  std::memcpy(mem.get_data_handle(), values.data(),
              values.size() * sizeof(float));
  return mem;
}

// Brings user weights into the layout the primitive asked for, once.
dnnl::memory Reordered(dnnl::memory user, const dnnl::memory::desc& wanted,
                       const dnnl::engine& eng, dnnl::stream* stream) {
  if (user.get_desc() == wanted) return user;
  dnnl::memory out(wanted, eng);
  dnnl::reorder(user, out).execute(*stream, user, out);
  stream->wait();
  return out;
}

// Names the weights layout a primitive picked: one of oneDNN's two plain
// layouts, its packed-GEMM form, or a blocked layout of its own.
std::string DescribeFormat(const dnnl::memory::desc& md) {
  if (md.data.format_kind == dnnl_format_kind_rnn_packed) return "packed";
  using tag = dnnl::memory::format_tag;
  for (const auto& [plain, name] :
       {std::pair{tag::ldigo, "ldigo"}, std::pair{tag::ldgoi, "ldgoi"}}) {
    if (md == dnnl::memory::desc(md.dims(), md.data_type(), plain)) {
      return name;
    }
  }
  return "blocked";
}

// One oneDNN RNN primitive for one batch size, its memories bound.
class OnednnRunner {
 public:
  OnednnRunner(const CellKind& cell, const CellWeights& w,
               const InputData& data, int64_t batch, const dnnl::engine& eng)
      : stream_(eng) {
    using dt = dnnl::memory::data_type;
    using tag = dnnl::memory::format_tag;
    const int64_t g = cell.gates;
    const int64_t bias_blocks = cell.lstm ? g : g + 1;
    const dnnl::memory::desc src_md({kSteps, batch, kInput}, dt::f32, tag::tnc);
    const dnnl::memory::desc dst_md({kSteps, batch, kHidden}, dt::f32,
                                    tag::tnc);
    const dnnl::memory::desc bias_md({1, 1, bias_blocks, kHidden}, dt::f32,
                                     tag::ldgo);
    const dnnl::memory::dims layer_dims = {1, 1, kInput, g, kHidden};
    const dnnl::memory::dims iter_dims = {1, 1, kHidden, g, kHidden};
    const dnnl::memory::desc layer_any(layer_dims, dt::f32, tag::any);
    const dnnl::memory::desc iter_any(iter_dims, dt::f32, tag::any);
    const dnnl::memory::desc none;  // Zero initial states, no final states.
    const auto prop = dnnl::prop_kind::forward_inference;
    const auto dir = dnnl::rnn_direction::unidirectional_left2right;

    dnnl::memory::desc layer_md, iter_md;
    if (cell.lstm) {
      const dnnl::lstm_forward::desc desc(prop, dir, src_md, none, none,
                                          layer_any, iter_any, bias_md, dst_md,
                                          none, none);
      const dnnl::lstm_forward::primitive_desc pd(desc, eng);
      primitive_ = dnnl::lstm_forward(pd);
      layer_md = pd.weights_layer_desc();
      iter_md = pd.weights_iter_desc();
      implementation_ = pd.impl_info_str();
    } else {
      const dnnl::lbr_gru_forward::desc desc(prop, dir, src_md, none, layer_any,
                                             iter_any, bias_md, dst_md, none);
      const dnnl::lbr_gru_forward::primitive_desc pd(desc, eng);
      primitive_ = dnnl::lbr_gru_forward(pd);
      layer_md = pd.weights_layer_desc();
      iter_md = pd.weights_iter_desc();
      implementation_ = pd.impl_info_str();
    }
    weights_format_ = DescribeFormat(layer_md);

    const dnnl::memory layer_user =
        MemoryFrom(dnnl::memory::desc(layer_dims, dt::f32, tag::ldigo),
                   ToLdigo(cell, w.weight_ih, kInput), eng);
    const dnnl::memory iter_user =
        MemoryFrom(dnnl::memory::desc(iter_dims, dt::f32, tag::ldigo),
                   ToLdigo(cell, w.weight_hh, kHidden), eng);
    dst_ = dnnl::memory(dst_md, eng);
    args_ = {
        {DNNL_ARG_SRC_LAYER, MemoryFrom(src_md, data.time_major, eng)},
        {DNNL_ARG_WEIGHTS_LAYER,
         Reordered(layer_user, layer_md, eng, &stream_)},
        {DNNL_ARG_WEIGHTS_ITER, Reordered(iter_user, iter_md, eng, &stream_)},
        {DNNL_ARG_BIAS, MemoryFrom(bias_md, ToLdgoBias(cell, w), eng)},
        {DNNL_ARG_DST_LAYER, dst_},
    };
  }

  void Run() {
    primitive_.execute(stream_, args_);
    stream_.wait();
  }

  // [T, B, H], valid after Run.
  const float* output() const {
    return static_cast<const float*>(dst_.get_data_handle());
  }
  const std::string& implementation() const { return implementation_; }
  const std::string& weights_format() const { return weights_format_; }

 private:
  dnnl::stream stream_;
  dnnl::primitive primitive_;
  dnnl::memory dst_;
  std::unordered_map<int, dnnl::memory> args_;
  std::string implementation_;
  std::string weights_format_;
};

// The largest |engine - oneDNN| over every output element.
double MaxAbsDiff(const std::vector<float>& engine_btc, const float* onednn_tbc,
                  int64_t batch) {
  double worst = 0.0;
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t t = 0; t < kSteps; ++t) {
      const float* e = &engine_btc[(b * kSteps + t) * kHidden];
      const float* d = onednn_tbc + (t * batch + b) * kHidden;
      for (int64_t j = 0; j < kHidden; ++j) {
        worst = std::max(worst, static_cast<double>(std::fabs(e[j] - d[j])));
      }
    }
  }
  return worst;
}

// ---------------------------------------------------------------------------
// sgemm: C[m, n] = A[m, k] * B^T with B stored [n, k], the engine's form.

struct GemmResult {
  std::string library;
  int64_t m, k, n;
  Timing time;
  double gflops;  // At the median time.
};

GemmResult TimeSgemm(bool openblas, int64_t m, int64_t k, int64_t n, int reps,
                     int warmup) {
  std::mt19937 rng(7);
  const std::vector<float> a = RandomVector(m * k, 1.0f, &rng);
  const std::vector<float> b = RandomVector(n * k, 1.0f, &rng);
  std::vector<float> c(m * n);
  auto run = [&] {
    if (openblas) {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, n, k, 1.0f,
                  a.data(), k, b.data(), k, 0.0f, c.data(), n);
    } else if (dnnl_sgemm('N', 'T', m, n, k, 1.0f, a.data(), k, b.data(), k,
                          0.0f, c.data(), n) != dnnl_success) {
      std::fprintf(stderr, "dnnl_sgemm failed\n");
      std::exit(1);
    }
  };
  // Small products take about a millisecond; time more of them.
  const int scale = m * n * k < 1e9 ? 20 : 1;
  const Timing time = TimeCalls(run, reps * scale, warmup * scale);
  GemmResult result;
  result.library = openblas ? "OpenBLAS cblas_sgemm" : "oneDNN dnnl_sgemm";
  result.m = m;
  result.k = k;
  result.n = n;
  result.time = time;
  result.gflops = 2.0 * m * n * k / (time.median * 1e6);
  return result;
}

// ---------------------------------------------------------------------------
// The PyTorch side.

struct TorchSide {
  bool ran = false;
  std::string note;  // Why it did not run, or what it ran with.
  // (cell, batch, mode) -> its timing.
  std::map<std::tuple<std::string, int64_t, std::string>, Timing> times;
};

std::string ShellQuote(const std::string& s) {
  std::string out = "'";
  for (char c : s) {
    if (c == '\'') {
      out += "'\\''";
    } else {
      out += c;
    }
  }
  return out + "'";
}

TorchSide RunTorch(int threads, int reps, int warmup) {
  TorchSide side;
  const std::string python = absl::GetFlag(FLAGS_python);
  const std::string script = absl::GetFlag(FLAGS_torch_script);
  if (!absl::GetFlag(FLAGS_torch)) {
    side.note = "skipped (--notorch)";
    return side;
  }
  if (access(python.c_str(), X_OK) != 0) {
    side.note = absl::StrCat("skipped: no Python interpreter at ", python);
    return side;
  }
  if (access(script.c_str(), R_OK) != 0) {
    side.note = absl::StrCat("skipped: cannot read ", script);
    return side;
  }

  std::string environment = absl::StrFormat(
      "OMP_NUM_THREADS=%d OPENBLAS_NUM_THREADS=%d", threads, threads);
  const std::string wait_policy = absl::GetFlag(FLAGS_torch_omp_wait_policy);
  if (!wait_policy.empty()) {
    absl::StrAppend(&environment, " OMP_WAIT_POLICY=", ShellQuote(wait_policy));
  }
  const std::string command = absl::StrFormat(
      "%s %s %s --threads %d --input %d --hidden %d --steps %d "
      "--batches %d,%d,%d --reps %d --warmup %d",
      environment, ShellQuote(python), ShellQuote(script), threads, kInput,
      kHidden, kSteps, kBatches[0], kBatches[1], kBatches[2], reps, warmup);
  FILE* pipe = popen(command.c_str(), "r");
  if (pipe == nullptr) {
    side.note = absl::StrCat("skipped: cannot start ", python);
    return side;
  }
  std::string out;
  char buf[4096];
  size_t got;
  while ((got = fread(buf, 1, sizeof(buf), pipe)) > 0) out.append(buf, got);
  const int status = pclose(pipe);

  const json doc = json::parse(out, nullptr, /*allow_exceptions=*/false);
  if (status != 0 || doc.is_discarded() || !doc.is_object()) {
    side.note = absl::StrCat("failed: ", script, " exited with status ", status,
                             " (its errors are above)");
    return side;
  }
  if (!doc.value("available", false)) {
    side.note = absl::StrCat("skipped: ", doc.value("reason", "torch missing"));
    return side;
  }
  side.ran = true;
  side.note = absl::StrFormat(
      "PyTorch %s, %d threads, BLAS %s, mkldnn %s; run with %s",
      doc.value("torch_version", "?"), doc.value("threads", 0),
      doc.value("blas", "?"),
      doc.value("mkldnn_available", false) ? "available" : "absent",
      environment);
  for (const json& r : doc["results"]) {
    side.times[{r["cell"].get<std::string>(), r["batch"].get<int64_t>(),
                r["mode"].get<std::string>()}] = {r["median_ms"].get<double>(),
                                                  r["min_ms"].get<double>(),
                                                  r["max_ms"].get<double>()};
  }
  return side;
}

// ---------------------------------------------------------------------------
// Reporting.

struct ShapeResult {
  std::string cell;
  int64_t batch;
  double flops;
  Timing engine;
  Timing onednn;
  Timing torch_padded;  // NAN when the PyTorch side did not run.
  Timing torch_packed;
  double max_abs_diff;
  std::string onednn_impl;
  std::string onednn_weights;
};

std::string CpuModel() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("model name", 0) == 0) {
      const size_t colon = line.find(':');
      if (colon != std::string::npos) return line.substr(colon + 2);
    }
  }
  return "unknown CPU";
}

// A time as "ms/run  us/step  GFLOP/s" columns; dashes for a missing time.
std::string TimeColumns(double ms, double flops) {
  if (std::isnan(ms)) return absl::StrFormat("%10s %9s %8s", "-", "-", "-");
  return absl::StrFormat("%10.3f %9.1f %8.1f", ms, ms * 1e3 / kSteps,
                         flops / (ms * 1e6));
}

std::string Ratio(double num, double den) {
  if (std::isnan(num) || std::isnan(den)) return "-";
  return absl::StrFormat("%.2f", num / den);
}

json TimeJson(const Timing& t, double flops) {
  if (std::isnan(t.median)) return nullptr;
  return {{"ms_per_run", t.median},
          {"us_per_step", t.median * 1e3 / kSteps},
          {"gflops", flops / (t.median * 1e6)},
          {"min_ms", t.min},
          {"max_ms", t.max}};
}

json RatioJson(double num, double den) {
  if (std::isnan(num) || std::isnan(den)) return nullptr;
  return num / den;
}

void PrintGemmTable(const std::vector<GemmResult>& gemms) {
  std::printf("\nMatrix multiply, C = A * B^T (fp32)\n");
  std::printf("  %-22s %6s %5s %5s %10s %9s\n", "library", "M", "K", "N",
              "ms/call", "GFLOP/s");
  for (const GemmResult& g : gemms) {
    std::printf("  %-22s %6lld %5lld %5lld %10.3f %9.1f\n", g.library.c_str(),
                static_cast<long long>(g.m), static_cast<long long>(g.k),
                static_cast<long long>(g.n), g.time.median, g.gflops);
  }
}

void PrintShapeTables(const std::vector<ShapeResult>& shapes) {
  std::printf(
      "\nRecurrent layers: ms per whole %lld-step run, us per step, "
      "GFLOP/s\n",
      static_cast<long long>(kSteps));
  std::printf("  %-4s %5s  %-13s %10s %9s %8s\n", "cell", "batch", "side",
              "ms/run", "us/step", "GFLOP/s");
  for (const ShapeResult& s : shapes) {
    const std::pair<const char*, double> sides[] = {
        {"engine", s.engine.median},
        {"oneDNN", s.onednn.median},
        {"torch padded", s.torch_padded.median},
        {"torch packed", s.torch_packed.median}};
    for (const auto& [side, ms] : sides) {
      std::printf("  %-4s %5lld  %-13s %s\n", s.cell.c_str(),
                  static_cast<long long>(s.batch), side,
                  TimeColumns(ms, s.flops).c_str());
    }
  }

  std::printf(
      "\nRatios (engine time / other time; above 1 the engine is slower) "
      "and agreement\n");
  std::printf("  %-4s %5s %14s %14s %14s %18s\n", "cell", "batch",
              "engine/oneDNN", "engine/torch", "engine/torch", "max|engine-");
  std::printf("  %-4s %5s %14s %14s %14s %18s\n", "", "", "", "(padded)",
              "(packed)", "oneDNN|");
  for (const ShapeResult& s : shapes) {
    std::printf("  %-4s %5lld %14s %14s %14s %18.2e\n", s.cell.c_str(),
                static_cast<long long>(s.batch),
                Ratio(s.engine.median, s.onednn.median).c_str(),
                Ratio(s.engine.median, s.torch_padded.median).c_str(),
                Ratio(s.engine.median, s.torch_packed.median).c_str(),
                s.max_abs_diff);
  }
}

// ---------------------------------------------------------------------------

int Main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "Times the engine's LSTM and GRU layers against oneDNN's RNN "
      "primitives, PyTorch and the sgemm rate.\nUsage: rnn_bench [--quick] "
      "[--threads N] [--json PATH]");
  absl::ParseCommandLine(argc, argv);

  // One thread count for every side. oneDNN (and so the engine's products)
  // and this program share libgomp; OpenBLAS keeps its own pool; the
  // PyTorch child gets it through its environment (OpenMP, and OpenBLAS,
  // which Debian's torch calls for its matrix products) and
  // torch.set_num_threads.
  int threads = absl::GetFlag(FLAGS_threads);
  if (threads <= 0) {
    threads = static_cast<int>(std::thread::hardware_concurrency());
  }
  if (threads <= 0) threads = 1;
  omp_set_num_threads(threads);
  openblas_set_num_threads(threads);

  const bool quick = absl::GetFlag(FLAGS_quick);
  int reps = absl::GetFlag(FLAGS_reps);
  if (reps <= 0) reps = quick ? 3 : 21;
  const int warmup = quick ? 1 : 3;

  // The subsets the flags ask for, in the report's order.
  std::vector<const CellKind*> cells;
  for (const CellKind* cell : {&kLstm, &kGru}) {
    const std::vector<std::string> wanted = absl::GetFlag(FLAGS_cells);
    if (std::find(wanted.begin(), wanted.end(), cell->name) != wanted.end()) {
      cells.push_back(cell);
    }
  }
  std::vector<int64_t> batches;
  bool batches_ok = true;
  for (const std::string& b : absl::GetFlag(FLAGS_batches)) {
    int64_t batch = 0;
    if (!absl::SimpleAtoi(b, &batch) || batch < 1 || batch > 4096) {
      batches_ok = false;
    } else {
      batches.push_back(batch);
    }
  }
  if (cells.size() != absl::GetFlag(FLAGS_cells).size() || !batches_ok ||
      batches.empty()) {
    std::fprintf(stderr,
                 "--cells takes lstm and gru, --batches sizes from 1 to "
                 "4096\n");
    return 2;
  }

  const dnnl_version_t* dnnl = dnnl_version();
  const char* coretype = std::getenv("OPENBLAS_CORETYPE");
  std::printf(
      "rnn_bench: state %lld, input %lld, %lld steps, fp32 "
      "inference, %d threads\n",
      static_cast<long long>(kHidden), static_cast<long long>(kInput),
      static_cast<long long>(kSteps), threads);
  std::printf("CPU: %s, %u hardware threads\n", CpuModel().c_str(),
              std::thread::hardware_concurrency());
  std::printf("oneDNN %d.%d.%d (%s threading)\n", dnnl->major, dnnl->minor,
              dnnl->patch,
              dnnl->cpu_runtime == DNNL_RUNTIME_OMP ? "OpenMP" : "other");
  std::printf("OpenBLAS: %s; core %s; OPENBLAS_CORETYPE=%s\n",
              openblas_get_config(), openblas_get_corename(),
              coretype == nullptr ? "(unset)" : coretype);
  std::printf("Each time is the median of %d runs after %d warm-up runs.\n",
              reps, warmup);
  std::fflush(stdout);

  // sgemm first, OpenBLAS before oneDNN, with a pause after OpenBLAS so its
  // spinning worker threads have gone to sleep before oneDNN's run.
  std::vector<GemmResult> gemms;
  for (const auto& shape : kGemmShapes) {
    std::fprintf(
        stderr, "sgemm %lldx%lldx%lld...\n", static_cast<long long>(shape[0]),
        static_cast<long long>(shape[1]), static_cast<long long>(shape[2]));
    gemms.push_back(
        TimeSgemm(true, shape[0], shape[1], shape[2], reps, warmup));
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    gemms.push_back(
        TimeSgemm(false, shape[0], shape[1], shape[2], reps, warmup));
  }

  // The engine reads its weights from a file, as it does in a model folder.
  std::string dir_template =
      (std::filesystem::temp_directory_path() / "rnn_bench.XXXXXX").string();
  if (mkdtemp(dir_template.data()) == nullptr) {
    std::fprintf(stderr, "cannot make a temporary folder: %s\n",
                 std::strerror(errno));
    return 1;
  }
  const std::string dir = dir_template;

  std::mt19937 rng(1);
  std::map<int64_t, InputData> inputs;
  for (int64_t batch : batches) inputs[batch] = RandomInput(batch, &rng);

  const dnnl::engine cpu(dnnl::engine::kind::cpu, 0);
  std::vector<ShapeResult> shapes;
  for (const CellKind* cell : cells) {
    const CellWeights weights = RandomWeights(*cell, &rng);
    absl::StatusOr<std::unique_ptr<engine::Net>> net =
        BuildEngineNet(*cell, weights, dir);
    if (!net.ok()) {
      std::fprintf(stderr, "building the engine's %s net: %s\n", cell->name,
                   net.status().ToString().c_str());
      return 1;
    }
    for (int64_t batch : batches) {
      std::fprintf(stderr, "%s batch %lld: engine, oneDNN...\n", cell->name,
                   static_cast<long long>(batch));
      EngineRunner engine_run(net->get(), inputs[batch], batch);
      OnednnRunner onednn_run(*cell, weights, inputs[batch], batch, cpu);

      // One run of each, compared, before anything is timed.
      if (absl::Status s = engine_run.Run(); !s.ok()) {
        std::fprintf(stderr, "engine run failed: %s\n", s.ToString().c_str());
        return 1;
      }
      onednn_run.Run();

      ShapeResult r;
      r.cell = cell->name;
      r.batch = batch;
      r.flops = RecurrentFlops(*cell, batch);
      r.max_abs_diff =
          MaxAbsDiff(engine_run.output(), onednn_run.output(), batch);
      r.onednn_impl = onednn_run.implementation();
      r.onednn_weights = onednn_run.weights_format();
      std::tie(r.engine, r.onednn) =
          TimePaired([&] { (void)engine_run.Run(); }, [&] { onednn_run.Run(); },
                     reps, warmup);
      shapes.push_back(r);
    }
  }
  std::filesystem::remove_all(dir);

  std::fprintf(stderr, "PyTorch...\n");
  const TorchSide torch = RunTorch(threads, reps, warmup);
  for (ShapeResult& s : shapes) {
    auto find = [&](const char* mode) {
      auto it = torch.times.find({s.cell, s.batch, mode});
      return it == torch.times.end() ? Timing() : it->second;
    };
    s.torch_padded = find("padded");
    s.torch_packed = find("packed");
  }

  // Tables.
  PrintGemmTable(gemms);
  PrintShapeTables(shapes);
  std::printf("\noneDNN implementations: ");
  for (size_t i = 0; i < shapes.size(); ++i) {
    const ShapeResult& s = shapes[i];
    if (i == 0 || shapes[i - 1].cell != s.cell) {
      std::printf("%s %s (weights %s)  ", s.cell.c_str(), s.onednn_impl.c_str(),
                  s.onednn_weights.c_str());
    }
  }
  std::printf("\nPyTorch side: %s\n", torch.note.c_str());

  const GemmResult* best = &gemms[0];
  const GemmResult* best_step = nullptr;
  for (const GemmResult& g : gemms) {
    if (g.gflops > best->gflops) best = &g;
    if (g.m == kGemmShapes[1][0] &&
        (best_step == nullptr || g.gflops > best_step->gflops)) {
      best_step = &g;
    }
  }
  std::printf(
      "\nEngine at batch 64 against the best sgemm rate, %.1f GFLOP/s "
      "(%s, %lldx%lldx%lld),\nand against the best rate on the per-step "
      "shape, %.1f GFLOP/s (%s, %lldx%lldx%lld):\n",
      best->gflops, best->library.c_str(), static_cast<long long>(best->m),
      static_cast<long long>(best->k), static_cast<long long>(best->n),
      best_step->gflops, best_step->library.c_str(),
      static_cast<long long>(best_step->m),
      static_cast<long long>(best_step->k),
      static_cast<long long>(best_step->n));
  json json_fractions = json::object();
  for (const ShapeResult& s : shapes) {
    if (s.batch != 64) continue;
    const double gflops = s.flops / (s.engine.median * 1e6);
    std::printf(
        "  %-4s %7.1f GFLOP/s = %.2f of the best, %.2f of the "
        "per-step best\n",
        s.cell.c_str(), gflops, gflops / best->gflops,
        gflops / best_step->gflops);
    json_fractions[s.cell] = {
        {"engine_gflops", gflops},
        {"fraction_of_best_sgemm", gflops / best->gflops},
        {"fraction_of_best_step_sgemm", gflops / best_step->gflops}};
  }

  double worst_lstm = 0.0, worst_gru = 0.0;
  for (const ShapeResult& s : shapes) {
    double& worst = s.cell == "lstm" ? worst_lstm : worst_gru;
    worst = std::max(worst, s.max_abs_diff);
  }
  constexpr double kAgreement = 1e-5;
  std::printf(
      "\nEngine against oneDNN on the same weights and inputs, largest "
      "|difference| over every output:\n  lstm %.2e, gru %.2e (%s)\n",
      worst_lstm, worst_gru,
      std::max(worst_lstm, worst_gru) <= kAgreement
          ? "they agree"
          : "DISAGREEMENT: a gate or bias mapping is wrong");

  // A median shrugs off a few disturbed runs, not half of them. Where the
  // median sits well above the fastest run, either something else was using
  // the cores or that side's own timing is unsteady; say so.
  constexpr double kUnsteady = 1.25;
  std::vector<std::string> noisy;
  auto check_spread = [&](const std::string& what, const Timing& t) {
    if (!std::isnan(t.median) && t.median > kUnsteady * t.min) {
      noisy.push_back(absl::StrFormat("%s: median %.3f ms, fastest %.3f ms",
                                      what, t.median, t.min));
    }
  };
  for (const GemmResult& g : gemms) {
    check_spread(absl::StrFormat("%s M=%d", g.library, g.m), g.time);
  }
  for (const ShapeResult& s : shapes) {
    const std::string shape = absl::StrFormat("%s batch %d", s.cell, s.batch);
    check_spread(shape + " engine", s.engine);
    check_spread(shape + " oneDNN", s.onednn);
    check_spread(shape + " torch padded", s.torch_padded);
    check_spread(shape + " torch packed", s.torch_packed);
  }
  if (!noisy.empty()) {
    std::printf(
        "\nUnsteady measurements (median over %.2f x the fastest run; "
        "something else\nwas running, or the side's own timing varies):\n",
        kUnsteady);
    for (const std::string& n : noisy) std::printf("  %s\n", n.c_str());
  }

  // JSON.
  const std::string json_path = absl::GetFlag(FLAGS_json);
  if (!json_path.empty()) {
    json doc;
    doc["config"] = {
        {"hidden", kHidden},
        {"input", kInput},
        {"steps", kSteps},
        {"threads", threads},
        {"reps", reps},
        {"warmup", warmup},
        {"cpu", CpuModel()},
        {"onednn_version",
         absl::StrFormat("%d.%d.%d", dnnl->major, dnnl->minor, dnnl->patch)},
        {"openblas_config", openblas_get_config()},
        {"openblas_core", openblas_get_corename()},
        {"openblas_coretype_env",
         coretype == nullptr ? json(nullptr) : json(coretype)}};
    doc["sgemm"] = json::array();
    for (const GemmResult& g : gemms) {
      doc["sgemm"].push_back({{"library", g.library},
                              {"m", g.m},
                              {"k", g.k},
                              {"n", g.n},
                              {"ms", g.time.median},
                              {"min_ms", g.time.min},
                              {"max_ms", g.time.max},
                              {"gflops", g.gflops}});
    }
    doc["recurrent"] = json::array();
    for (const ShapeResult& s : shapes) {
      doc["recurrent"].push_back(
          {{"cell", s.cell},
           {"batch", s.batch},
           {"flops_per_run", s.flops},
           {"engine", TimeJson(s.engine, s.flops)},
           {"onednn", TimeJson(s.onednn, s.flops)},
           {"torch_padded", TimeJson(s.torch_padded, s.flops)},
           {"torch_packed", TimeJson(s.torch_packed, s.flops)},
           {"engine_over_onednn", RatioJson(s.engine.median, s.onednn.median)},
           {"engine_over_torch_padded",
            RatioJson(s.engine.median, s.torch_padded.median)},
           {"engine_over_torch_packed",
            RatioJson(s.engine.median, s.torch_packed.median)},
           {"max_abs_diff_engine_onednn", s.max_abs_diff},
           {"onednn_implementation", s.onednn_impl},
           {"onednn_weights_format", s.onednn_weights}});
    }
    doc["engine_batch64_vs_sgemm"] = json_fractions;
    doc["torch"] = {{"ran", torch.ran}, {"note", torch.note}};
    doc["unsteady"] = noisy;
    std::ofstream out(json_path);
    out << doc.dump(2) << "\n";
    if (!out) {
      std::fprintf(stderr, "cannot write %s\n", json_path.c_str());
      return 1;
    }
    std::printf("\nWrote %s\n", json_path.c_str());
  }
  return 0;
}

}  // namespace
}  // namespace rnnserve::bench

int main(int argc, char** argv) {
  try {
    return rnnserve::bench::Main(argc, argv);
  } catch (const dnnl::error& e) {
    std::fprintf(stderr, "oneDNN: %s (status %d)\n", e.what(),
                 static_cast<int>(e.status));
    return 1;
  }
}

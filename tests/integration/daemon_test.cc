// End-to-end tests of the rnnserve daemon. Each suite starts the real
// binary as a child process on a model repository built in a temporary
// folder, and talks to it the way users do: through the C++ client library,
// through rnnctl, and with the example model checked against PyTorch.
//
// The repository holds the example `brackets` model, `tiny` (a vector-input
// GRU small enough to recompute here in double precision) and a handful of
// models broken in the ways a real repository gets broken.

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/string_view.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "client/client.h"
#include "engine/codec.h"
#include "engine/safetensors.h"
#include "gmock/gmock.h"
#include "google/protobuf/text_format.h"
#include "google/protobuf/util/message_differencer.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "rnnserve/v1/net.pb.h"
#include "rnnserve/v1/service.pb.h"

extern char** environ;

namespace rnnserve {
namespace {

namespace fs = std::filesystem;
using ::google::protobuf::util::MessageDifferencer;
using ::testing::AnyOf;
using ::testing::ElementsAre;
using ::testing::ElementsAreArray;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

constexpr char kDaemonPath[] = RNNSERVE_BINARY_DIR "/server/rnnserve";
constexpr char kRnnctlPath[] = RNNSERVE_BINARY_DIR "/client/rnnctl";
constexpr char kExampleDir[] = RNNSERVE_SOURCE_DIR "/examples/models/brackets";
constexpr char kTaggerDir[] = RNNSERVE_SOURCE_DIR "/examples/models/tagger";
constexpr char kReferenceScript[] =
    RNNSERVE_SOURCE_DIR "/tools/reference_outputs.py";
constexpr char kPython[] = "/usr/bin/python3";
constexpr char kListeningPrefix[] = "rnnserve listening on ";

constexpr absl::Duration kStartTimeout = absl::Seconds(30);
constexpr absl::Duration kStopTimeout = absl::Seconds(10);

constexpr char kMissingExample[] =
    "examples/models/brackets is missing or not served; the example model "
    "must be trained and committed for this test";

// --- Files ----------------------------------------------------------------

void WriteFile(const fs::path& path, const std::string& contents) {
  fs::create_directories(path.parent_path());
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << contents;
  out.close();
  ASSERT_TRUE(out.good()) << "cannot write " << path;
}

std::string ReadFile(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

// The last `max_lines` lines of a file, for failure messages.
std::string Tail(const fs::path& path, size_t max_lines = 30) {
  std::vector<std::string> lines;
  std::ifstream in(path);
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  const size_t from = lines.size() > max_lines ? lines.size() - max_lines : 0;
  return absl::StrJoin(lines.begin() + from, lines.end(), "\n");
}

// A fresh folder under the test's temporary directory, removed with the
// object.
class TempFolder {
 public:
  TempFolder() {
    std::string pattern =
        (fs::path(::testing::TempDir()) / "rnnserve_daemon_test.XXXXXX")
            .string();
    if (mkdtemp(pattern.data()) == nullptr) {
      ADD_FAILURE() << "mkdtemp " << pattern << ": " << std::strerror(errno);
    }
    path_ = pattern;
  }
  ~TempFolder() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  TempFolder(const TempFolder&) = delete;
  TempFolder& operator=(const TempFolder&) = delete;

  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

// --- Processes ------------------------------------------------------------

// The daemon binary running as a child process. Its stdout comes back
// through a pipe (for the listening line); its stderr goes to a log file
// that failure messages quote.
class DaemonProcess {
 public:
  // Starts the daemon on `repository` with --grpc_port=0 and waits up to
  // kStartTimeout for its listening line. `environment` ("NAME=value")
  // adds to or overrides this process's environment.
  static absl::StatusOr<std::unique_ptr<DaemonProcess>> Start(
      const fs::path& repository, const fs::path& log_path,
      const std::vector<std::string>& environment = {}) {
    int fds[2];
    if (pipe2(fds, O_CLOEXEC) != 0) {
      return absl::ErrnoToStatus(errno, "pipe2");
    }
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_adddup2(&actions, fds[1], STDOUT_FILENO);
    posix_spawn_file_actions_addopen(&actions, STDERR_FILENO, log_path.c_str(),
                                     O_WRONLY | O_CREAT | O_TRUNC, 0644);
    std::vector<std::string> args = {
        kDaemonPath, "--model_repository=" + repository.string(),
        "--grpc_port=0"};
    std::vector<char*> argv;
    for (std::string& arg : args) argv.push_back(arg.data());
    argv.push_back(nullptr);
    std::vector<std::string> env = environment;
    for (char** entry = environ; *entry != nullptr; ++entry) {
      const absl::string_view name =
          absl::string_view(*entry).substr(0, std::strcspn(*entry, "="));
      const bool overridden = std::any_of(
          environment.begin(), environment.end(), [&](const std::string& e) {
            return absl::StartsWith(e, absl::StrCat(name, "="));
          });
      if (!overridden) env.push_back(*entry);
    }
    std::vector<char*> envp;
    for (std::string& entry : env) envp.push_back(entry.data());
    envp.push_back(nullptr);

    pid_t pid = 0;
    const int spawned = posix_spawn(&pid, kDaemonPath, &actions, nullptr,
                                    argv.data(), envp.data());
    posix_spawn_file_actions_destroy(&actions);
    close(fds[1]);
    if (spawned != 0) {
      close(fds[0]);
      return absl::ErrnoToStatus(spawned,
                                 absl::StrCat("posix_spawn ", kDaemonPath));
    }

    std::unique_ptr<DaemonProcess> daemon(
        new DaemonProcess(pid, fds[0], log_path));
    absl::StatusOr<std::string> line = daemon->ReadLine(kStartTimeout);
    if (!line.ok()) {
      return absl::Status(line.status().code(),
                          absl::StrCat(line.status().message(),
                                       "\ndaemon log:\n", Tail(log_path)));
    }
    if (!absl::StartsWith(*line, kListeningPrefix)) {
      return absl::InternalError(absl::StrCat(
          "the daemon's first line is '", *line, "', not '", kListeningPrefix,
          "HOST:PORT'\ndaemon log:\n", Tail(log_path)));
    }
    daemon->address_ = line->substr(std::strlen(kListeningPrefix));
    return daemon;
  }

  DaemonProcess(const DaemonProcess&) = delete;
  DaemonProcess& operator=(const DaemonProcess&) = delete;

  // A daemon still running here was not stopped by the test: kill it.
  ~DaemonProcess() {
    if (!exited_) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
    close(stdout_fd_);
  }

  const std::string& address() const { return address_; }
  const fs::path& log_path() const { return log_path_; }

  bool Running() {
    if (exited_) return false;
    int status = 0;
    if (waitpid(pid_, &status, WNOHANG) == pid_) {
      exited_ = true;
      status_ = status;
    }
    return !exited_;
  }

  void Signal(int signal_number) {
    if (!exited_) kill(pid_, signal_number);
  }

  // Waits for the process to end and returns its exit code. Past `timeout`
  // it is killed with SIGKILL and DEADLINE_EXCEEDED comes back; a process
  // ended by a signal is INTERNAL naming it.
  absl::StatusOr<int> WaitForExit(absl::Duration timeout) {
    const absl::Time deadline = absl::Now() + timeout;
    while (Running()) {
      if (absl::Now() > deadline) {
        kill(pid_, SIGKILL);
        waitpid(pid_, nullptr, 0);
        exited_ = true;
        return absl::DeadlineExceededError(absl::StrCat(
            "the daemon did not exit within ", absl::FormatDuration(timeout),
            " and was killed\ndaemon log:\n", Tail(log_path_)));
      }
      absl::SleepFor(absl::Milliseconds(10));
    }
    if (WIFSIGNALED(status_)) {
      return absl::InternalError(
          absl::StrCat("the daemon was ended by signal ", WTERMSIG(status_),
                       "\ndaemon log:\n", Tail(log_path_)));
    }
    return WEXITSTATUS(status_);
  }

  // SIGTERM, then WaitForExit.
  absl::StatusOr<int> Stop(absl::Duration timeout) {
    Signal(SIGTERM);
    return WaitForExit(timeout);
  }

 private:
  DaemonProcess(pid_t pid, int stdout_fd, fs::path log_path)
      : pid_(pid), stdout_fd_(stdout_fd), log_path_(std::move(log_path)) {}

  // Reads stdout up to the first newline.
  absl::StatusOr<std::string> ReadLine(absl::Duration timeout) {
    const absl::Time deadline = absl::Now() + timeout;
    std::string line;
    while (true) {
      const int64_t left = absl::ToInt64Milliseconds(deadline - absl::Now());
      if (left <= 0) {
        return absl::DeadlineExceededError(
            absl::StrCat("the daemon printed no listening line within ",
                         absl::FormatDuration(timeout), " (got '", line, "')"));
      }
      pollfd fd = {stdout_fd_, POLLIN, 0};
      const int ready = poll(&fd, 1, static_cast<int>(left));
      if (ready < 0 && errno != EINTR) {
        return absl::ErrnoToStatus(errno, "poll");
      }
      if (ready <= 0) continue;
      char c;
      const ssize_t n = read(stdout_fd_, &c, 1);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        absl::StatusOr<int> code = WaitForExit(absl::Seconds(5));
        return absl::InternalError(absl::StrCat(
            "the daemon closed its stdout before listening (exit: ",
            code.ok() ? absl::StrCat(*code) : code.status().ToString(), ")"));
      }
      if (c == '\n') return line;
      line.push_back(c);
    }
  }

  const pid_t pid_;
  const int stdout_fd_;
  const fs::path log_path_;
  std::string address_;
  bool exited_ = false;
  int status_ = 0;
};

struct CommandResult {
  int exit_code = -1;
  std::string output;  // stdout and stderr together
};

// Runs `command` with /bin/sh and collects its output.
CommandResult RunCommand(const std::string& command) {
  CommandResult result;
  FILE* pipe = popen((command + " 2>&1").c_str(), "r");
  if (pipe == nullptr) {
    result.output = absl::StrCat("popen: ", std::strerror(errno));
    return result;
  }
  char buffer[4096];
  size_t n;
  while ((n = fread(buffer, 1, sizeof(buffer), pipe)) > 0) {
    result.output.append(buffer, n);
  }
  const int status = pclose(pipe);
  if (status != -1 && WIFEXITED(status)) result.exit_code = WEXITSTATUS(status);
  return result;
}

// Quotes `arg` for /bin/sh.
std::string ShellQuote(const std::string& arg) {
  return absl::StrCat("'", absl::StrReplaceAll(arg, {{"'", "'\\''"}}), "'");
}

// --- Models built by the test ---------------------------------------------

engine::TensorToWrite F32Array(const std::string& name,
                               std::vector<int64_t> shape,
                               const std::vector<float>& values) {
  return engine::TensorToWrite{
      name, engine::DType::kF32, std::move(shape),
      std::string(reinterpret_cast<const char*>(values.data()),
                  values.size() * sizeof(float))};
}

std::vector<float> RandomValues(size_t count, float scale, std::mt19937* rng) {
  std::uniform_real_distribution<float> uniform(-scale, scale);
  std::vector<float> values(count);
  for (float& v : values) v = uniform(*rng);
  return values;
}

// `tiny`: vectors of width 3 -> GRU 4 -> SequenceLast -> Linear 2 ->
// Softmax, with two outputs: the classes and the GRU's last state.
constexpr int64_t kTinyWidth = 3;
constexpr int64_t kTinyState = 4;
constexpr int64_t kTinyClasses = 2;
constexpr int64_t kTinyMaxLength = 8;
constexpr int kTinyMaxBatch = 4;
constexpr int64_t kTinyParameters =
    3 * kTinyState * (kTinyWidth + kTinyState + 2) +
    kTinyClasses * (kTinyState + 1);
constexpr char kTinyInput[] = "signal";
constexpr char kTinyClassOutput[] = "level";
constexpr char kTinyStateOutput[] = "state";
const char* const kTinyLabels[] = {"quiet", "loud"};

constexpr char kTinyNet[] = R"(name: "tiny"
inputs { name: "signal" kind: VECTOR_SEQUENCE width: 3 }
layers { name: "gru" type: "GatedRecurrentLayer" size: 4 }
layers { name: "last" type: "SequenceLastLayer" }
layers { name: "linear" type: "LinearLayer" size: 2 }
layers { name: "softmax" type: "SoftmaxLayer" }
outputs {
  name: "level"
  decoder { class_decoder { labels: "quiet" labels: "loud" } }
}
outputs { name: "state" source: "last" }
)";

// The tiny net with its GRU's initial state as a second, VECTOR input, and
// the GRU's final state as a further output.
constexpr char kTinyStateNet[] = R"(name: "tiny_state"
inputs { name: "signal" kind: VECTOR_SEQUENCE width: 3 }
inputs { name: "h0" kind: VECTOR width: 4 }
layers { name: "gru" type: "GatedRecurrentLayer" size: 4
         inputs: "signal" inputs: "state=h0" }
layers { name: "last" type: "SequenceLastLayer" }
layers { name: "linear" type: "LinearLayer" size: 2 }
layers { name: "softmax" type: "SoftmaxLayer" }
outputs {
  name: "level"
  decoder { class_decoder { labels: "quiet" labels: "loud" } }
}
outputs { name: "final" source: "gru.state" }
)";

// A token input without an encoder. The net embeds each id and outputs the
// last of the elements after the first (SequenceRest, then SequenceLast);
// SequenceRest refuses a one-element sequence while the net runs.
constexpr char kTokensNet[] = R"(name: "tokens_rest"
inputs { name: "ids" kind: TOKEN_SEQUENCE vocab_size: 4 }
layers { name: "embedding" type: "EmbeddingLayer" size: 2 }
layers { name: "rest" type: "SequenceRestLayer" }
layers { name: "last" type: "SequenceLastLayer" }
outputs { name: "embedded" }
)";

constexpr char kTinyConfig[] = R"(description: "a GRU over 3-vectors"
max_sequence_length: 8
max_batch_size: 4
)";

struct TinyWeights {
  std::vector<float> weight_ih, weight_hh, bias_ih, bias_hh;
  std::vector<float> linear_weight, linear_bias;
};

const TinyWeights& Tiny() {
  static const TinyWeights* weights = [] {
    std::mt19937 rng(20240611);
    auto* w = new TinyWeights;
    const int64_t g = 3 * kTinyState;
    w->weight_ih = RandomValues(g * kTinyWidth, 1.0f, &rng);
    w->weight_hh = RandomValues(g * kTinyState, 1.0f, &rng);
    w->bias_ih = RandomValues(g, 0.5f, &rng);
    w->bias_hh = RandomValues(g, 0.5f, &rng);
    w->linear_weight = RandomValues(kTinyClasses * kTinyState, 2.0f, &rng);
    w->linear_bias = RandomValues(kTinyClasses, 0.5f, &rng);
    return w;
  }();
  return *weights;
}

// The tiny model's arrays; `linear_rows` other than 2 breaks its shape.
std::vector<engine::TensorToWrite> TinyArrays(int64_t linear_rows = 2) {
  const TinyWeights& w = Tiny();
  const int64_t g = 3 * kTinyState;
  std::vector<float> linear_weight = w.linear_weight;
  linear_weight.resize(linear_rows * kTinyState, 0.25f);
  return {F32Array("gru.weight_ih", {g, kTinyWidth}, w.weight_ih),
          F32Array("gru.weight_hh", {g, kTinyState}, w.weight_hh),
          F32Array("gru.bias_ih", {g}, w.bias_ih),
          F32Array("gru.bias_hh", {g}, w.bias_hh),
          F32Array("linear.weight", {linear_rows, kTinyState}, linear_weight),
          F32Array("linear.bias", {kTinyClasses}, w.linear_bias)};
}

struct TinyResult {
  std::vector<double> state;
  std::vector<double> probabilities;
};

double Sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

// The tiny net in double precision, written from PyTorch's GRU equations
// (gates r, z, n; the reset gate scales the recurrent product).
TinyResult TinyReference(const std::vector<float>& values) {
  const TinyWeights& w = Tiny();
  const int64_t h = kTinyState;
  std::vector<double> state(h, 0.0);
  for (size_t t = 0; t * kTinyWidth < values.size(); ++t) {
    const float* x = values.data() + t * kTinyWidth;
    std::vector<double> gi(3 * h), gh(3 * h);
    for (int64_t r = 0; r < 3 * h; ++r) {
      gi[r] = w.bias_ih[r];
      gh[r] = w.bias_hh[r];
      for (int64_t k = 0; k < kTinyWidth; ++k) {
        gi[r] += double{w.weight_ih[r * kTinyWidth + k]} * x[k];
      }
      for (int64_t k = 0; k < h; ++k) {
        gh[r] += double{w.weight_hh[r * h + k]} * state[k];
      }
    }
    for (int64_t j = 0; j < h; ++j) {
      const double reset = Sigmoid(gi[j] + gh[j]);
      const double update = Sigmoid(gi[h + j] + gh[h + j]);
      const double candidate = std::tanh(gi[2 * h + j] + reset * gh[2 * h + j]);
      state[j] = (1.0 - update) * candidate + update * state[j];
    }
  }
  TinyResult result;
  result.state = state;
  std::vector<double> logits(kTinyClasses);
  double peak = -std::numeric_limits<double>::infinity();
  for (int64_t c = 0; c < kTinyClasses; ++c) {
    logits[c] = w.linear_bias[c];
    for (int64_t k = 0; k < h; ++k) {
      logits[c] += double{w.linear_weight[c * h + k]} * state[k];
    }
    peak = std::max(peak, logits[c]);
  }
  double total = 0;
  for (double& l : logits) total += (l = std::exp(l - peak));
  for (double l : logits) result.probabilities.push_back(l / total);
  return result;
}

// A deterministic vector sequence of `length` elements for the tiny model.
std::vector<float> TinySequence(int64_t length, int salt) {
  std::vector<float> values(length * kTinyWidth);
  for (size_t k = 0; k < values.size(); ++k) {
    values[k] = static_cast<float>(std::sin(0.7 * k + 1.3 * salt));
  }
  return values;
}

// `slow`: a 256-wide LSTM over 4-vectors, for a request that takes long
// enough to be caught in flight.
constexpr int64_t kSlowWidth = 4;
constexpr int64_t kSlowState = 256;

constexpr char kSlowNet[] = R"(name: "slow"
inputs { name: "samples" kind: VECTOR_SEQUENCE width: 4 }
layers { name: "lstm" type: "LongShortTermMemoryLayer" size: 256 }
layers { name: "last" type: "SequenceLastLayer" }
layers { name: "linear" type: "LinearLayer" size: 2 }
layers { name: "softmax" type: "SoftmaxLayer" }
outputs { name: "class" decoder { class_decoder { labels: "a" labels: "b" } } }
)";

void WriteSlowModel(const fs::path& dir) {
  std::mt19937 rng(7);
  const int64_t g = 4 * kSlowState;
  const std::vector<engine::TensorToWrite> arrays = {
      F32Array("lstm.weight_ih", {g, kSlowWidth},
               RandomValues(g * kSlowWidth, 0.3f, &rng)),
      F32Array("lstm.weight_hh", {g, kSlowState},
               RandomValues(g * kSlowState, 0.06f, &rng)),
      F32Array("lstm.bias_ih", {g}, RandomValues(g, 0.1f, &rng)),
      F32Array("lstm.bias_hh", {g}, RandomValues(g, 0.1f, &rng)),
      F32Array("linear.weight", {2, kSlowState},
               RandomValues(2 * kSlowState, 0.1f, &rng)),
      F32Array("linear.bias", {2}, RandomValues(2, 0.1f, &rng))};
  ASSERT_NO_FATAL_FAILURE(
      WriteFile(dir / "config.pbtxt", "max_sequence_length: 1000000\n"));
  ASSERT_NO_FATAL_FAILURE(WriteFile(dir / "1" / "net.pbtxt", kSlowNet));
  const absl::Status written = engine::WriteSafetensors(
      (dir / "1" / "weights.safetensors").string(), arrays);
  ASSERT_TRUE(written.ok()) << written;
}

// Writes `model` with the tiny net and config: `net` replaces the net
// description, `arrays` the weights.
void WriteTinyLikeModel(const fs::path& repository, const std::string& model,
                        const std::string& net,
                        const std::vector<engine::TensorToWrite>& arrays) {
  const fs::path dir = repository / model;
  ASSERT_NO_FATAL_FAILURE(WriteFile(dir / "config.pbtxt", kTinyConfig));
  ASSERT_NO_FATAL_FAILURE(WriteFile(dir / "1" / "net.pbtxt", net));
  const absl::Status written = engine::WriteSafetensors(
      (dir / "1" / "weights.safetensors").string(), arrays);
  ASSERT_TRUE(written.ok()) << written;
}

// The models that fail to load, and a fragment of the reason each one must
// give besides the file it names.
struct BrokenModel {
  const char* name;
  const char* file;
  std::vector<std::string> reason_fragments;
};

const std::vector<BrokenModel>& BrokenModels() {
  static const auto* models = new std::vector<BrokenModel>{
      {"bad_header", "weights.safetensors", {"header is not valid JSON"}},
      {"bad_layer_type", "net.pbtxt", {"TeleporterLayer", "'warp'"}},
      {"bad_shape",
       "weights.safetensors",
       {"linear.weight", "[3, 4]", "[2, 4]"}},
      {"bad_syntax", "net.pbtxt:3:", {}},
      {"bad_device", "config.pbtxt", {"unknown device 'tpu:0'"}},
      {"bad_precision", "config.pbtxt", {"unknown precision 'fp8'"}},
      {"cpu_half", "config.pbtxt", {"precision fp16 needs a CUDA device"}},
      {"negative_budget",
       "config.pbtxt",
       {"device_memory_budget_bytes must not be negative"}},
      {"truncated_weights", "weights.safetensors", {"truncated"}},
  };
  return *models;
}

void WriteBrokenModels(const fs::path& repository) {
  // Weights cut short inside the data region.
  ASSERT_NO_FATAL_FAILURE(WriteTinyLikeModel(repository, "truncated_weights",
                                             kTinyNet, TinyArrays()));
  const fs::path truncated =
      repository / "truncated_weights" / "1" / "weights.safetensors";
  fs::resize_file(truncated, fs::file_size(truncated) - 40);

  // A header whose JSON starts with a byte that is not JSON.
  ASSERT_NO_FATAL_FAILURE(
      WriteTinyLikeModel(repository, "bad_header", kTinyNet, TinyArrays()));
  const fs::path header =
      repository / "bad_header" / "1" / "weights.safetensors";
  std::string bytes = ReadFile(header);
  ASSERT_GT(bytes.size(), 9u);
  ASSERT_EQ(bytes[8], '{');
  bytes[8] = '#';
  ASSERT_NO_FATAL_FAILURE(WriteFile(header, bytes));

  // linear.weight is [3, 4]; the net needs [2, 4].
  ASSERT_NO_FATAL_FAILURE(WriteTinyLikeModel(repository, "bad_shape", kTinyNet,
                                             TinyArrays(/*linear_rows=*/3)));

  // A layer type no engine knows.
  std::string unknown_layer = kTinyNet;
  unknown_layer = absl::StrReplaceAll(
      unknown_layer, {{"layers { name: \"last\"",
                       "layers { name: \"warp\" type: \"TeleporterLayer\" }\n"
                       "layers { name: \"last\""}});
  ASSERT_NO_FATAL_FAILURE(WriteTinyLikeModel(repository, "bad_layer_type",
                                             unknown_layer, TinyArrays()));

  // Line 3 lacks the ':' after a scalar field name.
  std::string syntax_error = kTinyNet;
  syntax_error = absl::StrReplaceAll(
      syntax_error,
      {{"layers { name: \"gru\" type:", "layers { name \"gru\" type:"}});
  ASSERT_NO_FATAL_FAILURE(
      WriteTinyLikeModel(repository, "bad_syntax", syntax_error, TinyArrays()));

  // Devices and precisions no build understands, reduced precision on the
  // CPU, and a negative memory budget.
  for (const auto& [name, config] :
       std::vector<std::pair<std::string, std::string>>{
           {"bad_device", "device: \"tpu:0\"\n"},
           {"bad_precision", "precision: \"fp8\"\n"},
           {"cpu_half", "device: \"cpu\"\nprecision: \"fp16\"\n"},
           {"negative_budget", "device_memory_budget_bytes: -1\n"}}) {
    ASSERT_NO_FATAL_FAILURE(
        WriteTinyLikeModel(repository, name, kTinyNet, TinyArrays()));
    ASSERT_NO_FATAL_FAILURE(
        WriteFile(repository / name / "config.pbtxt", kTinyConfig + config));
  }
}

// The tiny model on GPU 0: served where the build has the CUDA backend and
// the machine a GPU, refused with the reason everywhere else.
void WriteGpuModel(const fs::path& repository) {
  ASSERT_NO_FATAL_FAILURE(
      WriteTinyLikeModel(repository, "tiny_gpu", kTinyNet, TinyArrays()));
  ASSERT_NO_FATAL_FAILURE(
      WriteFile(repository / "tiny_gpu" / "config.pbtxt",
                absl::StrCat(kTinyConfig, "device: \"cuda:0\"\n")));
}

// --- Requests and checks --------------------------------------------------

v1::InferRequest TextRequest(const std::string& model,
                             const std::vector<std::string>& texts,
                             int top_k = 0) {
  v1::InferRequest request;
  request.set_model(model);
  request.set_top_k(top_k);
  for (const std::string& text : texts) {
    request.add_instances()->add_inputs()->set_text(text);
  }
  return request;
}

v1::InferRequest TokenRequest(const std::string& model,
                              const std::vector<std::vector<int64_t>>& seqs) {
  v1::InferRequest request;
  request.set_model(model);
  for (const std::vector<int64_t>& ids : seqs) {
    v1::TokenSequence* tokens =
        request.add_instances()->add_inputs()->mutable_tokens();
    tokens->mutable_ids()->Add(ids.begin(), ids.end());
  }
  return request;
}

v1::InferRequest VectorRequest(const std::string& model,
                               const std::vector<std::vector<float>>& seqs,
                               int64_t width = kTinyWidth) {
  v1::InferRequest request;
  request.set_model(model);
  for (const std::vector<float>& values : seqs) {
    v1::VectorSequence* vectors =
        request.add_instances()->add_inputs()->mutable_vectors();
    vectors->set_width(width);
    vectors->mutable_values()->Add(values.begin(), values.end());
  }
  return request;
}

// A well-formed request for the tiny model: three instances of different
// lengths.
std::vector<std::vector<float>> GoodTinySequences() {
  return {TinySequence(3, 1), TinySequence(kTinyMaxLength, 2),
          TinySequence(1, 3)};
}

void ExpectStatus(const absl::Status& status, absl::StatusCode code,
                  const std::vector<std::string>& fragments) {
  EXPECT_EQ(status.code(), code) << status;
  for (const std::string& fragment : fragments) {
    EXPECT_THAT(std::string(status.message()), HasSubstr(fragment))
        << "in " << status;
  }
}

// Checks one class result: one probability per label, summing to 1, and a
// decision, index and probability that name the most probable class.
void ExpectWellFormedClasses(const v1::ClassResult& result,
                             const std::vector<std::string>& labels) {
  ASSERT_EQ(result.probabilities_size(), static_cast<int>(labels.size()));
  double total = 0;
  for (float p : result.probabilities()) {
    EXPECT_GE(p, 0.0f);
    EXPECT_LE(p, 1.0f);
    total += p;
  }
  EXPECT_NEAR(total, 1.0, 1e-5);
  const auto best = std::max_element(result.probabilities().begin(),
                                     result.probabilities().end());
  const int64_t index = best - result.probabilities().begin();
  EXPECT_EQ(result.index(), index);
  EXPECT_EQ(result.decision(), labels[index]);
  EXPECT_EQ(result.probability(), *best);
}

// Checks a tiny-model response against TinyReference, instance by instance.
void ExpectTinyResponse(const v1::InferResponse& response,
                        const std::vector<std::vector<float>>& seqs,
                        const std::string& model = "tiny") {
  const std::vector<std::string> labels(std::begin(kTinyLabels),
                                        std::end(kTinyLabels));
  EXPECT_EQ(response.model(), model);
  EXPECT_EQ(response.version(), 1);
  ASSERT_EQ(response.results_size(), static_cast<int>(seqs.size()));
  for (size_t i = 0; i < seqs.size(); ++i) {
    SCOPED_TRACE(absl::StrCat("instance ", i));
    const TinyResult expected = TinyReference(seqs[i]);
    const v1::InstanceResult& result = response.results(i);
    ASSERT_EQ(result.outputs_size(), 2);

    const v1::OutputValue& level = result.outputs(0);
    EXPECT_EQ(level.name(), kTinyClassOutput);
    ASSERT_EQ(level.classes_size(), 1);
    ExpectWellFormedClasses(level.classes(0), labels);
    for (int c = 0; c < kTinyClasses; ++c) {
      EXPECT_NEAR(level.classes(0).probabilities(c), expected.probabilities[c],
                  1e-5);
    }

    const v1::OutputValue& state = result.outputs(1);
    EXPECT_EQ(state.name(), kTinyStateOutput);
    EXPECT_THAT(state.classes(), IsEmpty());
    EXPECT_THAT(state.tensor().shape(), ElementsAre(kTinyState));
    ASSERT_EQ(state.tensor().values_size(), kTinyState);
    for (int j = 0; j < kTinyState; ++j) {
      EXPECT_NEAR(state.tensor().values(j), expected.state[j], 1e-5);
    }
  }
}

std::string Differences(const google::protobuf::Message& a,
                        const google::protobuf::Message& b) {
  MessageDifferencer differencer;
  std::string report;
  differencer.ReportDifferencesToString(&report);
  return differencer.Compare(a, b) ? "" : report;
}

// --- The shared daemon ----------------------------------------------------

class DaemonTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    folder_ = new TempFolder();
    const fs::path repository = folder_->path() / "models";
    fs::create_directories(repository);
    ASSERT_NO_FATAL_FAILURE(
        WriteTinyLikeModel(repository, "tiny", kTinyNet, TinyArrays()));
    ASSERT_NO_FATAL_FAILURE(WriteTinyLikeModel(repository, "tiny_state",
                                               kTinyStateNet, TinyArrays()));
    ASSERT_NO_FATAL_FAILURE(WriteTinyLikeModel(
        repository, "tokens_rest", kTokensNet,
        {F32Array("embedding.weight", {4, 2}, {0, 1, 2, 3, 4, 5, 6, 7})}));
    ASSERT_NO_FATAL_FAILURE(WriteBrokenModels(repository));
    ASSERT_NO_FATAL_FAILURE(WriteGpuModel(repository));
    // A missing example is reported by the tests that need it, so that the
    // other tests still run.
    if (fs::exists(fs::path(kExampleDir))) {
      fs::copy(kExampleDir, repository / "brackets",
               fs::copy_options::recursive);
    }
    ASSERT_TRUE(fs::exists(fs::path(kTaggerDir)))
        << "examples/models/tagger is missing";
    fs::copy(kTaggerDir, repository / "tagger", fs::copy_options::recursive);

    absl::StatusOr<std::unique_ptr<DaemonProcess>> daemon =
        DaemonProcess::Start(repository, folder_->path() / "daemon.log");
    ASSERT_TRUE(daemon.ok()) << daemon.status();
    daemon_ = daemon->release();

    client::Client::Options options;
    options.target = daemon_->address();
    options.timeout = absl::Seconds(30);
    absl::StatusOr<std::unique_ptr<client::Client>> client =
        client::Client::Connect(options);
    ASSERT_TRUE(client.ok()) << client.status();
    client_ = client->release();

    absl::StatusOr<v1::ModelInfo> brackets = client_->GetModel("brackets");
    if (brackets.ok() && brackets->state() == v1::ModelInfo::READY) {
      brackets_ = new v1::ModelInfo(*std::move(brackets));
    }
  }

  static void TearDownTestSuite() {
    delete client_;
    client_ = nullptr;
    if (daemon_ != nullptr) {
      absl::StatusOr<int> code = daemon_->Stop(kStopTimeout);
      EXPECT_TRUE(code.ok()) << code.status();
      if (code.ok()) {
        EXPECT_EQ(*code, 0) << "daemon log:\n" << Tail(daemon_->log_path());
      }
      delete daemon_;
      daemon_ = nullptr;
    }
    delete brackets_;
    brackets_ = nullptr;
    delete folder_;
    folder_ = nullptr;
  }

  void SetUp() override {
    ASSERT_NE(client_, nullptr) << "the daemon did not start";
  }

  static client::Client& client() { return *client_; }
  static bool HasExample() { return brackets_ != nullptr; }
  static const v1::ModelInfo& Example() { return *brackets_; }
  static std::vector<std::string> ExampleLabels() {
    const auto& labels = brackets_->outputs(0).labels();
    return {labels.begin(), labels.end()};
  }
  static fs::path ExampleVersionDir() {
    return folder_->path() / "models" / "brackets" /
           absl::StrCat(brackets_->version());
  }

  // Encodes `text` with the example's own alphabet, as the server should.
  static std::vector<int64_t> EncodeForExample(const std::string& text) {
    v1::NetSpec spec;
    const std::string net = ReadFile(ExampleVersionDir() / "net.pbtxt");
    EXPECT_TRUE(google::protobuf::TextFormat::ParseFromString(net, &spec));
    auto encoder = engine::CharactersEncoder::Create(
        spec.inputs(0).encoder().characters(), spec.inputs(0).vocab_size());
    EXPECT_TRUE(encoder.ok()) << encoder.status();
    std::vector<int32_t> ids;
    if (encoder.ok()) {
      const absl::Status encoded = encoder->Encode(text, &ids);
      EXPECT_TRUE(encoded.ok()) << encoded;
    }
    return {ids.begin(), ids.end()};
  }

  // Checks that the daemon still answers a good request correctly.
  static void ExpectStillServes() {
    const std::vector<std::vector<float>> seqs = GoodTinySequences();
    absl::StatusOr<v1::InferResponse> response =
        client().Infer(VectorRequest("tiny", seqs));
    ASSERT_TRUE(response.ok())
        << "a good request after a bad one failed: " << response.status();
    ExpectTinyResponse(*response, seqs);
  }

  // Sends `request`, expects it refused with `code` and a message holding
  // every fragment, then checks that a good request is still served.
  static void ExpectRefused(const v1::InferRequest& request,
                            absl::StatusCode code,
                            const std::vector<std::string>& fragments) {
    SCOPED_TRACE(request.ShortDebugString().substr(0, 300));
    absl::StatusOr<v1::InferResponse> response = client().Infer(request);
    ASSERT_FALSE(response.ok()) << "expected " << absl::StatusCodeToString(code)
                                << " but the request was served";
    ExpectStatus(response.status(), code, fragments);
    ExpectStillServes();
  }

  static CommandResult Rnnctl(const std::string& arguments) {
    return RunCommand(absl::StrCat(kRnnctlPath, " --server ",
                                   daemon_->address(), " ", arguments));
  }

  static TempFolder* folder_;
  static DaemonProcess* daemon_;
  static client::Client* client_;
  static v1::ModelInfo* brackets_;
};

TempFolder* DaemonTest::folder_ = nullptr;
DaemonProcess* DaemonTest::daemon_ = nullptr;
client::Client* DaemonTest::client_ = nullptr;
v1::ModelInfo* DaemonTest::brackets_ = nullptr;

// --- Client library: health and models ------------------------------------

TEST_F(DaemonTest, HealthReportsServingForServerAndReadyModels) {
  absl::StatusOr<std::string> server = client().Health("");
  ASSERT_TRUE(server.ok()) << server.status();
  EXPECT_EQ(*server, "SERVING");

  absl::StatusOr<std::string> service = client().Health("rnnserve.v1.RnnServe");
  ASSERT_TRUE(service.ok()) << service.status();
  EXPECT_EQ(*service, "SERVING");

  absl::StatusOr<std::string> tiny = client().Health("tiny");
  ASSERT_TRUE(tiny.ok()) << tiny.status();
  EXPECT_EQ(*tiny, "SERVING");

  absl::StatusOr<std::string> broken = client().Health("bad_shape");
  ASSERT_TRUE(broken.ok()) << broken.status();
  EXPECT_EQ(*broken, "NOT_SERVING");
}

TEST_F(DaemonTest, ExampleModelIsServedWithCharacterInputAndLabels) {
  ASSERT_TRUE(HasExample()) << kMissingExample;
  EXPECT_EQ(Example().name(), "brackets");
  ASSERT_EQ(Example().inputs_size(), 1);
  EXPECT_EQ(Example().inputs(0).kind(), v1::TOKEN_SEQUENCE);
  EXPECT_EQ(Example().inputs(0).encoder(), "characters");
  EXPECT_GT(Example().inputs(0).vocab_size(), 0);
  ASSERT_EQ(Example().outputs_size(), 1);
  EXPECT_FALSE(Example().outputs(0).sequence());
  EXPECT_GE(Example().outputs(0).labels_size(), 2);
}

TEST_F(DaemonTest, ListModelsShowsEveryModelWithItsStateAndReason) {
  absl::StatusOr<v1::ListModelsResponse> list = client().ListModels();
  ASSERT_TRUE(list.ok()) << list.status();

  std::vector<std::string> expected = {"tiny", "tiny_state", "tiny_gpu",
                                       "tagger", "tokens_rest"};
  if (fs::exists(fs::path(kExampleDir))) expected.push_back("brackets");
  for (const BrokenModel& broken : BrokenModels()) {
    expected.push_back(broken.name);
  }
  std::sort(expected.begin(), expected.end());
  std::vector<std::string> names;
  for (const v1::ModelInfo& model : list->models()) {
    names.push_back(model.name());
  }
  EXPECT_THAT(names, ElementsAreArray(expected));

  for (const v1::ModelInfo& model : list->models()) {
    SCOPED_TRACE(model.name());
    if (model.name() == "tiny") {
      EXPECT_EQ(model.state(), v1::ModelInfo::READY);
      EXPECT_THAT(model.reason(), IsEmpty());
      EXPECT_EQ(model.version(), 1);
      EXPECT_THAT(model.versions(), ElementsAre(1));
      EXPECT_EQ(model.description(), "a GRU over 3-vectors");
      EXPECT_EQ(model.max_sequence_length(), kTinyMaxLength);
      EXPECT_EQ(model.max_batch_size(), kTinyMaxBatch);
      EXPECT_EQ(model.device(), "cpu");
      EXPECT_EQ(model.parameter_count(), kTinyParameters);
      EXPECT_THAT(model.layers(),
                  ElementsAre("GatedRecurrentLayer", "SequenceLastLayer",
                              "LinearLayer", "SoftmaxLayer"));
      ASSERT_EQ(model.inputs_size(), 1);
      EXPECT_EQ(model.inputs(0).name(), kTinyInput);
      EXPECT_EQ(model.inputs(0).kind(), v1::VECTOR_SEQUENCE);
      EXPECT_EQ(model.inputs(0).width(), kTinyWidth);
      EXPECT_TRUE(model.inputs(0).sequence());
      EXPECT_THAT(model.inputs(0).encoder(), IsEmpty());
      ASSERT_EQ(model.outputs_size(), 2);
      EXPECT_EQ(model.outputs(0).name(), kTinyClassOutput);
      EXPECT_EQ(model.outputs(0).width(), kTinyClasses);
      EXPECT_FALSE(model.outputs(0).sequence());
      EXPECT_THAT(model.outputs(0).labels(), ElementsAreArray(kTinyLabels));
      EXPECT_EQ(model.outputs(1).name(), kTinyStateOutput);
      EXPECT_EQ(model.outputs(1).width(), kTinyState);
      EXPECT_THAT(model.outputs(1).labels(), IsEmpty());
    } else if (model.name() == "brackets") {
      EXPECT_EQ(model.state(), v1::ModelInfo::READY) << model.reason();
      ASSERT_EQ(model.inputs_size(), 1);
      EXPECT_EQ(model.inputs(0).encoder(), "characters");
      ASSERT_EQ(model.outputs_size(), 1);
      EXPECT_GE(model.outputs(0).labels_size(), 2);
    } else if (model.name() == "tiny_state") {
      EXPECT_EQ(model.state(), v1::ModelInfo::READY) << model.reason();
      ASSERT_EQ(model.inputs_size(), 2);
      EXPECT_EQ(model.inputs(1).name(), "h0");
      EXPECT_EQ(model.inputs(1).kind(), v1::VECTOR);
      EXPECT_FALSE(model.inputs(1).sequence());
      ASSERT_EQ(model.outputs_size(), 2);
      EXPECT_EQ(model.outputs(1).name(), "final");
    } else if (model.name() == "tokens_rest") {
      EXPECT_EQ(model.state(), v1::ModelInfo::READY) << model.reason();
      ASSERT_EQ(model.inputs_size(), 1);
      EXPECT_EQ(model.inputs(0).kind(), v1::TOKEN_SEQUENCE);
      EXPECT_THAT(model.inputs(0).encoder(), IsEmpty());
    } else if (model.name() == "tiny_gpu") {
      EXPECT_EQ(model.device(), "cuda:0");
      EXPECT_EQ(model.precision(), "fp32");
    } else if (model.name() == "tagger") {
      EXPECT_EQ(model.state(), v1::ModelInfo::READY) << model.reason();
      EXPECT_EQ(model.inputs(0).encoder(), "characters");
      ASSERT_EQ(model.outputs_size(), 1);
      EXPECT_TRUE(model.outputs(0).sequence());
      EXPECT_EQ(model.outputs(0).labels_size(), 4);
    } else {
      EXPECT_EQ(model.state(), v1::ModelInfo::FAILED);
      EXPECT_THAT(model.inputs(), IsEmpty());
      EXPECT_THAT(model.outputs(), IsEmpty());
    }
  }

  for (const BrokenModel& broken : BrokenModels()) {
    SCOPED_TRACE(broken.name);
    auto it = std::find_if(
        list->models().begin(), list->models().end(),
        [&](const v1::ModelInfo& m) { return m.name() == broken.name; });
    ASSERT_NE(it, list->models().end());
    EXPECT_THAT(it->reason(), HasSubstr(broken.file));
    for (const std::string& fragment : broken.reason_fragments) {
      EXPECT_THAT(it->reason(), HasSubstr(fragment));
    }
  }
}

TEST_F(DaemonTest, GetModelDescribesReadyAndFailedModels) {
  absl::StatusOr<v1::ModelInfo> tiny = client().GetModel("tiny");
  ASSERT_TRUE(tiny.ok()) << tiny.status();
  EXPECT_EQ(tiny->state(), v1::ModelInfo::READY);
  EXPECT_EQ(tiny->version(), 1);
  ASSERT_EQ(tiny->outputs_size(), 2);
  EXPECT_THAT(tiny->outputs(0).labels(), ElementsAreArray(kTinyLabels));

  absl::StatusOr<v1::ModelInfo> pinned = client().GetModel("tiny", 1);
  ASSERT_TRUE(pinned.ok()) << pinned.status();
  EXPECT_EQ(Differences(*pinned, *tiny), "");

  for (const BrokenModel& broken : BrokenModels()) {
    SCOPED_TRACE(broken.name);
    absl::StatusOr<v1::ModelInfo> info = client().GetModel(broken.name);
    ASSERT_TRUE(info.ok()) << info.status();
    EXPECT_EQ(info->state(), v1::ModelInfo::FAILED);
    EXPECT_THAT(info->reason(), HasSubstr(broken.file));
  }
}

TEST_F(DaemonTest, GetModelRefusesUnknownModelAndVersionWithNotFound) {
  absl::StatusOr<v1::ModelInfo> unknown = client().GetModel("no_such_model");
  ExpectStatus(unknown.status(), absl::StatusCode::kNotFound,
               {"no_such_model"});

  absl::StatusOr<v1::ModelInfo> version = client().GetModel("tiny", 7);
  ExpectStatus(version.status(), absl::StatusCode::kNotFound,
               {"tiny", "version 7"});
}

// --- Client library: inference --------------------------------------------

TEST_F(DaemonTest, InferTextReturnsDecisionAndProbabilities) {
  ASSERT_TRUE(HasExample()) << kMissingExample;
  absl::StatusOr<v1::InferResponse> response =
      client().InferText("brackets", "([]{})");
  ASSERT_TRUE(response.ok()) << response.status();
  EXPECT_EQ(response->model(), "brackets");
  EXPECT_EQ(response->version(), Example().version());
  ASSERT_EQ(response->results_size(), 1);
  ASSERT_EQ(response->results(0).outputs_size(), 1);
  const v1::OutputValue& output = response->results(0).outputs(0);
  EXPECT_EQ(output.name(), Example().outputs(0).name());
  ASSERT_EQ(output.classes_size(), 1);
  ExpectWellFormedClasses(output.classes(0), ExampleLabels());
  EXPECT_THAT(output.classes(0).top(), IsEmpty());
}

TEST_F(DaemonTest, InferTokensGivesExactlyWhatTheSameTextGives) {
  ASSERT_TRUE(HasExample()) << kMissingExample;
  const std::string text = "{[()]}(";
  absl::StatusOr<v1::InferResponse> by_text =
      client().Infer(TextRequest("brackets", {text}));
  ASSERT_TRUE(by_text.ok()) << by_text.status();
  absl::StatusOr<v1::InferResponse> by_tokens =
      client().Infer(TokenRequest("brackets", {EncodeForExample(text)}));
  ASSERT_TRUE(by_tokens.ok()) << by_tokens.status();
  EXPECT_EQ(Differences(*by_tokens, *by_text), "");
}

TEST_F(DaemonTest, InferVectorsMatchesAnIndependentComputation) {
  const std::vector<std::vector<float>> seqs = {TinySequence(5, 11)};
  absl::StatusOr<v1::InferResponse> response =
      client().Infer(VectorRequest("tiny", seqs));
  ASSERT_TRUE(response.ok()) << response.status();
  ExpectTinyResponse(*response, seqs);
}

TEST_F(DaemonTest, BatchedInstancesEqualTheSameInstancesSentAlone) {
  // Vectors of every length up to the model's limit, in one request each
  // and then batched, in an order that is not sorted by length.
  const std::vector<std::vector<float>> seqs = {
      TinySequence(2, 21), TinySequence(kTinyMaxLength, 22),
      TinySequence(1, 23), TinySequence(5, 24)};
  absl::StatusOr<v1::InferResponse> batched =
      client().Infer(VectorRequest("tiny", seqs));
  ASSERT_TRUE(batched.ok()) << batched.status();
  ExpectTinyResponse(*batched, seqs);
  for (size_t i = 0; i < seqs.size(); ++i) {
    absl::StatusOr<v1::InferResponse> alone =
        client().Infer(VectorRequest("tiny", {seqs[i]}));
    ASSERT_TRUE(alone.ok()) << alone.status();
    EXPECT_EQ(Differences(alone->results(0), batched->results(i)), "")
        << "tiny instance " << i;
  }

  ASSERT_TRUE(HasExample()) << kMissingExample;
  const std::vector<std::string> nonempty = {
      "(", "([{}])", "{[()()]}[](", ")(", "[[[[((((]]]]))))", "}"};
  absl::StatusOr<v1::InferResponse> texts_batched =
      client().Infer(TextRequest("brackets", nonempty, /*top_k=*/2));
  ASSERT_TRUE(texts_batched.ok()) << texts_batched.status();
  ASSERT_EQ(texts_batched->results_size(), static_cast<int>(nonempty.size()));
  for (size_t i = 0; i < nonempty.size(); ++i) {
    absl::StatusOr<v1::InferResponse> alone =
        client().Infer(TextRequest("brackets", {nonempty[i]}, /*top_k=*/2));
    ASSERT_TRUE(alone.ok()) << alone.status();
    EXPECT_EQ(Differences(alone->results(0), texts_batched->results(i)), "")
        << "brackets text '" << nonempty[i] << "'";
  }
}

TEST_F(DaemonTest, TopKListsTheMostProbableClassesInOrder) {
  ASSERT_TRUE(HasExample()) << kMissingExample;
  const std::vector<std::string> labels = ExampleLabels();
  for (int top_k : {1, 2, 100}) {
    SCOPED_TRACE(absl::StrCat("top_k ", top_k));
    absl::StatusOr<v1::InferResponse> response =
        client().InferText("brackets", "[(])", top_k);
    ASSERT_TRUE(response.ok()) << response.status();
    const v1::ClassResult& result = response->results(0).outputs(0).classes(0);
    ExpectWellFormedClasses(result, labels);
    const int expected = std::min<int>(top_k, static_cast<int>(labels.size()));
    ASSERT_EQ(result.top_size(), expected);
    EXPECT_EQ(result.top(0).label(), result.decision());
    EXPECT_EQ(result.top(0).index(), result.index());
    for (int k = 0; k < result.top_size(); ++k) {
      const v1::ClassProbability& entry = result.top(k);
      ASSERT_GE(entry.index(), 0);
      ASSERT_LT(entry.index(), static_cast<int64_t>(labels.size()));
      EXPECT_EQ(entry.label(), labels[entry.index()]);
      EXPECT_EQ(entry.probability(), result.probabilities(entry.index()));
      if (k > 0) {
        EXPECT_GE(result.top(k - 1).probability(), entry.probability());
      }
    }
  }
}

TEST_F(DaemonTest, NamedOutputsAreTheOnlyOnesReturned) {
  v1::InferRequest request = VectorRequest("tiny", {TinySequence(4, 31)});
  request.add_outputs(kTinyStateOutput);
  absl::StatusOr<v1::InferResponse> response = client().Infer(request);
  ASSERT_TRUE(response.ok()) << response.status();
  ASSERT_EQ(response->results(0).outputs_size(), 1);
  EXPECT_EQ(response->results(0).outputs(0).name(), kTinyStateOutput);
  EXPECT_THAT(response->results(0).outputs(0).tensor().shape(),
              ElementsAre(kTinyState));
}

// --- Bad requests: each is refused precisely and the next one served ------

TEST_F(DaemonTest, UnknownModelIsNotFound) {
  ExpectRefused(TextRequest("no_such_model", {"()"}),
                absl::StatusCode::kNotFound, {"no_such_model"});
}

TEST_F(DaemonTest, UnknownVersionIsNotFound) {
  v1::InferRequest request = VectorRequest("tiny", {TinySequence(2, 1)});
  request.set_version(9);
  ExpectRefused(request, absl::StatusCode::kNotFound, {"version 9"});
}

TEST_F(DaemonTest, MissingModelNameOrNegativeVersionIsInvalid) {
  ExpectRefused(VectorRequest("", {TinySequence(2, 1)}),
                absl::StatusCode::kInvalidArgument, {"model"});
  v1::InferRequest request = VectorRequest("tiny", {TinySequence(2, 1)});
  request.set_version(-2);
  ExpectRefused(request, absl::StatusCode::kInvalidArgument, {"-2"});
}

TEST_F(DaemonTest, InferOnFailedModelIsFailedPreconditionWithTheReason) {
  for (const BrokenModel& broken : BrokenModels()) {
    SCOPED_TRACE(broken.name);
    std::vector<std::string> fragments = {broken.name, broken.file};
    fragments.insert(fragments.end(), broken.reason_fragments.begin(),
                     broken.reason_fragments.end());
    ExpectRefused(VectorRequest(broken.name, {TinySequence(2, 1)}),
                  absl::StatusCode::kFailedPrecondition, fragments);
  }
}

TEST_F(DaemonTest, GpuModelIsServedLikeTheCpuOneOrRefusedWithTheReason) {
  absl::StatusOr<v1::ModelInfo> info = client().GetModel("tiny_gpu");
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->device(), "cuda:0");
  const std::vector<std::vector<float>> seqs = GoodTinySequences();
  if (info->state() == v1::ModelInfo::READY) {
    // A GPU is here: the same answers as the CPU model, within 1e-5.
    EXPECT_GT(info->device_memory_bytes(), 0);
    absl::StatusOr<v1::InferResponse> gpu =
        client().Infer(VectorRequest("tiny_gpu", seqs));
    ASSERT_TRUE(gpu.ok()) << gpu.status();
    ExpectTinyResponse(*gpu, seqs, "tiny_gpu");
    return;
  }
  // No usable GPU or no CUDA backend: the reason says which, and names the
  // device; requests get FAILED_PRECONDITION with it.
  EXPECT_THAT(info->reason(), HasSubstr("device cuda:0: "));
  EXPECT_THAT(info->reason(),
              AnyOf(HasSubstr("cudaGetDeviceCount failed"),
                    HasSubstr("no CUDA device"), HasSubstr("no CUDA backend")));
  ExpectRefused(VectorRequest("tiny_gpu", seqs),
                absl::StatusCode::kFailedPrecondition,
                {"tiny_gpu", "device cuda:0"});
}

TEST(DaemonFlagsTest, UnknownDeviceFlagExitsTwoNamingIt) {
  TempFolder folder;
  CommandResult result = RunCommand(absl::StrCat(
      kDaemonPath, " --model_repository=", ShellQuote(folder.path().string()),
      " --device=tpu:0"));
  EXPECT_EQ(result.exit_code, 2) << result.output;
  EXPECT_THAT(result.output, HasSubstr("--device: unknown device 'tpu:0'"));
}

TEST_F(DaemonTest, EmptySequencesAreInvalid) {
  ExpectRefused(VectorRequest("tiny", {{}}), absl::StatusCode::kInvalidArgument,
                {"empty"});
  ASSERT_TRUE(HasExample()) << kMissingExample;
  ExpectRefused(TextRequest("brackets", {""}),
                absl::StatusCode::kInvalidArgument, {"empty"});
  ExpectRefused(TokenRequest("brackets", {{}}),
                absl::StatusCode::kInvalidArgument, {"empty"});
}

TEST_F(DaemonTest, TokenIdsOutOfRangeAreInvalidAndNamed) {
  ASSERT_TRUE(HasExample()) << kMissingExample;
  const int64_t vocab = Example().inputs(0).vocab_size();
  ExpectRefused(TokenRequest("brackets", {{0, 1, -1, 0}}),
                absl::StatusCode::kInvalidArgument,
                {"token id -1", "position 2"});
  ExpectRefused(TokenRequest("brackets", {{0, vocab}}),
                absl::StatusCode::kInvalidArgument,
                {absl::StrCat("token id ", vocab), absl::StrCat(vocab, ")")});
  // The last valid id is served.
  absl::StatusOr<v1::InferResponse> last =
      client().Infer(TokenRequest("brackets", {{vocab - 1, 0}}));
  EXPECT_TRUE(last.ok()) << last.status();
}

TEST_F(DaemonTest, VectorsOfTheWrongWidthAreInvalidAndNameBothWidths) {
  ExpectRefused(VectorRequest("tiny", {std::vector<float>(10, 0.5f)},
                              /*width=*/5),
                absl::StatusCode::kInvalidArgument, {"width 3", "width 5"});
  ExpectRefused(VectorRequest("tiny", {std::vector<float>(3, 0.5f)},
                              /*width=*/0),
                absl::StatusCode::kInvalidArgument, {"width 3", "width 0"});
}

TEST_F(DaemonTest, ValueCountNotAMultipleOfTheWidthIsInvalid) {
  ExpectRefused(VectorRequest("tiny", {std::vector<float>(7, 0.5f)}),
                absl::StatusCode::kInvalidArgument, {"7 values", "width 3"});
}

TEST_F(DaemonTest, NonFiniteValuesAreInvalid) {
  const float kNaN = std::numeric_limits<float>::quiet_NaN();
  const float kInf = std::numeric_limits<float>::infinity();
  std::vector<float> nan_values = TinySequence(3, 1);
  nan_values[4] = kNaN;  // element 1 of vector 1
  ExpectRefused(VectorRequest("tiny", {nan_values}),
                absl::StatusCode::kInvalidArgument, {"nan", "finite"});
  std::vector<float> inf_values = TinySequence(3, 1);
  inf_values[6] = kInf;  // element 0 of vector 2
  ExpectRefused(VectorRequest("tiny", {TinySequence(2, 5), inf_values}),
                absl::StatusCode::kInvalidArgument,
                {"instance 1", "inf", "finite"});
}

TEST_F(DaemonTest, SequenceOverTheMaxLengthIsInvalidAndNamesTheLimit) {
  ExpectRefused(VectorRequest("tiny", {TinySequence(kTinyMaxLength + 1, 1)}),
                absl::StatusCode::kInvalidArgument,
                {absl::StrCat(kTinyMaxLength + 1),
                 absl::StrCat("at most ", kTinyMaxLength)});
  // Exactly the limit is served.
  const std::vector<std::vector<float>> at_limit = {
      TinySequence(kTinyMaxLength, 1)};
  absl::StatusOr<v1::InferResponse> response =
      client().Infer(VectorRequest("tiny", at_limit));
  ASSERT_TRUE(response.ok()) << response.status();
  ExpectTinyResponse(*response, at_limit);
}

TEST_F(DaemonTest, TextWithACharacterOutsideTheAlphabetIsInvalidAndNamed) {
  ASSERT_TRUE(HasExample()) << kMissingExample;
  ExpectRefused(TextRequest("brackets", {"(()", "([%])"}),
                absl::StatusCode::kInvalidArgument,
                {"instance 1", "'%'", "position 2"});
}

TEST_F(DaemonTest, TextOrTokensForAVectorInputAreInvalid) {
  ExpectRefused(TextRequest("tiny", {"abc"}),
                absl::StatusCode::kInvalidArgument, {kTinyInput, "text"});
  ExpectRefused(TokenRequest("tiny", {{1, 2}}),
                absl::StatusCode::kInvalidArgument, {kTinyInput, "token"});
}

TEST_F(DaemonTest, TextOrVectorsForATokenInputAreInvalid) {
  ExpectRefused(TextRequest("tokens_rest", {"ab"}),
                absl::StatusCode::kInvalidArgument,
                {"input 'ids' takes no text", "send a token sequence"});
  ExpectRefused(VectorRequest("tokens_rest", {{0.5f, 0.5f}}, /*width=*/2),
                absl::StatusCode::kInvalidArgument,
                {"input 'ids' takes token ids, not vectors"});
  ASSERT_TRUE(HasExample()) << kMissingExample;
  ExpectRefused(VectorRequest("brackets", {{0.5f, 0.5f}}, /*width=*/2),
                absl::StatusCode::kInvalidArgument,
                {"takes token ids or text, not vectors"});
}

// A refusal that only the running net can make (its layer needs two
// elements) names the layer and the instance, and fails only that request.
TEST_F(DaemonTest, SequenceTooShortForALayerIsInvalidAndNamed) {
  ExpectRefused(TokenRequest("tokens_rest", {{1, 2, 3}, {2}}),
                absl::StatusCode::kInvalidArgument,
                {"layer 'rest' (SequenceRestLayer)", "at least 2 elements",
                 "instance 1 has 1"});
  absl::StatusOr<v1::InferResponse> served =
      client().Infer(TokenRequest("tokens_rest", {{1, 2, 3}, {3, 0}}));
  ASSERT_TRUE(served.ok()) << served.status();
  ASSERT_EQ(served->results_size(), 2);
  // Rows of embedding.weight: id 3 is {6, 7}, id 0 is {0, 1}.
  EXPECT_THAT(served->results(0).outputs(0).tensor().values(),
              ElementsAre(6.0f, 7.0f));
  EXPECT_THAT(served->results(1).outputs(0).tensor().values(),
              ElementsAre(0.0f, 1.0f));
}

TEST_F(DaemonTest, RequestWithoutInstancesIsInvalid) {
  v1::InferRequest request;
  request.set_model("tiny");
  ExpectRefused(request, absl::StatusCode::kInvalidArgument, {"no instances"});
}

TEST_F(DaemonTest, MoreInstancesThanMaxBatchSizeIsInvalid) {
  const std::vector<std::vector<float>> too_many(kTinyMaxBatch + 1,
                                                 TinySequence(2, 1));
  ExpectRefused(VectorRequest("tiny", too_many),
                absl::StatusCode::kInvalidArgument,
                {absl::StrCat(kTinyMaxBatch + 1, " instances"),
                 absl::StrCat("at most ", kTinyMaxBatch)});
  // Exactly max_batch_size is served.
  const std::vector<std::vector<float>> at_limit(kTinyMaxBatch,
                                                 TinySequence(2, 1));
  absl::StatusOr<v1::InferResponse> response =
      client().Infer(VectorRequest("tiny", at_limit));
  ASSERT_TRUE(response.ok()) << response.status();
  ExpectTinyResponse(*response, at_limit);
}

TEST_F(DaemonTest, UnknownInputNameIsInvalid) {
  v1::InferRequest request = VectorRequest("tiny", {TinySequence(2, 1)});
  request.mutable_instances(0)->mutable_inputs(0)->set_name("sound");
  ExpectRefused(request, absl::StatusCode::kInvalidArgument,
                {"'sound'", kTinyInput});
}

TEST_F(DaemonTest, MissingOrRepeatedInputValueIsInvalid) {
  v1::InferRequest no_value = VectorRequest("tiny", {TinySequence(2, 1)});
  no_value.add_instances()->add_inputs()->set_name(kTinyInput);
  ExpectRefused(no_value, absl::StatusCode::kInvalidArgument,
                {"instance 1", kTinyInput});

  v1::InferRequest no_input = VectorRequest("tiny", {TinySequence(2, 1)});
  no_input.add_instances();
  ExpectRefused(no_input, absl::StatusCode::kInvalidArgument,
                {"instance 1", kTinyInput});

  v1::InferRequest twice = VectorRequest("tiny", {TinySequence(2, 1)});
  *twice.mutable_instances(0)->add_inputs() = twice.instances(0).inputs(0);
  ExpectRefused(twice, absl::StatusCode::kInvalidArgument,
                {"instance 0", "twice"});
}

TEST_F(DaemonTest, UnknownOutputNameIsInvalid) {
  v1::InferRequest request = VectorRequest("tiny", {TinySequence(2, 1)});
  request.add_outputs("loudness");
  ExpectRefused(request, absl::StatusCode::kInvalidArgument,
                {"'loudness'", kTinyClassOutput});
}

TEST_F(DaemonTest, NegativeTopKIsInvalid) {
  v1::InferRequest request = VectorRequest("tiny", {TinySequence(2, 1)});
  request.set_top_k(-3);
  ExpectRefused(request, absl::StatusCode::kInvalidArgument, {"top_k", "-3"});
}

// --- Concurrency ----------------------------------------------------------

TEST_F(DaemonTest, ConcurrentGoodAndBadRequestsEachGetTheirOwnAnswer) {
  ASSERT_TRUE(HasExample()) << kMissingExample;
  struct Case {
    v1::InferRequest request;
    absl::StatusCode code;
    v1::InferResponse expected;  // when code is OK
  };
  std::vector<Case> cases = {
      {TextRequest("brackets", {"(([]){})"}), absl::StatusCode::kOk, {}},
      {VectorRequest("tiny", GoodTinySequences()), absl::StatusCode::kOk, {}},
      {TokenRequest("brackets", {{0, 99999}}),
       absl::StatusCode::kInvalidArgument,
       {}},
      {TextRequest("brackets", {"{}", "([)]", "((((((((((((", "]"}, 1),
       absl::StatusCode::kOk,
       {}},
      {VectorRequest("tiny", {std::vector<float>(8, 1.0f)}, 4),
       absl::StatusCode::kInvalidArgument,
       {}},
      {TextRequest("no_such_model", {"()"}), absl::StatusCode::kNotFound, {}},
      {VectorRequest("bad_shape", {TinySequence(1, 1)}),
       absl::StatusCode::kFailedPrecondition,
       {}},
  };
  // The answers to the good requests, asked one at a time.
  for (Case& c : cases) {
    if (c.code != absl::StatusCode::kOk) continue;
    absl::StatusOr<v1::InferResponse> response = client().Infer(c.request);
    ASSERT_TRUE(response.ok()) << response.status();
    c.expected = *std::move(response);
  }

  constexpr int kThreads = 4;
  constexpr int kRequestsPerThread = 50;
  std::vector<std::vector<std::string>> problems(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int r = 0; r < kRequestsPerThread; ++r) {
        const Case& c = cases[(t * 3 + r) % cases.size()];
        absl::StatusOr<v1::InferResponse> response = client().Infer(c.request);
        std::string problem;
        if (response.status().code() != c.code) {
          problem = absl::StrCat("wanted ", absl::StatusCodeToString(c.code),
                                 ", got ", response.status().ToString());
        } else if (response.ok()) {
          problem = Differences(*response, c.expected);
        }
        if (!problem.empty()) {
          problems[t].push_back(
              absl::StrCat("thread ", t, " request ", r, ": ", problem));
        }
      }
    });
  }
  for (std::thread& thread : threads) thread.join();

  std::vector<std::string> all;
  for (const auto& p : problems) all.insert(all.end(), p.begin(), p.end());
  EXPECT_THAT(all, IsEmpty()) << absl::StrJoin(all, "\n");
  ExpectStillServes();
}

// --- rnnctl ---------------------------------------------------------------

TEST_F(DaemonTest, RnnctlListNamesEveryModel) {
  const CommandResult list = Rnnctl("list");
  EXPECT_EQ(list.exit_code, 0) << list.output;
  EXPECT_THAT(list.output, HasSubstr("tiny"));
  EXPECT_THAT(list.output, HasSubstr("READY"));
  for (const BrokenModel& broken : BrokenModels()) {
    EXPECT_THAT(list.output, HasSubstr(broken.name));
  }
  EXPECT_THAT(list.output, HasSubstr("FAILED"));
  ASSERT_TRUE(HasExample()) << kMissingExample;
  EXPECT_THAT(list.output, HasSubstr("brackets"));
}

TEST_F(DaemonTest, RnnctlGetShowsTheLabels) {
  ASSERT_TRUE(HasExample()) << kMissingExample;
  const CommandResult get = Rnnctl("get brackets");
  EXPECT_EQ(get.exit_code, 0) << get.output;
  for (const std::string& label : ExampleLabels()) {
    EXPECT_THAT(get.output, HasSubstr(label));
  }
  EXPECT_THAT(get.output, ::testing::ContainsRegex("device +cpu"));
  EXPECT_THAT(get.output, ::testing::ContainsRegex("precision +fp32"));
}

TEST_F(DaemonTest, RnnctlInferPrintsTheDecision) {
  ASSERT_TRUE(HasExample()) << kMissingExample;
  absl::StatusOr<v1::InferResponse> expected =
      client().InferText("brackets", "(())");
  ASSERT_TRUE(expected.ok()) << expected.status();
  const std::string decision =
      expected->results(0).outputs(0).classes(0).decision();

  const CommandResult infer = Rnnctl("infer brackets " + ShellQuote("(())"));
  EXPECT_EQ(infer.exit_code, 0) << infer.output;
  EXPECT_THAT(infer.output, HasSubstr(": " + decision + " ("));
}

TEST_F(DaemonTest, RnnctlInferJsonCarriesTheProbabilities) {
  ASSERT_TRUE(HasExample()) << kMissingExample;
  const CommandResult infer =
      Rnnctl("infer brackets " + ShellQuote("([)]") + " --json");
  EXPECT_EQ(infer.exit_code, 0) << infer.output;
  EXPECT_THAT(infer.output, HasSubstr("\"probabilities\""));
}

TEST_F(DaemonTest, RnnctlInferOnAnUnknownModelExitsOneWithNotFound) {
  const CommandResult infer = Rnnctl("infer no_such_model " + ShellQuote("()"));
  EXPECT_EQ(infer.exit_code, 1) << infer.output;
  EXPECT_THAT(infer.output, HasSubstr("NOT_FOUND"));
  EXPECT_THAT(infer.output, HasSubstr("no_such_model"));
}

TEST_F(DaemonTest, RnnctlHealthPrintsServing) {
  const CommandResult health = Rnnctl("health");
  EXPECT_EQ(health.exit_code, 0) << health.output;
  EXPECT_THAT(health.output, HasSubstr("SERVING"));
}

// --- The example against PyTorch -----------------------------------------

TEST_F(DaemonTest, ExampleModelMatchesPyTorchOnHeldOutStrings) {
  ASSERT_TRUE(HasExample()) << kMissingExample;
  const fs::path reference = folder_->path() / "reference.json";
  const CommandResult script = RunCommand(absl::StrCat(
      kPython, " ", ShellQuote(kReferenceScript), " ",
      ShellQuote(ExampleVersionDir().string()),
      " --count 100 --seed 12345 --out ", ShellQuote(reference.string())));
  ASSERT_EQ(script.exit_code, 0) << "tools/reference_outputs.py failed:\n"
                                 << script.output;

  std::ifstream in(reference);
  const nlohmann::json json = nlohmann::json::parse(in, nullptr, false);
  ASSERT_FALSE(json.is_discarded()) << "cannot parse " << reference;
  const nlohmann::json& cases = json.at("cases");
  ASSERT_EQ(cases.size(), 100u);

  const std::vector<std::string> labels = ExampleLabels();
  constexpr size_t kPerRequest = 25;
  double max_error = 0;
  size_t compared = 0;
  for (size_t begin = 0; begin < cases.size(); begin += kPerRequest) {
    std::vector<std::string> texts;
    for (size_t i = begin; i < std::min(cases.size(), begin + kPerRequest);
         ++i) {
      texts.push_back(cases[i].at("text").get<std::string>());
    }
    absl::StatusOr<v1::InferResponse> response =
        client().Infer(TextRequest("brackets", texts));
    ASSERT_TRUE(response.ok()) << response.status();
    ASSERT_EQ(response->results_size(), static_cast<int>(texts.size()));
    for (size_t k = 0; k < texts.size(); ++k) {
      SCOPED_TRACE(absl::StrCat("case ", begin + k, " '", texts[k], "'"));
      const v1::ClassResult& result =
          response->results(k).outputs(0).classes(0);
      ExpectWellFormedClasses(result, labels);
      const std::vector<double> expected =
          cases[begin + k].at("probabilities").get<std::vector<double>>();
      ASSERT_EQ(result.probabilities_size(), static_cast<int>(expected.size()));
      for (size_t c = 0; c < expected.size(); ++c) {
        const double error = std::abs(result.probabilities(c) - expected[c]);
        max_error = std::max(max_error, error);
        EXPECT_NEAR(result.probabilities(c), expected[c], 1e-5)
            << "class " << labels[c];
        ++compared;
      }
    }
  }
  RecordProperty("max_abs_error", absl::StrFormat("%.3g", max_error));
  RecordProperty("probabilities_compared", static_cast<int>(compared));
  std::printf("brackets vs PyTorch: %zu probabilities, max abs error %.3g\n",
              compared, max_error);
}

// A request for tiny_state: one instance per sequence, each with its
// initial state.
v1::InferRequest StateRequest(const std::vector<std::vector<float>>& seqs,
                              const std::vector<std::vector<float>>& states) {
  v1::InferRequest request;
  request.set_model("tiny_state");
  for (size_t i = 0; i < seqs.size(); ++i) {
    v1::Instance* instance = request.add_instances();
    v1::InputValue* signal = instance->add_inputs();
    signal->set_name("signal");
    signal->mutable_vectors()->set_width(kTinyWidth);
    signal->mutable_vectors()->mutable_values()->Add(seqs[i].begin(),
                                                     seqs[i].end());
    v1::InputValue* h0 = instance->add_inputs();
    h0->set_name("h0");
    h0->mutable_vectors()->set_width(kTinyState);
    h0->mutable_vectors()->mutable_values()->Add(states[i].begin(),
                                                 states[i].end());
  }
  return request;
}

TEST_F(DaemonTest, InitialStateInputStartsTheRecurrence) {
  const std::vector<std::vector<float>> seqs = GoodTinySequences();
  const std::vector<float> zeros(kTinyState, 0.0f);
  absl::StatusOr<v1::InferResponse> plain =
      client().Infer(VectorRequest("tiny", seqs));
  ASSERT_TRUE(plain.ok()) << plain.status();
  absl::StatusOr<v1::InferResponse> from_zero =
      client().Infer(StateRequest(seqs, {zeros, zeros, zeros}));
  ASSERT_TRUE(from_zero.ok()) << from_zero.status();
  // Zero initial states are what the plain net starts from: same bits.
  for (size_t i = 0; i < seqs.size(); ++i) {
    EXPECT_EQ(Differences(plain->results(i).outputs(0),
                          from_zero->results(i).outputs(0)),
              "")
        << "instance " << i;
    const v1::Tensor& final_state = from_zero->results(i).outputs(1).tensor();
    ASSERT_EQ(final_state.values_size(), kTinyState);
  }
  const std::vector<float> ones(kTinyState, 1.0f);
  absl::StatusOr<v1::InferResponse> from_ones =
      client().Infer(StateRequest({seqs[0]}, {ones}));
  ASSERT_TRUE(from_ones.ok()) << from_ones.status();
  EXPECT_NE(Differences(from_ones->results(0).outputs(1),
                        from_zero->results(0).outputs(1)),
            "")
      << "the initial state made no difference";
}

TEST_F(DaemonTest, BadInitialStatesAreInvalidAndNamed) {
  const std::vector<float> seq = TinySequence(3, 5);
  const std::vector<float> state(kTinyState, 0.5f);
  // Missing.
  v1::InferRequest missing = StateRequest({seq}, {state});
  missing.mutable_instances(0)->mutable_inputs()->RemoveLast();
  ExpectRefused(missing, absl::StatusCode::kInvalidArgument,
                {"instance 0 has no value for input 'h0'"});
  // Two vectors where the input takes one.
  std::vector<float> two = state;
  two.insert(two.end(), state.begin(), state.end());
  ExpectRefused(
      StateRequest({seq}, {two}), absl::StatusCode::kInvalidArgument,
      {"input 'h0' of instance 0 has 2 vectors; this input takes one"});
  // Wrong width.
  v1::InferRequest narrow = StateRequest({seq}, {{0.5f, 0.5f, 0.5f}});
  narrow.mutable_instances(0)->mutable_inputs(1)->mutable_vectors()->set_width(
      3);
  ExpectRefused(narrow, absl::StatusCode::kInvalidArgument,
                {"input 'h0' takes vectors of width 4, got width 3"});
  // Not finite.
  ExpectRefused(StateRequest({seq}, {{0.5f, NAN, 0.5f, 0.5f}}),
                absl::StatusCode::kInvalidArgument,
                {"input 'h0' of instance 0", "nan"});
  // Unnamed values in a net with two inputs.
  v1::InferRequest unnamed = StateRequest({seq}, {state});
  unnamed.mutable_instances(0)->mutable_inputs(0)->clear_name();
  ExpectRefused(unnamed, absl::StatusCode::kInvalidArgument,
                {"has no input named ''", "signal, h0"});
}

// The second example: a per-character tagger whose output is a sequence of
// class distributions, from a bidirectional LSTM and a NetMap head.
TEST_F(DaemonTest, TaggerExampleMatchesPyTorchOnEveryCharacter) {
  absl::StatusOr<v1::ModelInfo> info = client().GetModel("tagger");
  ASSERT_TRUE(info.ok()) << info.status();
  ASSERT_EQ(info->state(), v1::ModelInfo::READY) << info->reason();
  ASSERT_TRUE(info->outputs(0).sequence());
  const std::vector<std::string> labels(info->outputs(0).labels().begin(),
                                        info->outputs(0).labels().end());

  const fs::path reference = folder_->path() / "tagger_reference.json";
  const fs::path version_dir =
      folder_->path() / "models" / "tagger" / absl::StrCat(info->version());
  const CommandResult script = RunCommand(absl::StrCat(
      kPython, " ", ShellQuote(kReferenceScript), " ",
      ShellQuote(version_dir.string()), " --count 50 --seed 12345 --out ",
      ShellQuote(reference.string())));
  ASSERT_EQ(script.exit_code, 0) << "tools/reference_outputs.py failed:\n"
                                 << script.output;
  std::ifstream in(reference);
  const nlohmann::json json = nlohmann::json::parse(in, nullptr, false);
  ASSERT_FALSE(json.is_discarded()) << "cannot parse " << reference;
  const nlohmann::json& cases = json.at("cases");
  ASSERT_EQ(cases.size(), 50u);

  std::vector<std::string> texts;
  for (const nlohmann::json& c : cases) {
    texts.push_back(c.at("text").get<std::string>());
  }
  absl::StatusOr<v1::InferResponse> response =
      client().Infer(TextRequest("tagger", texts));
  ASSERT_TRUE(response.ok()) << response.status();
  double max_error = 0;
  size_t compared = 0;
  for (size_t k = 0; k < texts.size(); ++k) {
    SCOPED_TRACE(absl::StrCat("case ", k, " '", texts[k], "'"));
    const auto expected =
        cases[k].at("probabilities").get<std::vector<std::vector<double>>>();
    const v1::OutputValue& out = response->results(k).outputs(0);
    ASSERT_EQ(out.classes_size(), static_cast<int>(expected.size()));
    for (size_t t = 0; t < expected.size(); ++t) {
      ExpectWellFormedClasses(out.classes(t), labels);
      for (size_t c = 0; c < labels.size(); ++c) {
        const double error =
            std::abs(out.classes(t).probabilities(c) - expected[t][c]);
        max_error = std::max(max_error, error);
        EXPECT_LE(error, 1e-5) << "element " << t << " class " << labels[c];
        ++compared;
      }
    }
  }
  std::printf("tagger vs PyTorch: %zu probabilities, max abs error %.3g\n",
              compared, max_error);
}

// Runs last in the suite: after every bad request above, the same process
// is alive and still answers correctly.
TEST_F(DaemonTest, DaemonSurvivesEveryBadRequest) {
  EXPECT_TRUE(daemon_->Running()) << "daemon log:\n"
                                  << Tail(daemon_->log_path());
  ExpectStillServes();
  if (HasExample()) {
    absl::StatusOr<v1::InferResponse> response =
        client().InferText("brackets", "()");
    ASSERT_TRUE(response.ok()) << response.status();
    ExpectWellFormedClasses(response->results(0).outputs(0).classes(0),
                            ExampleLabels());
  }
}

// --- Graceful drain -------------------------------------------------------

v1::InferRequest SlowRequest(int64_t length) {
  std::vector<float> values(length * kSlowWidth);
  for (size_t k = 0; k < values.size(); ++k) {
    values[k] = static_cast<float>(std::cos(0.01 * k));
  }
  return VectorRequest("slow", {values}, kSlowWidth);
}

TEST(DaemonDrainTest, InFlightRequestFinishesAfterSigtermAndLaterOnesFail) {
  TempFolder folder;
  ASSERT_NO_FATAL_FAILURE(WriteSlowModel(folder.path() / "models" / "slow"));
  // One thread per product: the timing below must not swing with how many
  // cores other processes leave free, as a team of threads does.
  absl::StatusOr<std::unique_ptr<DaemonProcess>> daemon =
      DaemonProcess::Start(folder.path() / "models",
                           folder.path() / "daemon.log", {"OMP_NUM_THREADS=1"});
  ASSERT_TRUE(daemon.ok()) << daemon.status();
  client::Client::Options options;
  options.target = (*daemon)->address();
  absl::StatusOr<std::unique_ptr<client::Client>> client =
      client::Client::Connect(options);
  ASSERT_TRUE(client.ok()) << client.status();

  // Grow the request until one run of it takes kLongEnough on this
  // machine, keeping that answer for comparison. SIGTERM then comes
  // kSignalAfter into the next run of the same request: long after the call
  // has reached the daemon, and long before the run can end, even on a
  // machine whose load changes between runs.
  constexpr absl::Duration kLongEnough = absl::Seconds(1);
  constexpr absl::Duration kSignalAfter = absl::Milliseconds(200);
  constexpr int64_t kMaxLength = 200000;  // under gRPC's 4 MiB message limit
  int64_t length = 250;
  v1::InferRequest request;
  absl::StatusOr<v1::InferResponse> expected;
  absl::Duration duration;
  for (int attempt = 0; attempt < 6; ++attempt) {
    request = SlowRequest(length);
    const absl::Time start = absl::Now();
    expected = (*client)->Infer(request);
    duration = absl::Now() - start;
    ASSERT_TRUE(expected.ok()) << expected.status();
    if (duration >= kLongEnough || length == kMaxLength) break;
    const double scale = 1.5 * absl::ToDoubleSeconds(kLongEnough) /
                         std::max(absl::ToDoubleSeconds(duration), 1e-3);
    length = std::min<int64_t>(kMaxLength,
                               std::max<int64_t>(2 * length, length * scale));
  }
  ASSERT_GE(duration, 2 * kSignalAfter)
      << "even " << length << " steps run too fast to be caught in flight";

  // A second channel, for a call made while the daemon drains.
  absl::StatusOr<std::unique_ptr<client::Client>> late =
      client::Client::Connect(options);
  ASSERT_TRUE(late.ok()) << late.status();

  std::atomic<bool> finished{false};
  absl::StatusOr<v1::InferResponse> in_flight;
  std::thread caller([&] {
    in_flight = (*client)->Infer(request);
    finished = true;
  });
  absl::SleepFor(kSignalAfter);
  const bool finished_before_signal = finished;
  (*daemon)->Signal(SIGTERM);

  // While it drains, the daemon takes no new calls.
  absl::SleepFor(absl::Milliseconds(50));
  absl::StatusOr<v1::InferResponse> during = (*late)->Infer(request);
  const bool finished_before_late_call = finished;
  EXPECT_EQ(during.status().code(), absl::StatusCode::kUnavailable)
      << during.status();
  caller.join();
  EXPECT_FALSE(finished_before_late_call)
      << "the request in flight ended before the call made while draining";
  EXPECT_FALSE(finished_before_signal)
      << "the request (" << length << " steps, "
      << absl::FormatDuration(duration)
      << ") ended before SIGTERM; the drain was not exercised";

  ASSERT_TRUE(in_flight.ok())
      << "the request in flight at SIGTERM failed: " << in_flight.status()
      << "\ndaemon log:\n"
      << Tail((*daemon)->log_path());
  EXPECT_EQ(Differences(*in_flight, *expected), "");

  absl::StatusOr<int> code = (*daemon)->WaitForExit(kStopTimeout);
  ASSERT_TRUE(code.ok()) << code.status();
  EXPECT_EQ(*code, 0) << "daemon log:\n" << Tail((*daemon)->log_path());

  absl::StatusOr<v1::InferResponse> after = (*client)->Infer(request);
  EXPECT_EQ(after.status().code(), absl::StatusCode::kUnavailable)
      << after.status();
  std::printf("drain: a %lld-step request of %s finished after SIGTERM\n",
              static_cast<long long>(length),
              absl::FormatDuration(duration).c_str());
}

}  // namespace
}  // namespace rnnserve

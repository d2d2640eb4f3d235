// The CUDA backend's internals: values and memory on the device, the op
// interface every layer lowers to, and the lowering entry points of the
// ops_*.cc files. Included only by engine/cuda/.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime_api.h>
#include <cudnn.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "engine/buffer.h"
#include "engine/cuda/check.h"
#include "engine/cuda/rnn_weights.h"
#include "engine/device.h"
#include "engine/graph.h"
#include "engine/layer.h"
#include "engine/sequence_layout.h"
#include "engine/status_macros.h"
#include "engine/value.h"
#include "engine/weights.h"

namespace rnnserve::engine::cuda {

// Device memory that only grows, so a workspace reaches its largest batch
// once and then allocates nothing.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  ~DeviceBuffer() {
    if (ptr_ != nullptr) cudaFree(ptr_);
  }
  DeviceBuffer(DeviceBuffer&& o) noexcept
      : ptr_(std::exchange(o.ptr_, nullptr)),
        size_(std::exchange(o.size_, 0)) {}
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    std::swap(ptr_, o.ptr_);
    std::swap(size_, o.size_);
    return *this;
  }

  absl::Status Reserve(size_t bytes) {
    if (bytes <= size_) return absl::OkStatus();
    if (ptr_ != nullptr) cudaFree(ptr_);
    ptr_ = nullptr;
    size_ = 0;
    RETURN_IF_CUDA(cudaMalloc(&ptr_, bytes));
    size_ = bytes;
    return absl::OkStatus();
  }
  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }
  size_t size() const { return size_; }

 private:
  void* ptr_ = nullptr;
  size_t size_ = 0;
};

// A value on the device: the counterpart of engine::Value.
struct DValue {
  PortType type;
  int64_t rows = 0;
  const SequenceLayout* layout = nullptr;
  DeviceBuffer buffer;
  // When set, the rows live here (inside another value) instead.
  void* view = nullptr;

  absl::Status Reshape(const PortType& t, int64_t n, const SequenceLayout* l) {
    type = t;
    rows = n;
    layout = l;
    view = nullptr;
    return buffer.Reserve(
        std::max<size_t>(1, n * (t.tokens ? 1 : t.width) * sizeof(float)));
  }
  // Rows [first, first + n) of `of`, without a copy.
  void View(const DValue& of, int64_t first, int64_t n, const PortType& t) {
    type = t;
    rows = n;
    layout = nullptr;
    view = static_cast<char*>(of.view != nullptr ? of.view
                                                 : of.buffer.as<void>()) +
           first * (t.tokens ? 1 : t.width) * 4;
  }
  float* data() const {
    return view != nullptr ? static_cast<float*>(view) : buffer.as<float>();
  }
  int32_t* ids() const {
    return view != nullptr ? static_cast<int32_t*>(view) : buffer.as<int32_t>();
  }
  int64_t floats() const { return rows * type.width; }
};

// One stream and one set of library handles, per workspace.
struct Context {
  int device = 0;
  cudaStream_t stream = nullptr;
  cublasHandle_t cublas = nullptr;
  cudnnHandle_t cudnn = nullptr;
};

class ProgramState;

// The cuDNN descriptors of an op that runs a recurrence through cuDNN.
struct RnnDescriptors {
  cudnnRNNDescriptor_t rnn = nullptr;
  cudnnRNNDataDescriptor_t x = nullptr, y = nullptr;
  cudnnTensorDescriptor_t h = nullptr;

  RnnDescriptors() = default;
  RnnDescriptors(const RnnDescriptors&) = delete;
  RnnDescriptors& operator=(const RnnDescriptors&) = delete;
  ~RnnDescriptors() {
    if (rnn != nullptr) cudnnDestroyRNNDescriptor(rnn);
    if (x != nullptr) cudnnDestroyRNNDataDescriptor(x);
    if (y != nullptr) cudnnDestroyRNNDataDescriptor(y);
    if (h != nullptr) cudnnDestroyTensorDescriptor(h);
  }
};

// Per-op working memory in a workspace. Index uploads go from pageable
// host memory, which the runtime stages before the call returns, so the
// host vectors may be refilled at once.
// TODO: stage indices through pinned memory; a pageable upload waits for
// the stream first.
struct OpState {
  std::vector<DeviceBuffer> buffers;
  std::vector<int32_t> host_index;
  std::vector<int> host_lengths;
  std::vector<int64_t> lengths;
  SequenceLayout layout;
  std::vector<DValue> values;
  std::vector<std::unique_ptr<ProgramState>> nested;
  std::unique_ptr<RnnDescriptors> rnn;

  OpState();
  OpState(OpState&&) noexcept;
  ~OpState();

  // buffers[i], grown to hold `count` elements of T.
  template <typename T>
  absl::StatusOr<T*> Scratch(size_t i, size_t count) {
    if (buffers.size() <= i) buffers.resize(i + 1);
    RETURN_IF_ERROR(buffers[i].Reserve(std::max<size_t>(1, count * sizeof(T))));
    return buffers[i].as<T>();
  }
  // Copies host_index to buffers[i] and returns it on the device.
  absl::StatusOr<const int32_t*> UploadIndex(size_t i, const Context& ctx) {
    ASSIGN_OR_RETURN(int32_t * d, Scratch<int32_t>(i, host_index.size()));
    RETURN_IF_CUDA(cudaMemcpyAsync(d, host_index.data(),
                                   host_index.size() * sizeof(int32_t),
                                   cudaMemcpyHostToDevice, ctx.stream));
    return d;
  }
};

class Op {
 public:
  virtual ~Op() = default;
  virtual absl::Status Init(OpState* state) const { return absl::OkStatus(); }
  virtual absl::Status Run(const std::vector<const DValue*>& in,
                           const std::vector<DValue*>& out, OpState* state,
                           const Context& ctx) const = 0;
};

// The weights of a program on the device, and their total size.
struct Residents {
  std::vector<DeviceBuffer> buffers;
  int64_t bytes = 0;

  absl::StatusOr<const float*> Upload(const float* host, int64_t count) {
    DeviceBuffer b;
    RETURN_IF_ERROR(b.Reserve(std::max<int64_t>(1, count) * sizeof(float)));
    RETURN_IF_CUDA(cudaMemcpy(b.as<float>(), host, count * sizeof(float),
                              cudaMemcpyHostToDevice));
    const float* p = b.as<float>();
    Adopt(std::move(b), count * sizeof(float));
    return p;
  }
  void Adopt(DeviceBuffer b, int64_t size) {
    bytes += size;
    buffers.push_back(std::move(b));
  }
};

inline size_t ElementBytes(Precision p) {
  return p == Precision::kFp32 ? sizeof(float) : 2;
}

// `count` floats converted on the host to `p`'s storage type, round to
// nearest even.
std::vector<uint16_t> ToReduced(const float* host, int64_t count, Precision p);

// A weight matrix on the device, row-major, in the program's precision.
struct DeviceMatrix {
  const void* data = nullptr;
  Precision precision = Precision::kFp32;

  // The matrix from element `offset` on (a block of its rows).
  DeviceMatrix At(int64_t offset) const {
    return {static_cast<const char*>(data) + offset * ElementBytes(precision),
            precision};
  }
};

// Copies `count` floats to the device as a matrix in precision `p`.
absl::StatusOr<DeviceMatrix> UploadMatrix(Residents* residents,
                                          const float* host, int64_t count,
                                          Precision p);

// The dropout descriptor every cuDNN RNN descriptor must name. Inference
// applies no dropout, but cuDNN wants an initialized descriptor (with its
// random states) all the same; one per program, shared by its RNN
// descriptors, which refer to it for as long as they live.
struct DropoutState {
  // The handle the descriptor was set up with, kept for its lifetime.
  cudnnHandle_t handle = nullptr;
  cudnnDropoutDescriptor_t desc = nullptr;
  DeviceBuffer states;
  ~DropoutState() {
    if (desc != nullptr) cudnnDestroyDropoutDescriptor(desc);
    if (handle != nullptr) cudnnDestroy(handle);
  }
};

absl::StatusOr<std::shared_ptr<DropoutState>> MakeDropout();

// What lowering needs besides the graph.
struct Lowering {
  WeightSource* weights;
  Residents* residents;
  cudnnHandle_t cudnn;  // for weight-space queries at compile time
  std::shared_ptr<DropoutState> dropout;
  Precision precision = Precision::kFp32;
};

class SubProgram;

// The values and op states of one program for one workspace.
class ProgramState {
 public:
  std::vector<std::vector<DValue>> values;  // per node, per output port
  // Argument lists, reused by every run (sub-nets run once per step).
  std::vector<const DValue*> in_ptrs;
  std::vector<DValue*> out_ptrs;
  std::vector<OpState> ops;
  std::vector<const DValue*> inputs;
};

// A lowered graph: one op per node, wired as the graph is.
class SubProgram {
 public:
  static absl::StatusOr<std::unique_ptr<SubProgram>> Lower(const Graph& graph,
                                                           Lowering& lw);

  absl::StatusOr<std::unique_ptr<ProgramState>> NewState() const {
    auto state = std::make_unique<ProgramState>();
    state->values.resize(nodes_.size());
    state->ops.resize(nodes_.size());
    for (size_t n = 0; n < nodes_.size(); ++n) {
      state->values[n].resize(nodes_[n].outputs);
      RETURN_IF_ERROR(nodes_[n].op->Init(&state->ops[n]));
    }
    return state;
  }

  absl::Status Run(const std::vector<const DValue*>& inputs,
                   ProgramState* state, const Context& ctx) const {
    state->inputs = inputs;
    std::vector<const DValue*>& in = state->in_ptrs;
    std::vector<DValue*>& out = state->out_ptrs;
    for (size_t n = 0; n < nodes_.size(); ++n) {
      in.clear();
      out.clear();
      for (const auto& source : nodes_[n].inputs) {
        in.push_back(source ? &Resolve(*state, *source) : nullptr);
      }
      for (DValue& v : state->values[n]) out.push_back(&v);
      RETURN_IF_ERROR(nodes_[n].op->Run(in, out, &state->ops[n], ctx));
    }
    return absl::OkStatus();
  }

  int num_outputs() const { return static_cast<int>(outputs_.size()); }
  const DValue& output(const ProgramState& state, int i) const {
    return Resolve(state, outputs_[i]);
  }

 private:
  struct Node {
    std::unique_ptr<Op> op;
    std::vector<std::optional<Graph::Source>> inputs;
    int outputs = 0;
  };
  const DValue& Resolve(const ProgramState& state, Graph::Source s) const {
    return s.node < 0 ? *state.inputs[-1 - s.node]
                      : state.values[s.node][s.port];
  }

  std::vector<Node> nodes_;
  std::vector<Graph::Source> outputs_;
};

// UNIMPLEMENTED naming the layer and what of it the backend lacks.
absl::Status Unimplemented(const Layer& layer, const std::string& what);

// Takes an array of the layer a second time (the CPU graph took it first),
// for copying to the device.
absl::StatusOr<engine::Buffer<float>> Array(const Layer& layer, Lowering& lw,
                                            const char* name,
                                            std::vector<int64_t> shape);

// y = x W^T + b through cuBLAS, row-major; in reduced precision x goes
// through `staging` and the product accumulates in fp32.
absl::Status LinearProduct(const Context& ctx, const DeviceMatrix& weight,
                           const float* bias, int64_t n, int64_t in,
                           const float* x, int64_t rows, float* y,
                           DeviceBuffer* staging);

// The row indices ops gather by, computed on the host from a layout.
enum class LayoutIndex {
  // Row s takes caller row original_index(s): caller order into sorted.
  kIntoSorted,
  // Row i takes sorted row sorted_position(i): sorted order into caller's.
  kIntoCaller,
  // Row i takes the packed row of instance i's last element.
  kLastElements,
  // Packed row (s, t) takes row (s, length - 1 - t): length-aware reversal.
  kReversed,
};

// Fills st->host_index with index `kind` of `l` and uploads it to op buffer
// `slot`; returns it on the device.
absl::StatusOr<const int32_t*> UploadLayoutIndex(LayoutIndex kind,
                                                 const SequenceLayout& l,
                                                 OpState* st, size_t slot,
                                                 const Context& ctx);

// Initial states into sorted order: rows of `from` gathered by `index`
// (kIntoSorted), or zeros when `from` is null (then `index` may be too).
absl::Status GatherOrZero(const DValue* from, int64_t width,
                          const int32_t* index, int64_t rows, float* to,
                          const Context& ctx);

// The kIntoSorted index when any of `initial` is given, else nullptr: a run
// without initial states uploads nothing.
absl::StatusOr<const int32_t*> SortedOrderIfAny(
    absl::Span<const DValue* const> initial, const SequenceLayout& l,
    OpState* st, size_t slot, const Context& ctx);

// y = x reversed within each sequence's length (the index goes up through
// op buffer `slot`).
absl::Status Reverse(const DValue& x, DValue* y, OpState* st, size_t slot,
                     const Context& ctx);

// Lowering, by kind of layer. Each returns nullptr for a type it does not
// handle. `widths` are the node's input widths (0 for an unconnected port).
absl::StatusOr<std::unique_ptr<Op>> LowerBasic(
    const Layer& layer, const std::vector<int64_t>& widths, Lowering& lw);
absl::StatusOr<std::unique_ptr<Op>> LowerOperator(
    const Layer& layer, const std::vector<int64_t>& widths, Lowering& lw);

// Recurrences (ops_recurrent.cc).
absl::StatusOr<RnnCell> CellOf(const Layer& layer);
bool IsRecurrent(const Layer& layer);
// The arrays of one recurrent layer (input width `input`), kept on the host
// until they are on the device.
struct LoadedRecurrent {
  engine::Buffer<float> weight_ih, weight_hh, bias_ih, bias_hh;
  RecurrentArrays view;
};
absl::StatusOr<LoadedRecurrent> LoadRecurrent(const Layer& layer, int64_t input,
                                              Lowering& lw);
// One step of the original GRU (reset before the product) on `rows` rows:
// `x` holds their input projections with every bias folded in [rows, 3h];
// `hr`, `reset` and `hn` are scratch ([rows, 2h], [rows, h], [rows, h]).
// `next` may be `prev`.
absl::Status GruResetBeforeStep(const Context& ctx, const DeviceMatrix& w_hh,
                                const float* x, const float* prev, int64_t rows,
                                int64_t h, float* hr, float* reset, float* hn,
                                float* next, DeviceBuffer* staging);
// A recurrent layer; `needed` says which of its outputs anything reads.
absl::StatusOr<std::unique_ptr<Op>> LowerRecurrent(
    const Layer& layer, int64_t input, const std::vector<bool>& needed,
    Lowering& lw);
// A sub-net that is one recurrent layer reading the sub-net's input, with
// no initial states and only its sequence read; or nullptr.
const Layer* SoleRecurrentLayer(const Graph& g);
// The recurrence cuDNN can run for a node (a recurrent layer, or the
// forward layer of a bidirectional operator that one bidirectional call
// can run, with `pair` set to its backward layer), or nullptr.
const Layer* CudnnRecurrence(const Layer& layer, const Layer** pair);
absl::StatusOr<std::unique_ptr<Op>> LowerBidirectionalRnn(const Layer& layer,
                                                          const Layer& f,
                                                          const Layer& b,
                                                          int64_t input,
                                                          Lowering& lw);
// Nodes [first, last] of `graph` as one multi-layer cuDNN call.
absl::StatusOr<std::unique_ptr<Op>> LowerFusedRun(const Graph& graph, int first,
                                                  int last, int64_t input,
                                                  Lowering& lw);

}  // namespace rnnserve::engine::cuda

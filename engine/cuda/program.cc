#include "engine/cuda/program.h"

#include <cublas_v2.h>
#include <cuda_runtime_api.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cudnn.h>

#include <cstring>
#include <map>
#include <optional>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engine/cuda/check.h"
#include "engine/cuda/kernels.h"
#include "engine/cuda/rnn_plan.h"
#include "engine/cuda/rnn_weights.h"
#include "engine/graph.h"
#include "engine/layer.h"
#include "engine/status_macros.h"
#include "engine/weights.h"

namespace rnnserve::engine::cuda {

absl::StatusOr<DeviceInfo> ProbeDevice(int ordinal) {
  int count = 0;
  const absl::Status counted =
      CudaStatus(cudaGetDeviceCount(&count), "cudaGetDeviceCount");
  if (!counted.ok()) {
    return absl::Status(counted.code(),
                        absl::StrCat("no usable CUDA device: ",
                                     counted.message()));
  }
  if (count == 0) {
    return absl::FailedPreconditionError("this machine has no CUDA device");
  }
  if (ordinal >= count) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "cuda:%d asked for; this machine has %d CUDA device%s (cuda:0%s)",
        ordinal, count, count == 1 ? "" : "s",
        count == 1 ? "" : absl::StrFormat("..cuda:%d", count - 1)));
  }
  cudaDeviceProp prop;
  RETURN_IF_CUDA(cudaGetDeviceProperties(&prop, ordinal));
  RETURN_IF_CUDA(cudaSetDevice(ordinal));
  size_t free_bytes = 0, total_bytes = 0;
  RETURN_IF_CUDA(cudaMemGetInfo(&free_bytes, &total_bytes));
  DeviceInfo info;
  info.ordinal = ordinal;
  info.name = prop.name;
  info.compute_major = prop.major;
  info.compute_minor = prop.minor;
  info.total_bytes = static_cast<int64_t>(total_bytes);
  info.free_bytes = static_cast<int64_t>(free_bytes);
  return info;
}

namespace {

// Device memory that only grows, so a workspace reaches its largest batch
// once and then allocates nothing.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  ~DeviceBuffer() {
    if (ptr_ != nullptr) cudaFree(ptr_);
  }
  DeviceBuffer(DeviceBuffer&& o) noexcept
      : ptr_(std::exchange(o.ptr_, nullptr)), size_(std::exchange(o.size_, 0)) {}
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
    return view != nullptr ? static_cast<int32_t*>(view)
                           : buffer.as<int32_t>();
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
    ASSIGN_OR_RETURN(int32_t* d, Scratch<int32_t>(i, host_index.size()));
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

size_t ElementBytes(Precision p) {
  return p == Precision::kFp32 ? sizeof(float) : 2;
}

// `count` floats converted on the host to `p`'s storage type, round to
// nearest even.
std::vector<uint16_t> ToReduced(const float* host, int64_t count, Precision p) {
  std::vector<uint16_t> out(count);
  for (int64_t i = 0; i < count; ++i) {
    if (p == Precision::kBf16) {
      const __nv_bfloat16 v = __float2bfloat16_rn(host[i]);
      std::memcpy(&out[i], &v, 2);
    } else {
      const __half v = __float2half_rn(host[i]);
      std::memcpy(&out[i], &v, 2);
    }
  }
  return out;
}

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

absl::StatusOr<DeviceMatrix> UploadMatrix(Residents* residents,
                                          const float* host, int64_t count,
                                          Precision p) {
  if (p == Precision::kFp32) {
    ASSIGN_OR_RETURN(const float* d, residents->Upload(host, count));
    return DeviceMatrix{d, p};
  }
  const std::vector<uint16_t> reduced = ToReduced(host, count, p);
  DeviceBuffer b;
  RETURN_IF_ERROR(b.Reserve(std::max<int64_t>(1, count) * 2));
  RETURN_IF_CUDA(cudaMemcpy(b.as<void>(), reduced.data(), count * 2,
                            cudaMemcpyHostToDevice));
  const void* d = b.as<void>();
  residents->Adopt(std::move(b), count * 2);
  return DeviceMatrix{d, p};
}

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

absl::StatusOr<std::shared_ptr<DropoutState>> MakeDropout() {
  auto d = std::make_shared<DropoutState>();
  RETURN_IF_CUDNN(cudnnCreate(&d->handle));
  RETURN_IF_CUDNN(cudnnCreateDropoutDescriptor(&d->desc));
  size_t bytes = 0;
  RETURN_IF_CUDNN(cudnnDropoutGetStatesSize(d->handle, &bytes));
  RETURN_IF_ERROR(d->states.Reserve(std::max<size_t>(bytes, 1)));
  RETURN_IF_CUDNN(cudnnSetDropoutDescriptor(d->desc, d->handle, 0.0f,
                                            d->states.as<void>(), bytes,
                                            /*seed=*/0));
  return d;
}

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
  std::vector<OpState> ops;
  std::vector<const DValue*> inputs;
};

OpState::OpState() = default;
OpState::OpState(OpState&&) noexcept = default;
OpState::~OpState() = default;

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
    std::vector<const DValue*> in;
    std::vector<DValue*> out;
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

absl::Status Unimplemented(const Layer& layer, const std::string& what) {
  return absl::UnimplementedError(absl::StrFormat(
      "layer '%s' (%s): %s is not implemented by the CUDA backend yet; run "
      "this model on device \"cpu\"",
      layer.name(), layer.type(), what));
}

// Takes an array of the layer a second time (the CPU graph took it first),
// for copying to the device.
absl::StatusOr<engine::Buffer<float>> Array(const Layer& layer, Lowering& lw,
                                            const char* name,
                                            std::vector<int64_t> shape) {
  return lw.weights->Take(layer.array_prefix() + name, shape);
}

// ---------------------------------------------------------------------------
// Row-wise ops.

class EmbeddingOp : public Op {
 public:
  EmbeddingOp(const Layer& layer, const float* table)
      : type_(layer.output_type(0)), table_(table) {}
  absl::Status Run(const std::vector<const DValue*>& in,
                   const std::vector<DValue*>& out, OpState*,
                   const Context& ctx) const override {
    const DValue& x = *in[0];
    RETURN_IF_ERROR(out[0]->Reshape(type_, x.rows, x.layout));
    RETURN_IF_CUDA(GatherRows(table_, type_.width, x.ids(), x.rows,
                              out[0]->data(), ctx.stream));
    return absl::OkStatus();
  }

 private:
  PortType type_;
  const float* table_;
};

// y = x W^T + b through cuBLAS. Row-major y [rows, n] is column-major
// y^T [n, rows] = W [n, in] (column-major W^T, so transposed) times x^T.
// In reduced precision x is converted into `staging` first and the product
// accumulates in fp32 into the fp32 y.
absl::Status LinearProduct(const Context& ctx, const DeviceMatrix& weight,
                           const float* bias, int64_t n, int64_t in,
                           const float* x, int64_t rows, float* y,
                           DeviceBuffer* staging) {
  if (rows == 0) return absl::OkStatus();
  float beta = 0.0f;
  if (bias != nullptr) {
    RETURN_IF_CUDA(BroadcastRows(bias, n, rows, y, ctx.stream));
    beta = 1.0f;
  }
  const float alpha = 1.0f;
  if (weight.precision == Precision::kFp32) {
    RETURN_IF_CUBLAS(cublasSgemm(
        ctx.cublas, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(n),
        static_cast<int>(rows), static_cast<int>(in), &alpha,
        static_cast<const float*>(weight.data), static_cast<int>(in), x,
        static_cast<int>(in), &beta, y, static_cast<int>(n)));
    return absl::OkStatus();
  }
  const bool bf16 = weight.precision == Precision::kBf16;
  RETURN_IF_ERROR(staging->Reserve(rows * in * 2));
  RETURN_IF_CUDA(
      FloatToReduced(x, staging->as<void>(), rows * in, bf16, ctx.stream));
  const cudaDataType_t type = bf16 ? CUDA_R_16BF : CUDA_R_16F;
  RETURN_IF_CUBLAS(cublasGemmEx(
      ctx.cublas, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(n),
      static_cast<int>(rows), static_cast<int>(in), &alpha, weight.data, type,
      static_cast<int>(in), staging->as<void>(), type, static_cast<int>(in),
      &beta, y, CUDA_R_32F, static_cast<int>(n), CUBLAS_COMPUTE_32F,
      CUBLAS_GEMM_DEFAULT));
  return absl::OkStatus();
}

class LinearOp : public Op {
 public:
  LinearOp(const Layer& layer, int64_t in, DeviceMatrix weight,
           const float* bias)
      : type_(layer.output_type(0)), in_(in), weight_(weight), bias_(bias) {}
  absl::Status Run(const std::vector<const DValue*>& in,
                   const std::vector<DValue*>& out, OpState* st,
                   const Context& ctx) const override {
    const DValue& x = *in[0];
    RETURN_IF_ERROR(out[0]->Reshape(type_, x.rows, x.layout));
    st->buffers.resize(1);
    return LinearProduct(ctx, weight_, bias_, type_.width, in_, x.data(),
                         x.rows, out[0]->data(), &st->buffers[0]);
  }

 private:
  PortType type_;
  int64_t in_;
  DeviceMatrix weight_;
  const float* bias_;
};

class ActivationOp : public Op {
 public:
  ActivationOp(const Layer& layer, Activation f)
      : type_(layer.output_type(0)), f_(f) {}
  absl::Status Run(const std::vector<const DValue*>& in,
                   const std::vector<DValue*>& out, OpState*,
                   const Context& ctx) const override {
    const DValue& x = *in[0];
    RETURN_IF_ERROR(out[0]->Reshape(type_, x.rows, x.layout));
    RETURN_IF_CUDA(
        Activate(f_, x.data(), out[0]->data(), x.floats(), ctx.stream));
    return absl::OkStatus();
  }

 private:
  PortType type_;
  Activation f_;
};

class SoftmaxOp : public Op {
 public:
  explicit SoftmaxOp(const Layer& layer) : type_(layer.output_type(0)) {}
  absl::Status Run(const std::vector<const DValue*>& in,
                   const std::vector<DValue*>& out, OpState*,
                   const Context& ctx) const override {
    const DValue& x = *in[0];
    RETURN_IF_ERROR(out[0]->Reshape(type_, x.rows, x.layout));
    RETURN_IF_CUDA(
        Softmax(x.data(), out[0]->data(), x.rows, type_.width, ctx.stream));
    return absl::OkStatus();
  }

 private:
  PortType type_;
};

// Catenate (op empty), Total, Times, Subtract; and, with one input, the
// copies (Dropout, Reshape).
class CombineOp : public Op {
 public:
  CombineOp(const Layer& layer, std::optional<Combine> op)
      : type_(layer.output_type(0)), op_(op) {}
  absl::Status Run(const std::vector<const DValue*>& in,
                   const std::vector<DValue*>& out, OpState*,
                   const Context& ctx) const override {
    const int64_t rows = in[0]->rows;
    DValue& y = *out[0];
    RETURN_IF_ERROR(y.Reshape(type_, rows, in[0]->layout));
    if (!op_) {
      int64_t col = 0;
      for (const DValue* x : in) {
        RETURN_IF_CUDA(CopyColumns(x->data(), x->type.width, rows, y.data(),
                                   type_.width, col, ctx.stream));
        col += x->type.width;
      }
      return absl::OkStatus();
    }
    RETURN_IF_CUDA(cudaMemcpyAsync(y.data(), in[0]->data(),
                                   in[0]->floats() * sizeof(float),
                                   cudaMemcpyDeviceToDevice, ctx.stream));
    for (size_t k = 1; k < in.size(); ++k) {
      RETURN_IF_CUDA(CombineElements(*op_, y.data(), in[k]->data(), y.data(),
                                     y.floats(), ctx.stream));
    }
    return absl::OkStatus();
  }

 private:
  PortType type_;
  std::optional<Combine> op_;
};

// ---------------------------------------------------------------------------
// Sequence ops: the host computes a row index from the layout, the device
// gathers.

class SequenceLastOp : public Op {
 public:
  explicit SequenceLastOp(const Layer& layer) : type_(layer.output_type(0)) {}
  absl::Status Run(const std::vector<const DValue*>& in,
                   const std::vector<DValue*>& out, OpState* st,
                   const Context& ctx) const override {
    const DValue& x = *in[0];
    const SequenceLayout& l = *x.layout;
    st->host_index.resize(l.batch());
    for (int64_t i = 0; i < l.batch(); ++i) {
      const int64_t s = l.sorted_position(i);
      st->host_index[i] = static_cast<int32_t>(l.row(s, l.sorted_length(s) - 1));
    }
    ASSIGN_OR_RETURN(const int32_t* index, st->UploadIndex(0, ctx));
    RETURN_IF_ERROR(out[0]->Reshape(type_, l.batch(), nullptr));
    RETURN_IF_CUDA(GatherRows(x.data(), type_.width, index, l.batch(),
                              out[0]->data(), ctx.stream));
    return absl::OkStatus();
  }

 private:
  PortType type_;
};

// Fills host_index with the length-aware reversal of `l`.
void ReverseIndex(const SequenceLayout& l, std::vector<int32_t>* index) {
  index->resize(l.total_rows());
  for (int64_t t = 0; t < l.max_length(); ++t) {
    for (int64_t s = 0; s < l.batch_size(t); ++s) {
      (*index)[l.row(s, t)] =
          static_cast<int32_t>(l.row(s, l.sorted_length(s) - 1 - t));
    }
  }
}

absl::Status Reverse(const DValue& x, DValue* y, OpState* st, size_t slot,
                     const Context& ctx) {
  ReverseIndex(*x.layout, &st->host_index);
  ASSIGN_OR_RETURN(const int32_t* index, st->UploadIndex(slot, ctx));
  RETURN_IF_ERROR(y->Reshape(x.type, x.rows, x.layout));
  RETURN_IF_CUDA(GatherRows(x.data(), x.type.width, index, x.rows, y->data(),
                            ctx.stream));
  return absl::OkStatus();
}

class SequenceReverseOp : public Op {
 public:
  absl::Status Run(const std::vector<const DValue*>& in,
                   const std::vector<DValue*>& out, OpState* st,
                   const Context& ctx) const override {
    return Reverse(*in[0], out[0], st, 0, ctx);
  }
};

// SequenceMostLayer (drop_first false) and SequenceRestLayer.
class DropOneOp : public Op {
 public:
  DropOneOp(const Layer& layer, bool drop_first)
      : layer_(layer), type_(layer.output_type(0)), drop_first_(drop_first) {}
  absl::Status Run(const std::vector<const DValue*>& in,
                   const std::vector<DValue*>& out, OpState* st,
                   const Context& ctx) const override {
    const DValue& x = *in[0];
    const SequenceLayout& from = *x.layout;
    st->lengths.resize(from.batch());
    for (int64_t i = 0; i < from.batch(); ++i) {
      const int64_t len = from.sorted_length(from.sorted_position(i));
      if (len < 2) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "layer '%s' (%s) needs sequences of at least 2 elements; instance "
            "%d has %d",
            layer_.name(), layer_.type(), i, len));
      }
      st->lengths[i] = len - 1;
    }
    RETURN_IF_ERROR(st->layout.Plan(st->lengths));
    const SequenceLayout& to = st->layout;
    st->host_index.resize(to.total_rows());
    for (int64_t t = 0; t < to.max_length(); ++t) {
      const int64_t src = from.offset(drop_first_ ? t + 1 : t);
      for (int64_t s = 0; s < to.batch_size(t); ++s) {
        st->host_index[to.offset(t) + s] = static_cast<int32_t>(src + s);
      }
    }
    ASSIGN_OR_RETURN(const int32_t* index, st->UploadIndex(0, ctx));
    RETURN_IF_ERROR(out[0]->Reshape(type_, to.total_rows(), &to));
    RETURN_IF_CUDA(GatherRows(x.data(), type_.width, index, to.total_rows(),
                              out[0]->data(), ctx.stream));
    return absl::OkStatus();
  }

 private:
  const Layer& layer_;
  PortType type_;
  bool drop_first_;
};

// ---------------------------------------------------------------------------
// Recurrences through cuDNN.

// Lays the instances' lengths out as cuDNN's packed data descriptors want
// them: sorted by decreasing length, which is the engine's packed order.
void SortedLengths(const SequenceLayout& l, std::vector<int>* lengths) {
  lengths->resize(l.batch());
  for (int64_t s = 0; s < l.batch(); ++s) {
    (*lengths)[s] = static_cast<int>(l.sorted_length(s));
  }
}

struct RnnShape {
  RnnCell cell = RnnCell::kLstm;
  int64_t input = 0;  // of the first layer; later ones take dirs * hidden
  int64_t hidden = 0;
  bool bidirectional = false;
  int layers = 1;
  Precision precision = Precision::kFp32;
};

cudnnDataType_t CudnnType(Precision p) {
  switch (p) {
    case Precision::kFp16:
      return CUDNN_DATA_HALF;
    case Precision::kBf16:
      return CUDNN_DATA_BFLOAT16;
    default:
      return CUDNN_DATA_FLOAT;
  }
}

absl::Status SetRnnDescriptor(cudnnRNNDescriptor_t desc, const RnnShape& s,
                              const DropoutState& dropout) {
  cudnnRNNMode_t mode = CUDNN_LSTM;
  switch (s.cell) {
    case RnnCell::kTanh:
      mode = CUDNN_RNN_TANH;
      break;
    case RnnCell::kRelu:
      mode = CUDNN_RNN_RELU;
      break;
    case RnnCell::kGru:
      mode = CUDNN_GRU;
      break;
    case RnnCell::kLstm:
      mode = CUDNN_LSTM;
      break;
  }
  // FMA math keeps fp32 products in fp32 (no TF32), so results stay within
  // the parity bound of the CPU engine; reduced precision stores half or
  // bfloat16 and accumulates in fp32 on tensor cores.
  const bool fp32 = s.precision == Precision::kFp32;
  RETURN_IF_CUDNN(cudnnSetRNNDescriptor_v8(
      desc, CUDNN_RNN_ALGO_STANDARD, mode, CUDNN_RNN_DOUBLE_BIAS,
      s.bidirectional ? CUDNN_BIDIRECTIONAL : CUDNN_UNIDIRECTIONAL,
      CUDNN_LINEAR_INPUT, CudnnType(s.precision), CUDNN_DATA_FLOAT,
      fp32 ? CUDNN_FMA_MATH : CUDNN_TENSOR_OP_MATH,
      static_cast<int32_t>(s.input), static_cast<int32_t>(s.hidden),
      static_cast<int32_t>(s.hidden), s.layers, dropout.desc,
      CUDNN_RNN_PADDED_IO_DISABLED));
  return absl::OkStatus();
}

// Builds the weight space of a cuDNN RNN from the engine's arrays, one
// entry of `arrays` per direction.
absl::StatusOr<std::pair<const float*, size_t>> UploadWeightSpace(
    const RnnShape& shape, const std::vector<RecurrentArrays>& arrays,
    Lowering& lw) {
  cudnnRNNDescriptor_t desc = nullptr;
  RETURN_IF_CUDNN(cudnnCreateRNNDescriptor(&desc));
  struct Cleanup {
    cudnnRNNDescriptor_t d;
    cudnnTensorDescriptor_t m = nullptr, b = nullptr;
    ~Cleanup() {
      cudnnDestroyRNNDescriptor(d);
      if (m) cudnnDestroyTensorDescriptor(m);
      if (b) cudnnDestroyTensorDescriptor(b);
    }
  } cleanup{desc};
  RETURN_IF_ERROR(SetRnnDescriptor(desc, shape, *lw.dropout));
  size_t space_bytes = 0;
  RETURN_IF_CUDNN(cudnnGetRNNWeightSpaceSize(lw.cudnn, desc, &space_bytes));
  RETURN_IF_CUDNN(cudnnCreateTensorDescriptor(&cleanup.m));
  RETURN_IF_CUDNN(cudnnCreateTensorDescriptor(&cleanup.b));
  // The space itself: cuDNN gives addresses inside it, whose distances from
  // its start are the offsets.
  DeviceBuffer probe;
  RETURN_IF_ERROR(probe.Reserve(space_bytes));
  const char* base = probe.as<char>();
  const size_t element = ElementBytes(shape.precision);
  PlaceFn place = [&](int pseudo_layer, int id)
      -> absl::StatusOr<std::pair<ParamPlace, ParamPlace>> {
    void* m_addr = nullptr;
    void* b_addr = nullptr;
    RETURN_IF_CUDNN(cudnnGetRNNWeightParams(
        lw.cudnn, desc, pseudo_layer, space_bytes, probe.as<void>(), id,
        cleanup.m, &m_addr, cleanup.b, &b_addr));
    auto describe = [&](cudnnTensorDescriptor_t t, void* addr,
                        ParamPlace* p) -> absl::Status {
      cudnnDataType_t type;
      int nb = 0, dims[3] = {0, 0, 0}, strides[3] = {0, 0, 0};
      RETURN_IF_CUDNN(cudnnGetTensorNdDescriptor(t, 3, &type, &nb, dims,
                                                 strides));
      p->offset = (static_cast<const char*>(addr) - base) /
                  static_cast<int64_t>(element);
      // cuDNN describes a matrix as [1, rows, cols] and a bias as
      // [1, rows, 1]; read a layout without the leading 1 the same way.
      // FillWeightSpace checks the result against the engine's shapes.
      if (nb == 3 && dims[0] == 1) {
        p->rows = dims[1];
        p->cols = dims[2];
      } else {
        p->rows = dims[0];
        p->cols = nb >= 3 ? int64_t{dims[1]} * dims[2] : (nb == 2 ? dims[1] : 1);
      }
      return absl::OkStatus();
    };
    std::pair<ParamPlace, ParamPlace> places;
    RETURN_IF_ERROR(describe(cleanup.m, m_addr, &places.first));
    RETURN_IF_ERROR(describe(cleanup.b, b_addr, &places.second));
    return places;
  };
  const int64_t elements = space_bytes / element;
  std::vector<float> image(elements);
  RETURN_IF_ERROR(FillWeightSpace(shape.cell, arrays, place, image.data(),
                                  elements));
  if (shape.precision == Precision::kFp32) {
    RETURN_IF_CUDA(cudaMemcpy(probe.as<float>(), image.data(), space_bytes,
                              cudaMemcpyHostToDevice));
  } else {
    const std::vector<uint16_t> reduced =
        ToReduced(image.data(), elements, shape.precision);
    RETURN_IF_CUDA(cudaMemcpy(probe.as<void>(), reduced.data(),
                              elements * 2, cudaMemcpyHostToDevice));
  }
  // The space holds the program's storage type; the op passes it to cuDNN
  // untyped.
  const float* space = probe.as<float>();
  lw.residents->Adopt(std::move(probe), space_bytes);
  return std::make_pair(space, space_bytes);
}

// One recurrent layer, both directions of a bidirectional one, or a fused
// stack of either (rnn_plan.h), as one cuDNN call on the packed batch.
// Ports as the CPU layer's: output, state (final, caller order) and, for
// the LSTM, cell (final); initial states from the state and cell inputs.
// In reduced precision the sequences and states are converted on the way
// in and out; values between layers stay fp32.
class CudnnRnnOp : public Op {
 public:
  CudnnRnnOp(const Layer& layer, RnnShape shape, const float* space,
             size_t space_bytes, std::vector<bool> needed,
             std::shared_ptr<DropoutState> dropout)
      : layer_(layer),
        shape_(shape),
        dropout_(std::move(dropout)),
        space_(space),
        space_bytes_(space_bytes),
        needed_(std::move(needed)) {}

  absl::Status Init(OpState* st) const override {
    st->rnn = std::make_unique<RnnDescriptors>();
    RnnDescriptors& d = *st->rnn;
    RETURN_IF_CUDNN(cudnnCreateRNNDescriptor(&d.rnn));
    RETURN_IF_ERROR(SetRnnDescriptor(d.rnn, shape_, *dropout_));
    RETURN_IF_CUDNN(cudnnCreateRNNDataDescriptor(&d.x));
    RETURN_IF_CUDNN(cudnnCreateRNNDataDescriptor(&d.y));
    RETURN_IF_CUDNN(cudnnCreateTensorDescriptor(&d.h));
    return absl::OkStatus();
  }

  absl::Status Run(const std::vector<const DValue*>& in,
                   const std::vector<DValue*>& out, OpState* st,
                   const Context& ctx) const override {
    const DValue& x = *in[0];
    const SequenceLayout& l = *x.layout;
    const RnnDescriptors& d = *st->rnn;
    const int64_t batch = l.batch(), h = shape_.hidden;
    const int dirs = shape_.bidirectional ? 2 : 1;
    const cudnnDataType_t type = CudnnType(shape_.precision);
    const bool reduced = shape_.precision != Precision::kFp32;
    const bool bf16 = shape_.precision == Precision::kBf16;
    SortedLengths(l, &st->host_lengths);
    const int max_len = static_cast<int>(l.max_length());
    RETURN_IF_CUDNN(cudnnSetRNNDataDescriptor(
        d.x, type, CUDNN_RNN_DATA_LAYOUT_SEQ_MAJOR_PACKED,
        max_len, static_cast<int>(batch), static_cast<int>(shape_.input),
        st->host_lengths.data(), nullptr));
    RETURN_IF_CUDNN(cudnnSetRNNDataDescriptor(
        d.y, type, CUDNN_RNN_DATA_LAYOUT_SEQ_MAJOR_PACKED,
        max_len, static_cast<int>(batch), static_cast<int>(dirs * h),
        st->host_lengths.data(), nullptr));
    const int states = dirs * shape_.layers;
    const int dims[3] = {states, static_cast<int>(batch), static_cast<int>(h)};
    const int strides[3] = {static_cast<int>(batch * h), static_cast<int>(h),
                            1};
    RETURN_IF_CUDNN(cudnnSetTensorNdDescriptor(d.h, type, 3, dims, strides));

    // Buffers: 0 device lengths, 1 index, 2 hx, 3 cx, 4 hy, 5 cy,
    // 6 workspace, 7 reserve; in reduced precision 8 x, 9 y, 10 hx, 11 cx,
    // 12 hy, 13 cy in the storage type.
    // `n` floats at `from` as cuDNN's type: themselves, or converted into
    // buffer `slot`.
    auto as_stored = [&](const float* from, int64_t n,
                         size_t slot) -> absl::StatusOr<const void*> {
      if (!reduced || from == nullptr) return static_cast<const void*>(from);
      ASSIGN_OR_RETURN(uint16_t* to, st->Scratch<uint16_t>(slot, n));
      RETURN_IF_CUDA(FloatToReduced(from, to, n, bf16, ctx.stream));
      return static_cast<const void*>(to);
    };
    ASSIGN_OR_RETURN(int32_t* dev_lengths, st->Scratch<int32_t>(0, batch));
    RETURN_IF_CUDA(cudaMemcpyAsync(dev_lengths, st->host_lengths.data(),
                                   batch * sizeof(int32_t),
                                   cudaMemcpyHostToDevice, ctx.stream));
    // Initial states arrive in caller order; cuDNN wants them sorted.
    const bool has_h0 = in.size() > 1 && in[1] != nullptr;
    const bool has_c0 = in.size() > 2 && in[2] != nullptr;
    float* hx = nullptr;
    float* cx = nullptr;
    if (has_h0 || has_c0) {
      st->host_index.resize(batch);
      for (int64_t s = 0; s < batch; ++s) {
        st->host_index[s] = static_cast<int32_t>(l.original_index(s));
      }
      ASSIGN_OR_RETURN(const int32_t* order, st->UploadIndex(1, ctx));
      if (has_h0) {
        ASSIGN_OR_RETURN(hx, st->Scratch<float>(2, batch * h));
        RETURN_IF_CUDA(
            GatherRows(in[1]->data(), h, order, batch, hx, ctx.stream));
      }
      if (has_c0) {
        ASSIGN_OR_RETURN(cx, st->Scratch<float>(3, batch * h));
        RETURN_IF_CUDA(
            GatherRows(in[2]->data(), h, order, batch, cx, ctx.stream));
      }
    }
    const bool lstm = shape_.cell == RnnCell::kLstm;
    const bool want_h = needed_.size() > 1 && needed_[1];
    const bool want_c = lstm && needed_.size() > 2 && needed_[2];
    float* hy = nullptr;
    float* cy = nullptr;
    void* hy_stored = nullptr;
    void* cy_stored = nullptr;
    const int64_t state_count = states * batch * h;
    if (want_h) {
      ASSIGN_OR_RETURN(hy, st->Scratch<float>(4, state_count));
      hy_stored = hy;
      if (reduced) {
        ASSIGN_OR_RETURN(hy_stored, st->Scratch<uint16_t>(12, state_count));
      }
    }
    if (want_c) {
      ASSIGN_OR_RETURN(cy, st->Scratch<float>(5, state_count));
      cy_stored = cy;
      if (reduced) {
        ASSIGN_OR_RETURN(cy_stored, st->Scratch<uint16_t>(13, state_count));
      }
    }
    ASSIGN_OR_RETURN(const void* x_stored,
                     as_stored(x.data(), x.rows * shape_.input, 8));
    ASSIGN_OR_RETURN(const void* hx_stored, as_stored(hx, batch * h, 10));
    ASSIGN_OR_RETURN(const void* cx_stored, as_stored(cx, batch * h, 11));

    size_t work_bytes = 0, reserve_bytes = 0;
    RETURN_IF_CUDNN(cudnnGetRNNTempSpaceSizes(ctx.cudnn, d.rnn,
                                              CUDNN_FWD_MODE_INFERENCE,
                                              d.x, &work_bytes,
                                              &reserve_bytes));
    ASSIGN_OR_RETURN(char* work, st->Scratch<char>(6, work_bytes));
    ASSIGN_OR_RETURN(char* reserve, st->Scratch<char>(7, reserve_bytes));

    DValue& y = *out[0];
    RETURN_IF_ERROR(y.Reshape(layer_.output_type(0), x.rows, x.layout));
    void* y_stored = y.data();
    const int64_t y_count = x.rows * dirs * h;
    if (reduced) {
      ASSIGN_OR_RETURN(y_stored, st->Scratch<uint16_t>(9, y_count));
    }
    RETURN_IF_CUDNN(cudnnRNNForward(
        ctx.cudnn, d.rnn, CUDNN_FWD_MODE_INFERENCE, dev_lengths, d.x,
        x_stored, d.y, y_stored, d.h, hx_stored, hy_stored, d.h, cx_stored,
        cy_stored, space_bytes_, const_cast<float*>(space_), work_bytes, work,
        reserve_bytes, reserve));
    if (reduced) {
      RETURN_IF_CUDA(
          ReducedToFloat(y_stored, y.data(), y_count, bf16, ctx.stream));
      if (want_h) {
        RETURN_IF_CUDA(
            ReducedToFloat(hy_stored, hy, state_count, bf16, ctx.stream));
      }
      if (want_c) {
        RETURN_IF_CUDA(
            ReducedToFloat(cy_stored, cy, state_count, bf16, ctx.stream));
      }
    }

    // Final states back to caller order (one direction: layers that expose
    // them are never fused).
    if (want_h || want_c) {
      st->host_index.resize(batch);
      for (int64_t i = 0; i < batch; ++i) {
        st->host_index[i] = static_cast<int32_t>(l.sorted_position(i));
      }
      ASSIGN_OR_RETURN(const int32_t* back, st->UploadIndex(1, ctx));
      if (want_h) {
        RETURN_IF_ERROR(out[1]->Reshape(layer_.output_type(1), batch, nullptr));
        RETURN_IF_CUDA(
            GatherRows(hy, h, back, batch, out[1]->data(), ctx.stream));
      }
      if (want_c) {
        RETURN_IF_ERROR(out[2]->Reshape(layer_.output_type(2), batch, nullptr));
        RETURN_IF_CUDA(
            GatherRows(cy, h, back, batch, out[2]->data(), ctx.stream));
      }
    }
    return absl::OkStatus();
  }

 private:
  const Layer& layer_;
  RnnShape shape_;
  std::shared_ptr<DropoutState> dropout_;
  const float* space_;
  size_t space_bytes_;
  std::vector<bool> needed_;
};

// The original GRU (reset before the product), which cuDNN does not have:
// one input projection for the whole batch through cuBLAS, then per step
// two products and two kernels on the live rows.
// TODO: fuse a step into one persistent kernel; this form launches four
// times per step from the host.
class GruResetBeforeOp : public Op {
 public:
  GruResetBeforeOp(const Layer& layer, int64_t input, int64_t hidden,
                   DeviceMatrix weight_ih, const float* bias,
                   DeviceMatrix weight_hh, std::vector<bool> needed)
      : layer_(layer),
        input_(input),
        hidden_(hidden),
        weight_ih_(weight_ih),
        bias_(bias),
        weight_hh_(weight_hh),
        needed_(std::move(needed)) {}

  absl::Status Run(const std::vector<const DValue*>& in,
                   const std::vector<DValue*>& out, OpState* st,
                   const Context& ctx) const override {
    const DValue& x = *in[0];
    const SequenceLayout& l = *x.layout;
    const int64_t h = hidden_, batch = l.batch();
    // Buffers: 0 projections [rows, 3h], 1 r|z products [batch, 2h],
    // 2 reset state, 3 n products, 4 initial state (sorted), 5 index,
    // 6 reduced-precision staging.
    ASSIGN_OR_RETURN(float* xproj, st->Scratch<float>(0, x.rows * 3 * h));
    ASSIGN_OR_RETURN(float* hr, st->Scratch<float>(1, batch * 2 * h));
    ASSIGN_OR_RETURN(float* reset, st->Scratch<float>(2, batch * h));
    ASSIGN_OR_RETURN(float* hn, st->Scratch<float>(3, batch * h));
    ASSIGN_OR_RETURN(float* h0, st->Scratch<float>(4, batch * h));
    st->buffers.resize(std::max<size_t>(st->buffers.size(), 7));
    DeviceBuffer* staging = &st->buffers[6];
    RETURN_IF_ERROR(LinearProduct(ctx, weight_ih_, bias_, 3 * h, input_,
                                  x.data(), x.rows, xproj, staging));
    if (in.size() > 1 && in[1] != nullptr) {
      st->host_index.resize(batch);
      for (int64_t s = 0; s < batch; ++s) {
        st->host_index[s] = static_cast<int32_t>(l.original_index(s));
      }
      ASSIGN_OR_RETURN(const int32_t* order, st->UploadIndex(5, ctx));
      RETURN_IF_CUDA(GatherRows(in[1]->data(), h, order, batch, h0, ctx.stream));
    } else {
      RETURN_IF_CUDA(
          cudaMemsetAsync(h0, 0, batch * h * sizeof(float), ctx.stream));
    }
    DValue& y = *out[0];
    RETURN_IF_ERROR(y.Reshape(layer_.output_type(0), x.rows, x.layout));
    for (int64_t t = 0; t < l.max_length(); ++t) {
      const int64_t live = l.batch_size(t);
      // Sorted order keeps the live rows of a step leading, so the previous
      // step's first `live` rows are these rows' states.
      const float* prev = t == 0 ? h0 : y.data() + l.offset(t - 1) * h;
      const float* xt = xproj + l.offset(t) * 3 * h;
      RETURN_IF_ERROR(LinearProduct(ctx, weight_hh_, nullptr, 2 * h, h, prev,
                                    live, hr, staging));
      RETURN_IF_CUDA(GruResetState(xt, hr, prev, live, h, reset, ctx.stream));
      RETURN_IF_ERROR(LinearProduct(ctx, weight_hh_.At(2 * h * h), nullptr, h,
                                    h, reset, live, hn, staging));
      RETURN_IF_CUDA(GruUpdate(xt, hr, hn, prev, live, h,
                               y.data() + l.offset(t) * h, ctx.stream));
    }
    if (needed_.size() > 1 && needed_[1]) {
      st->host_index.resize(batch);
      for (int64_t i = 0; i < batch; ++i) {
        const int64_t s = l.sorted_position(i);
        st->host_index[i] =
            static_cast<int32_t>(l.row(s, l.sorted_length(s) - 1));
      }
      ASSIGN_OR_RETURN(const int32_t* last, st->UploadIndex(5, ctx));
      RETURN_IF_ERROR(out[1]->Reshape(layer_.output_type(1), batch, nullptr));
      RETURN_IF_CUDA(
          GatherRows(y.data(), h, last, batch, out[1]->data(), ctx.stream));
    }
    return absl::OkStatus();
  }

 private:
  const Layer& layer_;
  int64_t input_, hidden_;
  DeviceMatrix weight_ih_;
  const float* bias_;
  DeviceMatrix weight_hh_;
  std::vector<bool> needed_;
};

// An LSTM whose cell-state sequence is read (the "cells" port), which
// cuDNN does not give: the input projection for the whole batch, then per
// step one product and the cell kernel on the live rows, writing each
// step's states and cells in place.
class LstmWithCellsOp : public Op {
 public:
  LstmWithCellsOp(const Layer& layer, int64_t input, int64_t hidden,
                  DeviceMatrix weight_ih, const float* bias_ih,
                  DeviceMatrix weight_hh, const float* bias_hh,
                  std::vector<bool> needed)
      : layer_(layer),
        input_(input),
        hidden_(hidden),
        weight_ih_(weight_ih),
        bias_ih_(bias_ih),
        weight_hh_(weight_hh),
        bias_hh_(bias_hh),
        needed_(std::move(needed)) {}

  absl::Status Run(const std::vector<const DValue*>& in,
                   const std::vector<DValue*>& out, OpState* st,
                   const Context& ctx) const override {
    const DValue& x = *in[0];
    const SequenceLayout& l = *x.layout;
    const int64_t h = hidden_, g = 4 * h, batch = l.batch();
    // Buffers: 0 projections [rows, 4h], 1 recurrent products [batch, 4h],
    // 2 initial state, 3 initial cell, 4 index, 5 staging.
    st->buffers.resize(std::max<size_t>(st->buffers.size(), 6));
    ASSIGN_OR_RETURN(float* xproj, st->Scratch<float>(0, x.rows * g));
    ASSIGN_OR_RETURN(float* gh, st->Scratch<float>(1, batch * g));
    ASSIGN_OR_RETURN(float* h0, st->Scratch<float>(2, batch * h));
    ASSIGN_OR_RETURN(float* c0, st->Scratch<float>(3, batch * h));
    DeviceBuffer* staging = &st->buffers[5];
    RETURN_IF_ERROR(LinearProduct(ctx, weight_ih_, bias_ih_, g, input_,
                                  x.data(), x.rows, xproj, staging));
    st->host_index.resize(batch);
    for (int64_t s = 0; s < batch; ++s) {
      st->host_index[s] = static_cast<int32_t>(l.original_index(s));
    }
    ASSIGN_OR_RETURN(const int32_t* order, st->UploadIndex(4, ctx));
    for (int k = 0; k < 2; ++k) {
      float* to = k == 0 ? h0 : c0;
      const DValue* from =
          static_cast<int>(in.size()) > 1 + k ? in[1 + k] : nullptr;
      if (from == nullptr) {
        RETURN_IF_CUDA(
            cudaMemsetAsync(to, 0, batch * h * sizeof(float), ctx.stream));
      } else {
        RETURN_IF_CUDA(
            GatherRows(from->data(), h, order, batch, to, ctx.stream));
      }
    }
    DValue& y = *out[0];
    DValue& cells = *out[3];
    RETURN_IF_ERROR(y.Reshape(layer_.output_type(0), x.rows, x.layout));
    RETURN_IF_ERROR(cells.Reshape(layer_.output_type(3), x.rows, x.layout));
    for (int64_t t = 0; t < l.max_length(); ++t) {
      const int64_t live = l.batch_size(t), off = l.offset(t);
      // The live rows lead, so the previous step's first `live` rows hold
      // these rows' states; copy them into place and update them there.
      const float* prev_h = t == 0 ? h0 : y.data() + l.offset(t - 1) * h;
      const float* prev_c = t == 0 ? c0 : cells.data() + l.offset(t - 1) * h;
      RETURN_IF_CUDA(cudaMemcpyAsync(y.data() + off * h, prev_h,
                                     live * h * sizeof(float),
                                     cudaMemcpyDeviceToDevice, ctx.stream));
      RETURN_IF_CUDA(cudaMemcpyAsync(cells.data() + off * h, prev_c,
                                     live * h * sizeof(float),
                                     cudaMemcpyDeviceToDevice, ctx.stream));
      RETURN_IF_ERROR(LinearProduct(ctx, weight_hh_, bias_hh_, g, h,
                                    y.data() + off * h, live, gh, staging));
      RETURN_IF_CUDA(LstmStep(xproj + off * g, gh, live, h, y.data() + off * h,
                              cells.data() + off * h, ctx.stream));
    }
    // Final state and cell, in caller order.
    st->host_index.resize(batch);
    for (int64_t i = 0; i < batch; ++i) {
      const int64_t s = l.sorted_position(i);
      st->host_index[i] = static_cast<int32_t>(l.row(s, l.sorted_length(s) - 1));
    }
    ASSIGN_OR_RETURN(const int32_t* last, st->UploadIndex(4, ctx));
    for (int k = 1; k <= 2; ++k) {
      if (needed_.size() <= static_cast<size_t>(k) || !needed_[k]) continue;
      RETURN_IF_ERROR(out[k]->Reshape(layer_.output_type(k), batch, nullptr));
      RETURN_IF_CUDA(GatherRows(k == 1 ? y.data() : cells.data(), h, last,
                                batch, out[k]->data(), ctx.stream));
    }
    return absl::OkStatus();
  }

 private:
  const Layer& layer_;
  int64_t input_, hidden_;
  DeviceMatrix weight_ih_;
  const float* bias_ih_;
  DeviceMatrix weight_hh_;
  const float* bias_hh_;
  std::vector<bool> needed_;
};

absl::StatusOr<RnnCell> CellOf(const Layer& layer) {
  const std::string& type = layer.type();
  if (type == "LongShortTermMemoryLayer") return RnnCell::kLstm;
  if (type == "GatedRecurrentLayer") return RnnCell::kGru;
  if (type == "BasicRecurrentLayer") {
    return layer.spec().function() == "relu" ? RnnCell::kRelu : RnnCell::kTanh;
  }
  return absl::InvalidArgumentError("not a recurrent layer");
}

bool IsRecurrent(const Layer& layer) { return CellOf(layer).ok(); }

// The arrays of one recurrent layer, kept alive until they are on the
// device.
struct LoadedRecurrent {
  engine::Buffer<float> weight_ih, weight_hh, bias_ih, bias_hh;
  RecurrentArrays view;
};

absl::StatusOr<LoadedRecurrent> LoadRecurrent(const Layer& layer,
                                              int64_t input, Lowering& lw) {
  ASSIGN_OR_RETURN(RnnCell cell, CellOf(layer));
  const int64_t h = layer.spec().size(), g = GateCount(cell) * h;
  LoadedRecurrent r;
  ASSIGN_OR_RETURN(r.weight_ih, Array(layer, lw, "weight_ih", {g, input}));
  ASSIGN_OR_RETURN(r.weight_hh, Array(layer, lw, "weight_hh", {g, h}));
  ASSIGN_OR_RETURN(r.bias_ih, Array(layer, lw, "bias_ih", {g}));
  ASSIGN_OR_RETURN(r.bias_hh, Array(layer, lw, "bias_hh", {g}));
  r.view = {r.weight_ih.data(), r.weight_hh.data(), r.bias_ih.data(),
            r.bias_hh.data(), input, h};
  return r;
}

absl::StatusOr<std::unique_ptr<Op>> LowerRecurrent(
    const Layer& layer, int64_t input, const std::vector<bool>& needed,
    Lowering& lw) {
  ASSIGN_OR_RETURN(RnnCell cell, CellOf(layer));
  const int64_t h = layer.spec().size();
  ASSIGN_OR_RETURN(LoadedRecurrent r, LoadRecurrent(layer, input, lw));
  if (cell == RnnCell::kLstm && needed.size() > 3 && needed[3]) {
    ASSIGN_OR_RETURN(DeviceMatrix w_ih,
                     UploadMatrix(lw.residents, r.weight_ih.data(),
                                  4 * h * input, lw.precision));
    ASSIGN_OR_RETURN(DeviceMatrix w_hh,
                     UploadMatrix(lw.residents, r.weight_hh.data(), 4 * h * h,
                                  lw.precision));
    ASSIGN_OR_RETURN(const float* b_ih,
                     lw.residents->Upload(r.bias_ih.data(), 4 * h));
    ASSIGN_OR_RETURN(const float* b_hh,
                     lw.residents->Upload(r.bias_hh.data(), 4 * h));
    return std::unique_ptr<Op>(new LstmWithCellsOp(layer, input, h, w_ih, b_ih,
                                                   w_hh, b_hh, needed));
  }
  if (cell == RnnCell::kGru && layer.spec().reset_before()) {
    // Every bias folds into the input projection in this form.
    std::vector<float> bias(3 * h);
    for (int64_t i = 0; i < 3 * h; ++i) bias[i] = r.bias_ih[i] + r.bias_hh[i];
    ASSIGN_OR_RETURN(DeviceMatrix w_ih,
                     UploadMatrix(lw.residents, r.weight_ih.data(),
                                  3 * h * input, lw.precision));
    ASSIGN_OR_RETURN(const float* b, lw.residents->Upload(bias.data(), 3 * h));
    ASSIGN_OR_RETURN(DeviceMatrix w_hh,
                     UploadMatrix(lw.residents, r.weight_hh.data(), 3 * h * h,
                                  lw.precision));
    return std::unique_ptr<Op>(
        new GruResetBeforeOp(layer, input, h, w_ih, b, w_hh, needed));
  }
  RnnShape shape{cell, input, h, false, 1, lw.precision};
  ASSIGN_OR_RETURN(auto space, UploadWeightSpace(shape, {r.view}, lw));
  return std::unique_ptr<Op>(new CudnnRnnOp(layer, shape, space.first,
                                            space.second, needed, lw.dropout));
}

// ---------------------------------------------------------------------------
// Operators.

class NetMapOp : public Op {
 public:
  NetMapOp(const Layer& layer, std::unique_ptr<SubProgram> net)
      : layer_(layer), net_(std::move(net)) {}
  absl::Status Init(OpState* st) const override {
    ASSIGN_OR_RETURN(auto state, net_->NewState());
    st->nested.push_back(std::move(state));
    return absl::OkStatus();
  }
  absl::Status Run(const std::vector<const DValue*>& in,
                   const std::vector<DValue*>& out, OpState* st,
                   const Context& ctx) const override {
    // Row-wise ops look only at rows and widths: the packed rows are the
    // sub-net's batch of vectors.
    RETURN_IF_ERROR(net_->Run({in[0]}, st->nested[0].get(), ctx));
    for (int o = 0; o < net_->num_outputs(); ++o) {
      const DValue& v = net_->output(*st->nested[0], o);
      RETURN_IF_ERROR(
          out[o]->Reshape(layer_.output_type(o), v.rows, in[0]->layout));
      RETURN_IF_CUDA(cudaMemcpyAsync(out[o]->data(), v.data(),
                                     v.floats() * sizeof(float),
                                     cudaMemcpyDeviceToDevice, ctx.stream));
    }
    return absl::OkStatus();
  }

 private:
  const Layer& layer_;
  std::unique_ptr<SubProgram> net_;
};

enum class Join { kCatenate, kTotal, kMean };

class BidirectionalOp : public Op {
 public:
  BidirectionalOp(const Layer& layer, Join join,
                  std::unique_ptr<SubProgram> forward,
                  std::unique_ptr<SubProgram> backward)
      : layer_(layer),
        join_(join),
        forward_(std::move(forward)),
        backward_(std::move(backward)) {}
  absl::Status Init(OpState* st) const override {
    ASSIGN_OR_RETURN(auto f, forward_->NewState());
    ASSIGN_OR_RETURN(auto b, backward_->NewState());
    st->nested.push_back(std::move(f));
    st->nested.push_back(std::move(b));
    st->values.resize(2);
    return absl::OkStatus();
  }
  absl::Status Run(const std::vector<const DValue*>& in,
                   const std::vector<DValue*>& out, OpState* st,
                   const Context& ctx) const override {
    const DValue& x = *in[0];
    RETURN_IF_ERROR(forward_->Run({&x}, st->nested[0].get(), ctx));
    DValue& reversed = st->values[0];
    RETURN_IF_ERROR(Reverse(x, &reversed, st, 0, ctx));
    RETURN_IF_ERROR(backward_->Run({&reversed}, st->nested[1].get(), ctx));
    const DValue& f = forward_->output(*st->nested[0], 0);
    const DValue* b = &backward_->output(*st->nested[1], 0);
    if (f.type.sequence) {
      RETURN_IF_ERROR(Reverse(*b, &st->values[1], st, 1, ctx));
      b = &st->values[1];
    }
    DValue& y = *out[0];
    RETURN_IF_ERROR(y.Reshape(layer_.output_type(0), f.rows, f.layout));
    if (join_ == Join::kCatenate) {
      const int64_t w = f.type.width;
      RETURN_IF_CUDA(
          CopyColumns(f.data(), w, f.rows, y.data(), 2 * w, 0, ctx.stream));
      RETURN_IF_CUDA(
          CopyColumns(b->data(), w, f.rows, y.data(), 2 * w, w, ctx.stream));
      return absl::OkStatus();
    }
    RETURN_IF_CUDA(CombineElements(Combine::kAdd, f.data(), b->data(),
                                   y.data(), y.floats(), ctx.stream));
    if (join_ == Join::kMean) {
      RETURN_IF_CUDA(Scale(0.5f, y.data(), y.floats(), ctx.stream));
    }
    return absl::OkStatus();
  }

 private:
  const Layer& layer_;
  Join join_;
  std::unique_ptr<SubProgram> forward_, backward_;
};

// NetFoldOperator and NetFoldListOperator: the cell sub-net once per
// step on the live rows, as the CPU operator does; states stay on the
// device in sorted order.
// TODO: capture a step as a CUDA graph per live-row count; each step now
// launches the cell's kernels from the host.
class NetFoldOp : public Op {
 public:
  NetFoldOp(const Layer& layer, std::unique_ptr<SubProgram> cell,
            std::vector<int64_t> widths, bool list)
      : layer_(layer),
        cell_(std::move(cell)),
        widths_(std::move(widths)),
        list_(list) {}
  absl::Status Init(OpState* st) const override {
    ASSIGN_OR_RETURN(auto state, cell_->NewState());
    st->nested.push_back(std::move(state));
    st->values.resize(1 + widths_.size());
    return absl::OkStatus();
  }
  absl::Status Run(const std::vector<const DValue*>& in,
                   const std::vector<DValue*>& out, OpState* st,
                   const Context& ctx) const override {
    const DValue& x = *in[0];
    const SequenceLayout& l = *x.layout;
    const int64_t batch = l.batch();
    const int k = static_cast<int>(widths_.size());
    PortType element = x.type;
    element.sequence = false;
    element.layout = -1;
    // Initial states: zeros, or the inputs gathered into sorted order.
    st->host_index.resize(batch);
    for (int64_t s = 0; s < batch; ++s) {
      st->host_index[s] = static_cast<int32_t>(l.original_index(s));
    }
    ASSIGN_OR_RETURN(const int32_t* order, st->UploadIndex(0, ctx));
    int64_t total = 0;
    for (int j = 0; j < k; ++j) {
      DValue& state = st->values[1 + j];
      const PortType type{false, false, widths_[j], -1};
      RETURN_IF_ERROR(state.Reshape(type, batch, nullptr));
      const DValue* initial =
          1 + j < static_cast<int>(in.size()) ? in[1 + j] : nullptr;
      if (initial == nullptr) {
        RETURN_IF_CUDA(cudaMemsetAsync(state.data(), 0,
                                       batch * widths_[j] * sizeof(float),
                                       ctx.stream));
      } else {
        RETURN_IF_CUDA(GatherRows(initial->data(), widths_[j], order, batch,
                                  state.data(), ctx.stream));
      }
      if (list_) {
        RETURN_IF_ERROR(
            out[j]->Reshape(layer_.output_type(j), x.rows, x.layout));
      }
      total += widths_[j];
    }
    ASSIGN_OR_RETURN(float* staged, st->Scratch<float>(1, batch * total));
    std::vector<const DValue*> args(1 + k);
    for (int64_t t = 0; t < l.max_length(); ++t) {
      const int64_t live = l.batch_size(t);
      st->values[0].View(x, l.offset(t), live, element);
      args[0] = &st->values[0];
      for (int j = 0; j < k; ++j) {
        st->values[1 + j].rows = live;
        args[1 + j] = &st->values[1 + j];
      }
      RETURN_IF_ERROR(cell_->Run(args, st->nested[0].get(), ctx));
      // A cell may output a state input unchanged (or another's): stage
      // every new state before replacing any.
      float* at = staged;
      for (int j = 0; j < k; ++j) {
        const DValue& next = cell_->output(*st->nested[0], j);
        const size_t bytes = live * widths_[j] * sizeof(float);
        RETURN_IF_CUDA(cudaMemcpyAsync(at, next.data(), bytes,
                                       cudaMemcpyDeviceToDevice, ctx.stream));
        if (list_) {
          RETURN_IF_CUDA(cudaMemcpyAsync(
              out[j]->data() + l.offset(t) * widths_[j], at, bytes,
              cudaMemcpyDeviceToDevice, ctx.stream));
        }
        at += live * widths_[j];
      }
      at = staged;
      for (int j = 0; j < k; ++j) {
        RETURN_IF_CUDA(cudaMemcpyAsync(st->values[1 + j].data(), at,
                                       live * widths_[j] * sizeof(float),
                                       cudaMemcpyDeviceToDevice, ctx.stream));
        at += live * widths_[j];
      }
    }
    if (!list_) {
      st->host_index.resize(batch);
      for (int64_t i = 0; i < batch; ++i) {
        st->host_index[i] = static_cast<int32_t>(l.sorted_position(i));
      }
      ASSIGN_OR_RETURN(const int32_t* back, st->UploadIndex(2, ctx));
      for (int j = 0; j < k; ++j) {
        RETURN_IF_ERROR(out[j]->Reshape(layer_.output_type(j), batch, nullptr));
        RETURN_IF_CUDA(GatherRows(st->values[1 + j].data(), widths_[j], back,
                                  batch, out[j]->data(), ctx.stream));
      }
    }
    return absl::OkStatus();
  }

 private:
  const Layer& layer_;
  std::unique_ptr<SubProgram> cell_;
  std::vector<int64_t> widths_;
  bool list_;
};

// NetNestOperator and NetNestListOperator: the sub-net n times, its output
// fed back as its input.
class NetNestOp : public Op {
 public:
  NetNestOp(const Layer& layer, std::unique_ptr<SubProgram> net,
            int64_t iterations, bool list)
      : layer_(layer),
        net_(std::move(net)),
        iterations_(iterations),
        list_(list) {}
  absl::Status Init(OpState* st) const override {
    ASSIGN_OR_RETURN(auto state, net_->NewState());
    st->nested.push_back(std::move(state));
    st->values.resize(1);
    return absl::OkStatus();
  }
  absl::Status Run(const std::vector<const DValue*>& in,
                   const std::vector<DValue*>& out, OpState* st,
                   const Context& ctx) const override {
    const DValue& x = *in[0];
    DValue& carry = st->values[0];
    const int64_t n = iterations_;
    if (list_) {
      // Every instance gets n iterates; with equal lengths the sorted order
      // is the caller's, so iterate t of instance i is row t * batch + i.
      st->lengths.assign(x.rows, n);
      RETURN_IF_ERROR(st->layout.Plan(st->lengths));
      RETURN_IF_ERROR(
          out[0]->Reshape(layer_.output_type(0), n * x.rows, &st->layout));
    }
    const DValue* current = &x;
    for (int64_t t = 0; t < n; ++t) {
      RETURN_IF_ERROR(net_->Run({current}, st->nested[0].get(), ctx));
      const DValue& next = net_->output(*st->nested[0], 0);
      RETURN_IF_ERROR(carry.Reshape(x.type, next.rows, x.layout));
      RETURN_IF_CUDA(cudaMemcpyAsync(carry.data(), next.data(),
                                     next.floats() * sizeof(float),
                                     cudaMemcpyDeviceToDevice, ctx.stream));
      if (list_) {
        RETURN_IF_CUDA(cudaMemcpyAsync(
            out[0]->data() + t * x.rows * x.type.width, carry.data(),
            carry.floats() * sizeof(float), cudaMemcpyDeviceToDevice,
            ctx.stream));
      }
      current = &carry;
    }
    if (!list_) {
      RETURN_IF_ERROR(
          out[0]->Reshape(layer_.output_type(0), carry.rows, x.layout));
      RETURN_IF_CUDA(cudaMemcpyAsync(out[0]->data(), carry.data(),
                                     carry.floats() * sizeof(float),
                                     cudaMemcpyDeviceToDevice, ctx.stream));
    }
    return absl::OkStatus();
  }

 private:
  const Layer& layer_;
  std::unique_ptr<SubProgram> net_;
  int64_t iterations_;
  bool list_;
};

// AttentionLayer: the query (and for additive scores the keys) projected
// through cuBLAS, then one block per instance scores, softmaxes over the
// instance's own elements and averages the values.
class AttentionOp : public Op {
 public:
  enum class Score { kDot, kGeneral, kAdditive };
  AttentionOp(const Layer& layer, Score score, int64_t query_width,
              int64_t key_width, int64_t projected, DeviceMatrix query_proj,
              DeviceMatrix key_proj, const float* bias, const float* vector)
      : layer_(layer),
        score_(score),
        query_width_(query_width),
        key_width_(key_width),
        projected_(projected),
        query_proj_(query_proj),
        key_proj_(key_proj),
        bias_(bias),
        vector_(vector) {}
  absl::Status Run(const std::vector<const DValue*>& in,
                   const std::vector<DValue*>& out, OpState* st,
                   const Context& ctx) const override {
    const DValue& q = *in[0];
    const DValue& keys = *in[1];
    const DValue& values = in.size() > 2 && in[2] ? *in[2] : keys;
    const SequenceLayout& l = *keys.layout;
    const int64_t batch = l.batch();
    // Buffers: 0 offsets, 1 positions, 2 lengths, 3 projected queries,
    // 4 projected keys, 5 and 6 reduced-precision staging.
    st->buffers.resize(std::max<size_t>(st->buffers.size(), 7));
    st->host_index.resize(l.max_length());
    for (int64_t t = 0; t < l.max_length(); ++t) {
      st->host_index[t] = static_cast<int32_t>(l.offset(t));
    }
    ASSIGN_OR_RETURN(const int32_t* offsets, st->UploadIndex(0, ctx));
    st->host_index.resize(batch);
    for (int64_t i = 0; i < batch; ++i) {
      st->host_index[i] = static_cast<int32_t>(l.sorted_position(i));
    }
    ASSIGN_OR_RETURN(const int32_t* position, st->UploadIndex(1, ctx));
    for (int64_t i = 0; i < batch; ++i) {
      st->host_index[i] = static_cast<int32_t>(l.sorted_length(l.sorted_position(i)));
    }
    ASSIGN_OR_RETURN(const int32_t* length, st->UploadIndex(2, ctx));

    const float* query = q.data();
    const float* key = keys.data();
    int64_t width = query_width_;
    if (score_ != Score::kDot) {
      width = projected_;
      ASSIGN_OR_RETURN(float* p, st->Scratch<float>(3, q.rows * width));
      RETURN_IF_ERROR(LinearProduct(ctx, query_proj_, nullptr, width,
                                    query_width_, q.data(), q.rows, p,
                                    &st->buffers[5]));
      query = p;
    }
    if (score_ == Score::kAdditive) {
      ASSIGN_OR_RETURN(float* p, st->Scratch<float>(4, keys.rows * width));
      RETURN_IF_ERROR(LinearProduct(ctx, key_proj_, nullptr, width,
                                    key_width_, keys.data(), keys.rows, p,
                                    &st->buffers[6]));
      key = p;
    }
    RETURN_IF_ERROR(out[0]->Reshape(layer_.output_type(0), batch, nullptr));
    RETURN_IF_ERROR(
        out[1]->Reshape(layer_.output_type(1), keys.rows, keys.layout));
    RETURN_IF_CUDA(Attention(
        query, key, width, score_ == Score::kAdditive ? vector_ : nullptr,
        bias_, values.data(), values.type.width, offsets, position, length,
        batch, out[1]->data(), out[0]->data(), ctx.stream));
    return absl::OkStatus();
  }

 private:
  const Layer& layer_;
  Score score_;
  int64_t query_width_, key_width_, projected_;
  DeviceMatrix query_proj_, key_proj_;
  const float* bias_;
  const float* vector_;
};

absl::StatusOr<std::unique_ptr<Op>> LowerAttention(const Layer& layer,
                                                   int64_t query_width,
                                                   int64_t key_width,
                                                   Lowering& lw) {
  const std::string& score = layer.spec().score();
  if (score.empty() || score == "dot") {
    return std::unique_ptr<Op>(new AttentionOp(
        layer, AttentionOp::Score::kDot, query_width, key_width, key_width,
        {}, {}, nullptr, nullptr));
  }
  if (score == "general") {
    // q . (W k) = (W^T q) . k: the query projected by W^T [dk, dq].
    ASSIGN_OR_RETURN(auto w, Array(layer, lw, "weight",
                                   {query_width, key_width}));
    std::vector<float> wt(key_width * query_width);
    for (int64_t i = 0; i < query_width; ++i) {
      for (int64_t j = 0; j < key_width; ++j) {
        wt[j * query_width + i] = w[i * key_width + j];
      }
    }
    ASSIGN_OR_RETURN(DeviceMatrix proj,
                     UploadMatrix(lw.residents, wt.data(), wt.size(),
                                  lw.precision));
    return std::unique_ptr<Op>(new AttentionOp(
        layer, AttentionOp::Score::kGeneral, query_width, key_width,
        key_width, proj, {}, nullptr, nullptr));
  }
  const int64_t a = layer.spec().size();
  ASSIGN_OR_RETURN(auto wq, Array(layer, lw, "query_weight", {a, query_width}));
  ASSIGN_OR_RETURN(auto wk, Array(layer, lw, "key_weight", {a, key_width}));
  ASSIGN_OR_RETURN(auto b, Array(layer, lw, "bias", {a}));
  ASSIGN_OR_RETURN(auto v, Array(layer, lw, "vector", {a}));
  ASSIGN_OR_RETURN(DeviceMatrix dq, UploadMatrix(lw.residents, wq.data(),
                                                 a * query_width, lw.precision));
  ASSIGN_OR_RETURN(DeviceMatrix dk, UploadMatrix(lw.residents, wk.data(),
                                                 a * key_width, lw.precision));
  ASSIGN_OR_RETURN(const float* db, lw.residents->Upload(b.data(), a));
  ASSIGN_OR_RETURN(const float* dv, lw.residents->Upload(v.data(), a));
  return std::unique_ptr<Op>(new AttentionOp(
      layer, AttentionOp::Score::kAdditive, query_width, key_width, a, dq, dk,
      db, dv));
}

// A sub-net that is one recurrent layer reading the sub-net's input, with
// no initial states and only its sequence read: the shape cuDNN can run in
// both directions at once.
const Layer* SoleRecurrentLayer(const Graph& g) {
  if (g.num_nodes() != 1 || g.num_outputs() != 1) return nullptr;
  const Layer& layer = g.layer(0);
  if (!IsRecurrent(layer)) return nullptr;
  if (layer.type() == "GatedRecurrentLayer" && layer.spec().reset_before()) {
    return nullptr;
  }
  const auto& inputs = g.node_inputs(0);
  for (size_t p = 1; p < inputs.size(); ++p) {
    if (inputs[p]) return nullptr;
  }
  const Graph::Source out = g.output_source(0);
  if (out.node != 0 || out.port != 0) return nullptr;
  return &layer;
}

absl::StatusOr<std::unique_ptr<Op>> LowerBidirectional(const Layer& layer,
                                                       int64_t input,
                                                       Lowering& lw) {
  const std::string& join = layer.spec().join();
  Join j = Join::kCatenate;
  if (join == "total") j = Join::kTotal;
  if (join == "mean") j = Join::kMean;
  const std::vector<const Graph*> nets = layer.subnets();
  const Layer* f = SoleRecurrentLayer(*nets[0]);
  const Layer* b = SoleRecurrentLayer(*nets[1]);
  if (j == Join::kCatenate && f != nullptr && b != nullptr &&
      f->type() == b->type() && f->spec().size() == b->spec().size() &&
      f->spec().function() == b->spec().function()) {
    // One cuDNN call for both directions: its output is the forward
    // sequence and the (length-aware) backward one side by side, which is
    // the catenate join.
    ASSIGN_OR_RETURN(RnnCell cell, CellOf(*f));
    ASSIGN_OR_RETURN(LoadedRecurrent fw, LoadRecurrent(*f, input, lw));
    ASSIGN_OR_RETURN(LoadedRecurrent bw, LoadRecurrent(*b, input, lw));
    RnnShape shape{cell, input, f->spec().size(), true, 1, lw.precision};
    ASSIGN_OR_RETURN(auto space,
                     UploadWeightSpace(shape, {fw.view, bw.view}, lw));
    return std::unique_ptr<Op>(new CudnnRnnOp(
        layer, shape, space.first, space.second, {true}, lw.dropout));
  }
  ASSIGN_OR_RETURN(auto forward, SubProgram::Lower(*nets[0], lw));
  ASSIGN_OR_RETURN(auto backward, SubProgram::Lower(*nets[1], lw));
  return std::unique_ptr<Op>(
      new BidirectionalOp(layer, j, std::move(forward), std::move(backward)));
}

// A node whose work a fused op later in the graph does; nothing reads its
// outputs.
class FusedAwayOp : public Op {
 public:
  absl::Status Run(const std::vector<const DValue*>&,
                   const std::vector<DValue*>&, OpState*,
                   const Context&) const override {
    return absl::OkStatus();
  }
};

// For planning: the single cuDNN-runnable recurrence of a node, or nothing.
// `pair` gets the backward layer of a fusable bidirectional operator.
const Layer* CudnnRecurrence(const Layer& layer, const Layer** pair) {
  *pair = nullptr;
  if (IsRecurrent(layer)) {
    if (layer.type() == "GatedRecurrentLayer" && layer.spec().reset_before()) {
      return nullptr;
    }
    return &layer;
  }
  if (layer.type() != "NetBidirectionalOperator") return nullptr;
  const std::string& join = layer.spec().join();
  if (!join.empty() && join != "catenate") return nullptr;
  const std::vector<const Graph*> nets = layer.subnets();
  const Layer* f = SoleRecurrentLayer(*nets[0]);
  const Layer* b = SoleRecurrentLayer(*nets[1]);
  if (f == nullptr || b == nullptr || f->type() != b->type() ||
      f->spec().size() != b->spec().size() ||
      f->spec().function() != b->spec().function()) {
    return nullptr;
  }
  *pair = b;
  return f;
}

// Nodes [first, last] of `graph` as one multi-layer cuDNN call.
absl::StatusOr<std::unique_ptr<Op>> LowerFusedRun(const Graph& graph,
                                                  int first, int last,
                                                  int64_t input,
                                                  Lowering& lw) {
  const Layer* backward = nullptr;
  const Layer* forward = CudnnRecurrence(graph.layer(first), &backward);
  ASSIGN_OR_RETURN(RnnCell cell, CellOf(*forward));
  RnnShape shape{cell,         input, forward->spec().size(),
                 backward != nullptr, last - first + 1, lw.precision};
  const int64_t dirs = shape.bidirectional ? 2 : 1;
  std::vector<LoadedRecurrent> loaded;
  for (int n = first; n <= last; ++n) {
    const Layer* b = nullptr;
    const Layer* f = CudnnRecurrence(graph.layer(n), &b);
    const int64_t width = n == first ? input : dirs * shape.hidden;
    ASSIGN_OR_RETURN(LoadedRecurrent fw, LoadRecurrent(*f, width, lw));
    loaded.push_back(std::move(fw));
    if (b != nullptr) {
      ASSIGN_OR_RETURN(LoadedRecurrent bw, LoadRecurrent(*b, width, lw));
      loaded.push_back(std::move(bw));
    }
  }
  std::vector<RecurrentArrays> views;
  for (const LoadedRecurrent& r : loaded) views.push_back(r.view);
  ASSIGN_OR_RETURN(auto space, UploadWeightSpace(shape, views, lw));
  return std::unique_ptr<Op>(new CudnnRnnOp(graph.layer(last), shape,
                                            space.first, space.second, {true},
                                            lw.dropout));
}

const std::map<std::string, Activation>& Activations() {
  static const auto* functions = new std::map<std::string, Activation>{
      {"tanh", Activation::kTanh},         {"sigmoid", Activation::kSigmoid},
      {"relu", Activation::kRelu},         {"elu", Activation::kElu},
      {"softplus", Activation::kSoftplus}, {"gelu", Activation::kGelu},
      {"identity", Activation::kIdentity}, {"negate", Activation::kNegate},
      {"one_minus", Activation::kOneMinus}, {"exp", Activation::kExp},
      {"square", Activation::kSquare},
  };
  return *functions;
}

// The op for one node. `widths` are the widths of the node's inputs (0
// for an unconnected port); `needed` says which of its output ports
// anything reads.
absl::StatusOr<std::unique_ptr<Op>> LowerNode(
    const Layer& layer, const std::vector<int64_t>& widths,
    const std::vector<bool>& needed, Lowering& lw) {
  const std::string& type = layer.type();
  const int64_t input = widths.empty() ? 0 : widths[0];
  if (type == "EmbeddingLayer") {
    const int64_t d = layer.output_type(0).width;
    ASSIGN_OR_RETURN(auto table, Array(layer, lw, "weight", {input, d}));
    ASSIGN_OR_RETURN(const float* t, lw.residents->Upload(table.data(),
                                                           input * d));
    return std::unique_ptr<Op>(new EmbeddingOp(layer, t));
  }
  if (type == "LinearLayer") {
    const int64_t n = layer.output_type(0).width;
    ASSIGN_OR_RETURN(auto w, Array(layer, lw, "weight", {n, input}));
    ASSIGN_OR_RETURN(auto b, Array(layer, lw, "bias", {n}));
    ASSIGN_OR_RETURN(DeviceMatrix dw, UploadMatrix(lw.residents, w.data(),
                                                   n * input, lw.precision));
    ASSIGN_OR_RETURN(const float* db, lw.residents->Upload(b.data(), n));
    return std::unique_ptr<Op>(new LinearOp(layer, input, dw, db));
  }
  if (type == "ElementwiseLayer") {
    auto it = Activations().find(layer.spec().function());
    if (it == Activations().end()) {
      return Unimplemented(layer, "function '" + layer.spec().function() + "'");
    }
    return std::unique_ptr<Op>(new ActivationOp(layer, it->second));
  }
  if (type == "SoftmaxLayer") return std::unique_ptr<Op>(new SoftmaxOp(layer));
  if (type == "CatenateLayer") {
    return std::unique_ptr<Op>(new CombineOp(layer, std::nullopt));
  }
  if (type == "TotalLayer" || type == "DropoutLayer" || type == "ReshapeLayer") {
    // One input: a copy; several: their sum.
    return std::unique_ptr<Op>(new CombineOp(layer, Combine::kAdd));
  }
  if (type == "TimesLayer") {
    return std::unique_ptr<Op>(new CombineOp(layer, Combine::kMultiply));
  }
  if (type == "SubtractLayer") {
    return std::unique_ptr<Op>(new CombineOp(layer, Combine::kSubtract));
  }
  if (type == "SequenceLastLayer") {
    return std::unique_ptr<Op>(new SequenceLastOp(layer));
  }
  if (type == "SequenceReverseLayer") {
    return std::unique_ptr<Op>(new SequenceReverseOp());
  }
  if (type == "SequenceMostLayer" || type == "SequenceRestLayer") {
    return std::unique_ptr<Op>(
        new DropOneOp(layer, type == "SequenceRestLayer"));
  }
  if (IsRecurrent(layer)) return LowerRecurrent(layer, input, needed, lw);
  if (type == "NetMapOperator") {
    ASSIGN_OR_RETURN(auto net, SubProgram::Lower(*layer.subnets()[0], lw));
    return std::unique_ptr<Op>(new NetMapOp(layer, std::move(net)));
  }
  if (type == "NetBidirectionalOperator") {
    return LowerBidirectional(layer, input, lw);
  }
  if (type == "AttentionLayer") {
    return LowerAttention(layer, input, widths.size() > 1 ? widths[1] : 0, lw);
  }
  if (type == "NetFoldOperator" || type == "NetFoldListOperator") {
    ASSIGN_OR_RETURN(auto cell, SubProgram::Lower(*layer.subnets()[0], lw));
    std::vector<int64_t> widths;
    for (int j = 0; j < layer.num_outputs(); ++j) {
      widths.push_back(layer.output_type(j).width);
    }
    return std::unique_ptr<Op>(new NetFoldOp(layer, std::move(cell), widths,
                                             type == "NetFoldListOperator"));
  }
  if (type == "NetNestOperator" || type == "NetNestListOperator") {
    ASSIGN_OR_RETURN(auto net, SubProgram::Lower(*layer.subnets()[0], lw));
    return std::unique_ptr<Op>(
        new NetNestOp(layer, std::move(net), layer.spec().iterations(),
                      type == "NetNestListOperator"));
  }
  return Unimplemented(layer, "this layer type");
}

absl::StatusOr<std::unique_ptr<SubProgram>> SubProgram::Lower(
    const Graph& graph, Lowering& lw) {
  auto program = std::make_unique<SubProgram>();
  // Which output ports anything reads.
  std::vector<std::vector<bool>> needed(graph.num_nodes());
  for (int n = 0; n < graph.num_nodes(); ++n) {
    needed[n].assign(graph.layer(n).num_outputs(), false);
  }
  auto mark = [&](Graph::Source s) {
    if (s.node >= 0) needed[s.node][s.port] = true;
  };
  for (int n = 0; n < graph.num_nodes(); ++n) {
    for (const auto& s : graph.node_inputs(n)) {
      if (s) mark(*s);
    }
  }
  for (int o = 0; o < graph.num_outputs(); ++o) mark(graph.output_source(o));

  // Stacks that run as one multi-layer cuDNN call.
  std::vector<int> reads(graph.num_nodes(), 0);  // of each node's port 0
  auto count = [&](Graph::Source s) {
    if (s.node >= 0 && s.port == 0) ++reads[s.node];
  };
  for (int n = 0; n < graph.num_nodes(); ++n) {
    for (const auto& s : graph.node_inputs(n)) {
      if (s) count(*s);
    }
  }
  for (int o = 0; o < graph.num_outputs(); ++o) count(graph.output_source(o));
  std::vector<RnnNode> plan(graph.num_nodes());
  for (int n = 0; n < graph.num_nodes(); ++n) {
    const Layer* backward = nullptr;
    const Layer* r = CudnnRecurrence(graph.layer(n), &backward);
    if (r == nullptr) continue;
    RnnNode& p = plan[n];
    p.cudnn = true;
    p.cell = *CellOf(*r);
    p.hidden = r->spec().size();
    p.bidirectional = backward != nullptr;
    const auto& inputs = graph.node_inputs(n);
    p.reads_only_previous = !inputs.empty() && inputs[0] &&
                            inputs[0]->node == n - 1 && inputs[0]->port == 0;
    for (size_t k = 1; k < inputs.size(); ++k) {
      if (inputs[k]) {
        p.reads_only_previous = false;
        p.uses_states = true;
      }
    }
    for (size_t k = 1; k < needed[n].size(); ++k) {
      if (needed[n][k]) p.uses_states = true;
    }
    const bool next_reads = n + 1 < graph.num_nodes() &&
                            !graph.node_inputs(n + 1).empty() &&
                            graph.node_inputs(n + 1)[0] &&
                            graph.node_inputs(n + 1)[0]->node == n &&
                            graph.node_inputs(n + 1)[0]->port == 0;
    p.output_read_elsewhere = reads[n] > (next_reads ? 1 : 0);
  }
  std::vector<int> run_end(graph.num_nodes(), -1);  // first node -> last
  std::vector<int> run_start(graph.num_nodes(), -1);  // last node -> first
  for (const auto& [first, last] : FuseRecurrentRuns(plan)) {
    run_end[first] = last;
    run_start[last] = first;
    for (int n = first; n < last; ++n) run_end[n] = last;
  }

  auto width_of = [&](const std::optional<Graph::Source>& s) -> int64_t {
    if (!s) return 0;
    return s->node < 0 ? graph.input_type(-1 - s->node).width
                       : graph.layer(s->node).output_type(s->port).width;
  };
  for (int n = 0; n < graph.num_nodes(); ++n) {
    const Layer& layer = graph.layer(n);
    const auto& inputs = graph.node_inputs(n);
    if (run_start[n] >= 0) {
      // The last node of a fused run does the whole run, reading the
      // first node's input.
      const int first = run_start[n];
      const auto& first_inputs = graph.node_inputs(first);
      ASSIGN_OR_RETURN(
          std::unique_ptr<Op> op,
          LowerFusedRun(graph, first, n, width_of(first_inputs[0]), lw));
      program->nodes_.push_back(
          Node{std::move(op), {first_inputs[0]}, layer.num_outputs()});
      continue;
    }
    if (run_end[n] >= 0) {
      program->nodes_.push_back(
          Node{std::make_unique<FusedAwayOp>(), {}, layer.num_outputs()});
      continue;
    }
    std::vector<int64_t> widths;
    for (const auto& s : inputs) widths.push_back(width_of(s));
    ASSIGN_OR_RETURN(std::unique_ptr<Op> op,
                     LowerNode(layer, widths, needed[n], lw));
    program->nodes_.push_back(Node{std::move(op), inputs, layer.num_outputs()});
  }
  for (int o = 0; o < graph.num_outputs(); ++o) {
    program->outputs_.push_back(graph.output_source(o));
  }
  return program;
}

// ---------------------------------------------------------------------------
// The program and its workspaces.

class CudaWorkspace : public DeviceWorkspace {
 public:
  ~CudaWorkspace() override {
    state.reset();
    inputs.clear();
    for (cudaEvent_t e : events) {
      if (e != nullptr) cudaEventDestroy(e);
    }
    if (ctx.cudnn != nullptr) cudnnDestroy(ctx.cudnn);
    if (ctx.cublas != nullptr) cublasDestroy(ctx.cublas);
    if (ctx.stream != nullptr) cudaStreamDestroy(ctx.stream);
  }

  DeviceTimings timings() const override { return last; }

  Context ctx;
  std::unique_ptr<ProgramState> state;
  std::vector<DValue> inputs;
  std::vector<Value> outputs;
  // Recorded before the upload, after it, after the layers and after the
  // download.
  cudaEvent_t events[4] = {nullptr, nullptr, nullptr, nullptr};
  DeviceTimings last;
};

absl::Status CreateHandles(int device, Context* ctx) {
  ctx->device = device;
  RETURN_IF_CUDA(cudaSetDevice(device));
  RETURN_IF_CUDA(cudaStreamCreateWithFlags(&ctx->stream, cudaStreamNonBlocking));
  RETURN_IF_CUBLAS(cublasCreate(&ctx->cublas));
  RETURN_IF_CUBLAS(cublasSetStream(ctx->cublas, ctx->stream));
  RETURN_IF_CUDNN(cudnnCreate(&ctx->cudnn));
  RETURN_IF_CUDNN(cudnnSetStream(ctx->cudnn, ctx->stream));
  return absl::OkStatus();
}

class CudaProgram : public DeviceProgram {
 public:
  CudaProgram(DeviceInfo info, Residents residents,
              std::unique_ptr<SubProgram> main)
      : info_(std::move(info)),
        residents_(std::move(residents)),
        main_(std::move(main)) {}

  std::string device_name() const override {
    return absl::StrFormat("cuda:%d (%s)", info_.ordinal, info_.name);
  }
  int64_t resident_bytes() const override { return residents_.bytes; }

  absl::StatusOr<std::unique_ptr<DeviceWorkspace>> NewWorkspace()
      const override {
    auto ws = std::make_unique<CudaWorkspace>();
    RETURN_IF_ERROR(CreateHandles(info_.ordinal, &ws->ctx));
    for (cudaEvent_t& e : ws->events) RETURN_IF_CUDA(cudaEventCreate(&e));
    ASSIGN_OR_RETURN(ws->state, main_->NewState());
    return ws;
  }

  absl::Status Run(absl::Span<const Value* const> inputs,
                   DeviceWorkspace* workspace,
                   std::vector<const Value*>* outputs) const override {
    auto* ws = static_cast<CudaWorkspace*>(workspace);
    const Context& ctx = ws->ctx;
    RETURN_IF_CUDA(cudaSetDevice(ctx.device));
    RETURN_IF_CUDA(cudaEventRecord(ws->events[0], ctx.stream));
    ws->inputs.resize(inputs.size());
    std::vector<const DValue*> in;
    for (size_t i = 0; i < inputs.size(); ++i) {
      const Value& v = *inputs[i];
      DValue& d = ws->inputs[i];
      RETURN_IF_ERROR(d.Reshape(v.type, v.rows, v.layout));
      const void* src = v.type.tokens ? static_cast<const void*>(v.ids.data())
                                      : static_cast<const void*>(v.data.data());
      const size_t bytes =
          v.rows * (v.type.tokens ? sizeof(int32_t) : v.type.width * 4);
      RETURN_IF_CUDA(cudaMemcpyAsync(d.buffer.as<void>(), src, bytes,
                                     cudaMemcpyHostToDevice, ctx.stream));
      in.push_back(&d);
    }
    RETURN_IF_CUDA(cudaEventRecord(ws->events[1], ctx.stream));
    RETURN_IF_ERROR(main_->Run(in, ws->state.get(), ctx));
    RETURN_IF_CUDA(cudaEventRecord(ws->events[2], ctx.stream));
    ws->outputs.resize(main_->num_outputs());
    outputs->resize(main_->num_outputs());
    for (int o = 0; o < main_->num_outputs(); ++o) {
      const DValue& d = main_->output(*ws->state, o);
      Value& v = ws->outputs[o];
      v.Reshape(d.type, d.rows, d.layout);
      RETURN_IF_CUDA(cudaMemcpyAsync(v.data.data(), d.data(),
                                     d.floats() * sizeof(float),
                                     cudaMemcpyDeviceToHost, ctx.stream));
      (*outputs)[o] = &v;
    }
    RETURN_IF_CUDA(cudaEventRecord(ws->events[3], ctx.stream));
    RETURN_IF_CUDA(cudaStreamSynchronize(ctx.stream));
    RETURN_IF_CUDA(cudaEventElapsedTime(&ws->last.upload_ms, ws->events[0],
                                        ws->events[1]));
    RETURN_IF_CUDA(cudaEventElapsedTime(&ws->last.compute_ms, ws->events[1],
                                        ws->events[2]));
    RETURN_IF_CUDA(cudaEventElapsedTime(&ws->last.download_ms, ws->events[2],
                                        ws->events[3]));
    return absl::OkStatus();
  }

 private:
  DeviceInfo info_;
  Residents residents_;
  std::unique_ptr<SubProgram> main_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<DeviceProgram>> Compile(
    const Graph& graph, WeightSource* weights, const NetOptions& options) {
  ASSIGN_OR_RETURN(DeviceInfo info, ProbeDevice(options.device.ordinal));
  const int64_t needed = graph.parameter_count() *
                        static_cast<int64_t>(ElementBytes(options.precision));
  const int64_t budget = options.device_memory_budget;
  if (budget > 0 && needed > budget) {
    return absl::ResourceExhaustedError(absl::StrFormat(
        "the weights need %d bytes of device memory; the budget is %d bytes",
        needed, budget));
  }
  if (needed > info.free_bytes) {
    return absl::ResourceExhaustedError(absl::StrFormat(
        "the weights need %d bytes of device memory; %s has %d bytes free",
        needed, options.device.ToString(), info.free_bytes));
  }
  Context compile_ctx;
  struct Release {
    Context* c;
    ~Release() {
      if (c->cudnn) cudnnDestroy(c->cudnn);
      if (c->cublas) cublasDestroy(c->cublas);
      if (c->stream) cudaStreamDestroy(c->stream);
    }
  } release{&compile_ctx};
  RETURN_IF_ERROR(CreateHandles(info.ordinal, &compile_ctx));
  Residents residents;
  ASSIGN_OR_RETURN(std::shared_ptr<DropoutState> dropout,
                   MakeDropout());
  Lowering lw{weights, &residents, compile_ctx.cudnn, dropout,
              options.precision};
  ASSIGN_OR_RETURN(auto main, SubProgram::Lower(graph, lw));
  if (budget > 0 && residents.bytes > budget) {
    return absl::ResourceExhaustedError(absl::StrFormat(
        "the weights take %d bytes of device memory (cuDNN's weight spaces "
        "included); the budget is %d bytes",
        residents.bytes, budget));
  }
  return std::unique_ptr<DeviceProgram>(
      new CudaProgram(std::move(info), std::move(residents), std::move(main)));
}

}  // namespace rnnserve::engine::cuda

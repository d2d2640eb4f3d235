// The CUDA backend's recurrences: cuDNN's RNN API for the recurrent
// layers (one layer, both directions, or a fused stack in one call), and
// per-step forms of the engine's own where cuDNN lacks the cell or the
// output.
#include <cublas_v2.h>
#include <cuda_runtime_api.h>
#include <cudnn.h>

#include <string>
#include <vector>

#include "absl/strings/str_format.h"
#include "engine/cuda/check.h"
#include "engine/cuda/device_graph.h"
#include "engine/cuda/kernels.h"
#include "engine/cuda/rnn_weights.h"
#include "engine/status_macros.h"

namespace rnnserve::engine::cuda {
namespace {

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
  PlaceFn place =
      [&](int pseudo_layer,
          int id) -> absl::StatusOr<std::pair<ParamPlace, ParamPlace>> {
    void* m_addr = nullptr;
    void* b_addr = nullptr;
    RETURN_IF_CUDNN(cudnnGetRNNWeightParams(
        lw.cudnn, desc, pseudo_layer, space_bytes, probe.as<void>(), id,
        cleanup.m, &m_addr, cleanup.b, &b_addr));
    auto describe = [&](cudnnTensorDescriptor_t t, void* addr,
                        ParamPlace* p) -> absl::Status {
      cudnnDataType_t type;
      int nb = 0, dims[3] = {0, 0, 0}, strides[3] = {0, 0, 0};
      RETURN_IF_CUDNN(
          cudnnGetTensorNdDescriptor(t, 3, &type, &nb, dims, strides));
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
        p->cols =
            nb >= 3 ? int64_t{dims[1]} * dims[2] : (nb == 2 ? dims[1] : 1);
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
  RETURN_IF_ERROR(
      FillWeightSpace(shape.cell, arrays, place, image.data(), elements));
  if (shape.precision == Precision::kFp32) {
    RETURN_IF_CUDA(cudaMemcpy(probe.as<float>(), image.data(), space_bytes,
                              cudaMemcpyHostToDevice));
  } else {
    const std::vector<uint16_t> reduced =
        ToReduced(image.data(), elements, shape.precision);
    RETURN_IF_CUDA(cudaMemcpy(probe.as<void>(), reduced.data(), elements * 2,
                              cudaMemcpyHostToDevice));
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
        d.x, type, CUDNN_RNN_DATA_LAYOUT_SEQ_MAJOR_PACKED, max_len,
        static_cast<int>(batch), static_cast<int>(shape_.input),
        st->host_lengths.data(), nullptr));
    RETURN_IF_CUDNN(cudnnSetRNNDataDescriptor(
        d.y, type, CUDNN_RNN_DATA_LAYOUT_SEQ_MAJOR_PACKED, max_len,
        static_cast<int>(batch), static_cast<int>(dirs * h),
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
      ASSIGN_OR_RETURN(uint16_t * to, st->Scratch<uint16_t>(slot, n));
      RETURN_IF_CUDA(FloatToReduced(from, to, n, bf16, ctx.stream));
      return static_cast<const void*>(to);
    };
    ASSIGN_OR_RETURN(int32_t * dev_lengths, st->Scratch<int32_t>(0, batch));
    RETURN_IF_CUDA(cudaMemcpyAsync(dev_lengths, st->host_lengths.data(),
                                   batch * sizeof(int32_t),
                                   cudaMemcpyHostToDevice, ctx.stream));
    // Initial states arrive in caller order; cuDNN wants them sorted.
    const bool has_h0 = in.size() > 1 && in[1] != nullptr;
    const bool has_c0 = in.size() > 2 && in[2] != nullptr;
    float* hx = nullptr;
    float* cx = nullptr;
    if (has_h0 || has_c0) {
      ASSIGN_OR_RETURN(
          const int32_t* order,
          UploadLayoutIndex(LayoutIndex::kIntoSorted, l, st, 1, ctx));
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
                                              CUDNN_FWD_MODE_INFERENCE, d.x,
                                              &work_bytes, &reserve_bytes));
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
        ctx.cudnn, d.rnn, CUDNN_FWD_MODE_INFERENCE, dev_lengths, d.x, x_stored,
        d.y, y_stored, d.h, hx_stored, hy_stored, d.h, cx_stored, cy_stored,
        space_bytes_, const_cast<float*>(space_), work_bytes, work,
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
      ASSIGN_OR_RETURN(
          const int32_t* back,
          UploadLayoutIndex(LayoutIndex::kIntoCaller, l, st, 1, ctx));
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
    const DValue* initial = in.size() > 1 ? in[1] : nullptr;
    ASSIGN_OR_RETURN(const int32_t* order,
                     SortedOrderIfAny({initial}, l, st, 5, ctx));
    RETURN_IF_ERROR(GatherOrZero(initial, h, order, batch, h0, ctx));
    DValue& y = *out[0];
    RETURN_IF_ERROR(y.Reshape(layer_.output_type(0), x.rows, x.layout));
    for (int64_t t = 0; t < l.max_length(); ++t) {
      const int64_t live = l.batch_size(t);
      // Sorted order keeps the live rows of a step leading, so the previous
      // step's first `live` rows are these rows' states.
      const float* prev = t == 0 ? h0 : y.data() + l.offset(t - 1) * h;
      RETURN_IF_ERROR(GruResetBeforeStep(
          ctx, weight_hh_, xproj + l.offset(t) * 3 * h, prev, live, h, hr,
          reset, hn, y.data() + l.offset(t) * h, staging));
    }
    if (needed_.size() > 1 && needed_[1]) {
      ASSIGN_OR_RETURN(
          const int32_t* last,
          UploadLayoutIndex(LayoutIndex::kLastElements, l, st, 5, ctx));
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
// TODO: capture the step loop as a CUDA graph; each step now launches its
// copies, product and kernel from the host.
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
    const DValue* state0 = in.size() > 1 ? in[1] : nullptr;
    const DValue* cell0 = in.size() > 2 ? in[2] : nullptr;
    ASSIGN_OR_RETURN(const int32_t* order,
                     SortedOrderIfAny({state0, cell0}, l, st, 4, ctx));
    RETURN_IF_ERROR(GatherOrZero(state0, h, order, batch, h0, ctx));
    RETURN_IF_ERROR(GatherOrZero(cell0, h, order, batch, c0, ctx));
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
    ASSIGN_OR_RETURN(
        const int32_t* last,
        UploadLayoutIndex(LayoutIndex::kLastElements, l, st, 4, ctx));
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

}  // namespace

absl::Status GruResetBeforeStep(const Context& ctx, const DeviceMatrix& w_hh,
                                const float* x, const float* prev, int64_t rows,
                                int64_t h, float* hr, float* reset, float* hn,
                                float* next, DeviceBuffer* staging) {
  // r|z products of h, then n's product of r * h, then the update.
  RETURN_IF_ERROR(
      LinearProduct(ctx, w_hh, nullptr, 2 * h, h, prev, rows, hr, staging));
  RETURN_IF_CUDA(GruResetState(x, hr, prev, rows, h, reset, ctx.stream));
  RETURN_IF_ERROR(LinearProduct(ctx, w_hh.At(2 * h * h), nullptr, h, h, reset,
                                rows, hn, staging));
  RETURN_IF_CUDA(GruUpdate(x, hr, hn, prev, rows, h, next, ctx.stream));
  return absl::OkStatus();
}

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

absl::StatusOr<LoadedRecurrent> LoadRecurrent(const Layer& layer, int64_t input,
                                              Lowering& lw) {
  ASSIGN_OR_RETURN(RnnCell cell, CellOf(layer));
  const int64_t h = layer.spec().size(), g = GateCount(cell) * h;
  LoadedRecurrent r;
  ASSIGN_OR_RETURN(r.weight_ih, Array(layer, lw, "weight_ih", {g, input}));
  ASSIGN_OR_RETURN(r.weight_hh, Array(layer, lw, "weight_hh", {g, h}));
  ASSIGN_OR_RETURN(r.bias_ih, Array(layer, lw, "bias_ih", {g}));
  ASSIGN_OR_RETURN(r.bias_hh, Array(layer, lw, "bias_hh", {g}));
  r.view = {r.weight_ih.data(),
            r.weight_hh.data(),
            r.bias_ih.data(),
            r.bias_hh.data(),
            input,
            h};
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
    return std::unique_ptr<Op>(
        new LstmWithCellsOp(layer, input, h, w_ih, b_ih, w_hh, b_hh, needed));
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

// A NetBidirectionalOperator over recurrent layers `f` and `b` (as
// CudnnRecurrence found them) as one bidirectional cuDNN call: its output
// is the forward sequence and the (length-aware) backward one side by
// side, which is the catenate join.
absl::StatusOr<std::unique_ptr<Op>> LowerBidirectionalRnn(const Layer& layer,
                                                          const Layer& f,
                                                          const Layer& b,
                                                          int64_t input,
                                                          Lowering& lw) {
  ASSIGN_OR_RETURN(RnnCell cell, CellOf(f));
  ASSIGN_OR_RETURN(LoadedRecurrent fw, LoadRecurrent(f, input, lw));
  ASSIGN_OR_RETURN(LoadedRecurrent bw, LoadRecurrent(b, input, lw));
  RnnShape shape{cell, input, f.spec().size(), true, 1, lw.precision};
  ASSIGN_OR_RETURN(auto space,
                   UploadWeightSpace(shape, {fw.view, bw.view}, lw));
  return std::unique_ptr<Op>(new CudnnRnnOp(layer, shape, space.first,
                                            space.second, {true}, lw.dropout));
}

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
absl::StatusOr<std::unique_ptr<Op>> LowerFusedRun(const Graph& graph, int first,
                                                  int last, int64_t input,
                                                  Lowering& lw) {
  const Layer* backward = nullptr;
  const Layer* forward = CudnnRecurrence(graph.layer(first), &backward);
  ASSIGN_OR_RETURN(RnnCell cell, CellOf(*forward));
  RnnShape shape{cell,
                 input,
                 forward->spec().size(),
                 backward != nullptr,
                 last - first + 1,
                 lw.precision};
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
  return std::unique_ptr<Op>(new CudnnRnnOp(
      graph.layer(last), shape, space.first, space.second, {true}, lw.dropout));
}

}  // namespace rnnserve::engine::cuda

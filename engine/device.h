// Where a net runs and in what precision: the options a net is compiled
// with. No CUDA in here; every build understands every device name and
// refuses, with the reason, what it cannot run.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace rnnserve::engine {

enum class DeviceKind { kCpu, kCuda };

struct DeviceId {
  DeviceKind kind = DeviceKind::kCpu;
  // The CUDA device ordinal; 0 for the CPU.
  int ordinal = 0;

  // "cpu" or "cuda:N".
  std::string ToString() const;
  bool operator==(const DeviceId& o) const {
    return kind == o.kind && ordinal == o.ordinal;
  }
};

// "" and "cpu" are the CPU; "cuda" is "cuda:0"; "cuda:N" takes ordinal N.
// INVALID_ARGUMENT naming the text otherwise.
absl::StatusOr<DeviceId> ParseDevice(absl::string_view text);

// The type weights and activations are stored in. Products always
// accumulate in fp32.
enum class Precision { kFp32, kFp16, kBf16 };

// "" and "fp32", "fp16", "bf16"; INVALID_ARGUMENT naming the text otherwise.
absl::StatusOr<Precision> ParsePrecision(absl::string_view text);
const char* PrecisionName(Precision p);

struct NetOptions {
  DeviceId device;
  // Only the CUDA backend stores reduced precision; the CPU engine is fp32.
  Precision precision = Precision::kFp32;
  // Device bytes the net may hold (weights and the largest workspace it
  // reserves at load); 0: no limit but the device's free memory.
  int64_t device_memory_budget = 0;
};

// Whether this build contains the CUDA backend.
bool CudaBackendBuilt();

}  // namespace rnnserve::engine

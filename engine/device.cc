#include "engine/device.h"

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/strip.h"

namespace rnnserve::engine {

std::string DeviceId::ToString() const {
  return kind == DeviceKind::kCpu ? "cpu" : absl::StrCat("cuda:", ordinal);
}

absl::StatusOr<DeviceId> ParseDevice(absl::string_view text) {
  if (text.empty() || text == "cpu") return DeviceId{};
  if (text == "cuda") return DeviceId{DeviceKind::kCuda, 0};
  if (absl::ConsumePrefix(&text, "cuda:")) {
    int ordinal = -1;
    if (absl::SimpleAtoi(text, &ordinal) && ordinal >= 0 &&
        text.find_first_not_of("0123456789") == absl::string_view::npos) {
      return DeviceId{DeviceKind::kCuda, ordinal};
    }
    return absl::InvalidArgumentError(absl::StrFormat(
        "device 'cuda:%s' has no valid ordinal; use cuda:0, cuda:1, ...",
        text));
  }
  return absl::InvalidArgumentError(
      absl::StrFormat("unknown device '%s'; use 'cpu' or 'cuda:N'", text));
}

absl::StatusOr<Precision> ParsePrecision(absl::string_view text) {
  if (text.empty() || text == "fp32") return Precision::kFp32;
  if (text == "fp16") return Precision::kFp16;
  if (text == "bf16") return Precision::kBf16;
  return absl::InvalidArgumentError(
      absl::StrFormat("unknown precision '%s'; use fp32, fp16 or bf16", text));
}

const char* PrecisionName(Precision p) {
  switch (p) {
    case Precision::kFp32:
      return "fp32";
    case Precision::kFp16:
      return "fp16";
    case Precision::kBf16:
      return "bf16";
  }
  return "?";
}

bool CudaBackendBuilt() {
#ifdef RNNSERVE_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace rnnserve::engine

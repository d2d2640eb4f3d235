// Operator-facing log lines on stderr: one event per line, timestamped.
#pragma once

#include <cstdio>
#include <string>

#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace rnnserve::server {

// Severity letters follow the usual I/W/E convention.
template <typename... Args>
void Log(char severity, const absl::FormatSpec<Args...>& format,
         const Args&... args) {
  const std::string line = absl::StrFormat(
      "%c %s %s\n", severity,
      absl::FormatTime("%Y-%m-%dT%H:%M:%E3S", absl::Now(), absl::UTCTimeZone()),
      absl::StrFormat(format, args...));
  std::fputs(line.c_str(), stderr);
}

}  // namespace rnnserve::server

// Reads text-format protobuf files (net.pbtxt, config.pbtxt).
#pragma once

#include <string>

#include "absl/status/status.h"
#include "google/protobuf/message.h"

namespace rnnserve::engine {

// Parses `path` into `message`. NOT_FOUND when the file cannot be opened;
// INVALID_ARGUMENT with "path:line:column: what" for a syntax error or an
// unknown field.
absl::Status ReadTextProto(const std::string& path,
                           google::protobuf::Message* message);

}  // namespace rnnserve::engine

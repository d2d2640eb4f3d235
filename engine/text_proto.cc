#include "engine/text_proto.h"

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

#include "absl/strings/str_format.h"
#include "google/protobuf/io/tokenizer.h"
#include "google/protobuf/text_format.h"

namespace rnnserve::engine {
namespace {

// Keeps the first error, with its position, for the status message.
class FirstError : public google::protobuf::io::ErrorCollector {
 public:
  void AddError(int line, int column, const std::string& message) override {
    if (error_.empty()) {
      // The parser counts from zero; editors count from one.
      error_ = absl::StrFormat("%d:%d: %s", line + 1, column + 1, message);
    }
  }
  const std::string& error() const { return error_; }

 private:
  std::string error_;
};

}  // namespace

absl::Status ReadTextProto(const std::string& path,
                           google::protobuf::Message* message) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return absl::NotFoundError(
        absl::StrFormat("%s: cannot open: %s", path, std::strerror(errno)));
  }
  std::stringstream text;
  text << in.rdbuf();

  FirstError errors;
  google::protobuf::TextFormat::Parser parser;
  parser.RecordErrorsTo(&errors);
  if (!parser.ParseFromString(text.str(), message)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s:%s", path, errors.error()));
  }
  return absl::OkStatus();
}

}  // namespace rnnserve::engine

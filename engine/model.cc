#include "engine/model.h"

#include "absl/strings/match.h"
#include "absl/strings/str_format.h"
#include "engine/status_macros.h"
#include "engine/text_proto.h"

namespace rnnserve::engine {

absl::StatusOr<std::unique_ptr<Model>> Model::Load(
    const std::string& version_dir, const NetOptions& options) {
  const std::string net_path = version_dir + "/net.pbtxt";
  v1::NetSpec spec;
  RETURN_IF_ERROR(ReadTextProto(net_path, &spec));
  ASSIGN_OR_RETURN(auto weights,
                   SafetensorsFile::Open(version_dir + "/weights.safetensors"));

  auto model = std::unique_ptr<Model>(new Model());
  auto net = Net::Create(spec, std::move(weights), options);
  if (!net.ok()) {
    // Array errors already name the weights file and device errors the
    // device; structural ones get the description's path.
    const absl::string_view message = net.status().message();
    if (absl::StrContains(message, "weights.safetensors") ||
        absl::StartsWith(message, "device ")) {
      return net.status();
    }
    return absl::Status(net.status().code(),
                        absl::StrFormat("%s: %s", net_path, message));
  }
  model->net_ = std::move(*net);

  const v1::NetSpec& full = model->net_->spec();
  for (int i = 0; i < full.inputs_size(); ++i) {
    const v1::InputSpec& input = full.inputs(i);
    model->encoders_.emplace_back();
    if (!input.encoder().has_characters()) continue;
    if (input.kind() != v1::TOKEN_SEQUENCE) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s: input '%s' has a characters encoder but is not a "
          "TOKEN_SEQUENCE",
          net_path, input.name()));
    }
    auto encoder = CharactersEncoder::Create(input.encoder().characters(),
                                             input.vocab_size());
    if (!encoder.ok()) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s: input '%s': %s", net_path, input.name(),
                          encoder.status().message()));
    }
    model->encoders_.back() = std::move(*encoder);
  }

  for (int o = 0; o < full.outputs_size(); ++o) {
    const v1::OutputSpec& output = full.outputs(o);
    model->labels_.emplace_back();
    if (!output.decoder().has_class_decoder()) continue;
    const auto& labels = output.decoder().class_decoder().labels();
    const int64_t width = model->net_->output_types()[o].width;
    if (labels.size() != width) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s: output '%s' has %d class labels but is %d wide",
                          net_path, output.name(), labels.size(), width));
    }
    model->labels_.back().assign(labels.begin(), labels.end());
  }
  return model;
}

}  // namespace rnnserve::engine

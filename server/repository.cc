#include "server/repository.h"

#include <algorithm>
#include <filesystem>
#include <system_error>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "engine/status_macros.h"
#include "engine/text_proto.h"
#include "server/log.h"

namespace rnnserve::server {
namespace fs = std::filesystem;

ServedVersion::ServedVersion(int64_t version,
                             std::unique_ptr<engine::Model> model)
    : version_(version), model_(std::move(model)) {}

engine::Execution ServedVersion::Acquire() {
  {
    absl::MutexLock lock(&mu_);
    if (!idle_.empty()) {
      engine::Execution exec = std::move(idle_.back());
      idle_.pop_back();
      return exec;
    }
  }
  return model_->net().NewExecution();
}

void ServedVersion::Release(engine::Execution exec) {
  absl::MutexLock lock(&mu_);
  idle_.push_back(std::move(exec));
}

namespace {

// Checks the configuration and fills in its defaults.
absl::Status ApplyConfig(const v1::ModelConfig& config, const std::string& name,
                         const engine::DeviceId& default_device,
                         ServingLimits* limits, engine::NetOptions* options) {
  if (!config.name().empty() && config.name() != name) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "config.pbtxt names the model '%s' but its folder is '%s'",
        config.name(), name));
  }
  if (config.max_sequence_length() < 0 || config.max_batch_size() < 0) {
    return absl::InvalidArgumentError(
        "config.pbtxt: max_sequence_length and max_batch_size must not be "
        "negative");
  }
  if (config.max_sequence_length() > 0) {
    limits->max_sequence_length = config.max_sequence_length();
  }
  if (config.max_batch_size() > 0) {
    limits->max_batch_size = config.max_batch_size();
  }
  if (config.device().empty()) {
    options->device = default_device;
  } else {
    absl::StatusOr<engine::DeviceId> device =
        engine::ParseDevice(config.device());
    if (!device.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("config.pbtxt: ", device.status().message()));
    }
    options->device = *device;
  }
  absl::StatusOr<engine::Precision> precision =
      engine::ParsePrecision(config.precision());
  if (!precision.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("config.pbtxt: ", precision.status().message()));
  }
  options->precision = *precision;
  if (options->device.kind == engine::DeviceKind::kCpu &&
      options->precision != engine::Precision::kFp32) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "config.pbtxt: precision %s needs a CUDA device; this model runs on "
        "the CPU, which computes in fp32",
        config.precision()));
  }
  if (config.device_memory_budget_bytes() < 0) {
    return absl::InvalidArgumentError(
        "config.pbtxt: device_memory_budget_bytes must not be negative");
  }
  options->device_memory_budget = config.device_memory_budget_bytes();
  return absl::OkStatus();
}

// Version folders are the sub-folders whose names are positive integers.
std::vector<int64_t> FindVersions(const std::string& dir) {
  std::vector<int64_t> versions;
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    int64_t v;
    if (entry.is_directory() &&
        absl::SimpleAtoi(entry.path().filename().string(), &v) && v > 0) {
      versions.push_back(v);
    }
  }
  std::sort(versions.begin(), versions.end());
  return versions;
}

absl::Status LoadVersions(const std::string& dir, ModelEntry* entry) {
  const std::vector<int64_t> found = FindVersions(dir);
  if (found.empty()) {
    return absl::NotFoundError(
        absl::StrFormat("%s holds no numbered version folder", dir));
  }
  std::vector<int64_t> wanted(entry->config.versions().begin(),
                              entry->config.versions().end());
  if (wanted.empty()) wanted.push_back(found.back());
  for (int64_t v : wanted) {
    if (std::find(found.begin(), found.end(), v) == found.end()) {
      return absl::NotFoundError(absl::StrFormat(
          "config.pbtxt lists version %d but %s/%d does not exist", v, dir, v));
    }
    ASSIGN_OR_RETURN(
        auto model,
        engine::Model::Load(absl::StrFormat("%s/%d", dir, v), entry->options));
    entry->versions[v] = std::make_shared<ServedVersion>(v, std::move(model));
  }
  return absl::OkStatus();
}

}  // namespace

ModelEntry LoadModelFolder(const std::string& dir, const std::string& name,
                           const engine::DeviceId& default_device) {
  ModelEntry entry;
  entry.name = name;
  absl::Status status;
  const std::string config_path = dir + "/config.pbtxt";
  if (fs::exists(config_path)) {
    status = engine::ReadTextProto(config_path, &entry.config);
  }
  if (status.ok()) {
    status = ApplyConfig(entry.config, name, default_device, &entry.limits,
                         &entry.options);
  }
  if (status.ok()) status = LoadVersions(dir, &entry);
  if (!status.ok()) {
    entry.versions.clear();
    entry.failure = std::string(status.message());
    Log('E', "model '%s' failed to load: %s", name, entry.failure);
    return entry;
  }
  for (const auto& [v, served] : entry.versions) {
    const engine::Net& net = served->model().net();
    Log('I', "loaded model '%s' version %d (%d parameters) on %s", name, v,
        net.parameter_count(), net.device_name());
  }
  return entry;
}

absl::StatusOr<std::unique_ptr<ModelRepository>> ModelRepository::Create(
    const Options& options) {
  std::error_code ec;
  if (!fs::is_directory(options.root, ec)) {
    return absl::NotFoundError(
        absl::StrFormat("model repository '%s' is not a folder", options.root));
  }
  std::vector<std::string> names;
  for (const auto& entry : fs::directory_iterator(options.root, ec)) {
    const std::string name = entry.path().filename().string();
    if (entry.is_directory() && name[0] != '.') names.push_back(name);
  }
  std::sort(names.begin(), names.end());

  auto repo = std::unique_ptr<ModelRepository>(new ModelRepository());
  for (const std::string& name : names) {
    repo->models_.push_back(LoadModelFolder(options.root + "/" + name, name,
                                            options.default_device));
  }
  return repo;
}

absl::StatusOr<const ModelEntry*> ModelRepository::Find(
    const std::string& name) const {
  auto it = std::lower_bound(
      models_.begin(), models_.end(), name,
      [](const ModelEntry& e, const std::string& n) { return e.name < n; });
  if (it == models_.end() || it->name != name) {
    std::vector<std::string> known;
    for (const ModelEntry& e : models_) known.push_back(e.name);
    return absl::NotFoundError(
        absl::StrFormat("no model named '%s' (models: %s)", name,
                        known.empty() ? "none" : absl::StrJoin(known, ", ")));
  }
  return &*it;
}

absl::StatusOr<std::shared_ptr<ServedVersion>> ModelRepository::Resolve(
    const std::string& name, int64_t version) const {
  if (version < 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "version %d is negative (0 selects the latest)", version));
  }
  ASSIGN_OR_RETURN(const ModelEntry* entry, Find(name));
  if (!entry->failure.empty()) {
    return absl::FailedPreconditionError(
        absl::StrFormat("model '%s' failed to load: %s", name, entry->failure));
  }
  if (version == 0) return entry->versions.rbegin()->second;
  auto it = entry->versions.find(version);
  if (it == entry->versions.end()) {
    std::vector<int64_t> served;
    for (const auto& [v, s] : entry->versions) served.push_back(v);
    return absl::NotFoundError(
        absl::StrFormat("model '%s' has no version %d (serving: %s)", name,
                        version, absl::StrJoin(served, ", ")));
  }
  return it->second;
}

}  // namespace rnnserve::server

// The model repository: a folder of models, each with a serving
// configuration and numbered versions.
//
//   <root>/<model>/config.pbtxt           rnnserve.v1.ModelConfig (optional)
//   <root>/<model>/<version>/net.pbtxt    rnnserve.v1.NetSpec
//   <root>/<model>/<version>/weights.safetensors
//
// Every model folder is loaded at Create. A model that fails to load stays
// listed with the reason and the others are served. Immutable after Create;
// thread-safe.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "engine/model.h"
#include "rnnserve/v1/config.pb.h"

namespace rnnserve::server {

// The serving limits of a model, with defaults applied.
struct ServingLimits {
  int64_t max_sequence_length = 4096;
  int32_t max_batch_size = 64;
};

// One loaded version, shared by every request that uses it.
class ServedVersion {
 public:
  ServedVersion(int64_t version, std::unique_ptr<engine::Model> model);

  int64_t version() const { return version_; }
  const engine::Model& model() const { return *model_; }

  // Hands out a reusable Execution (working memory); Release returns it.
  // Thread-safe.
  engine::Execution Acquire();
  void Release(engine::Execution exec);

 private:
  const int64_t version_;
  const std::unique_ptr<engine::Model> model_;
  absl::Mutex mu_;
  std::vector<engine::Execution> idle_ ABSL_GUARDED_BY(mu_);
};

struct ModelEntry {
  std::string name;
  v1::ModelConfig config;
  ServingLimits limits;
  // Where and how the versions run, from the config and the daemon's
  // default device.
  engine::NetOptions options;
  // Served versions by number; empty when the model failed.
  std::map<int64_t, std::shared_ptr<ServedVersion>> versions;
  // Why the model is not served; empty when it is.
  std::string failure;
};

class ModelRepository {
 public:
  struct Options {
    // The repository folder.
    std::string root;
    // The device of models whose config.pbtxt names none.
    engine::DeviceId default_device;
  };

  // Scans `options.root` and loads every model. NOT_FOUND when the folder
  // does not exist; individual model failures are recorded, not returned.
  static absl::StatusOr<std::unique_ptr<ModelRepository>> Create(
      const Options& options);

  // All models, sorted by name.
  const std::vector<ModelEntry>& models() const { return models_; }

  // The entry named `name`: NOT_FOUND naming the known models otherwise.
  absl::StatusOr<const ModelEntry*> Find(const std::string& name) const;

  // A served version (0: the highest). INVALID_ARGUMENT for a negative
  // version, NOT_FOUND for an unknown model or version, FAILED_PRECONDITION
  // with the load error for a failed model.
  absl::StatusOr<std::shared_ptr<ServedVersion>> Resolve(
      const std::string& name, int64_t version) const;

  // Held while a CPU net runs. Each run already spreads its matrix products
  // over every core, so running requests one at a time gives the same
  // throughput without oversubscribing the cores (two OpenMP teams on two
  // cores spin against each other and both slow down many times over).
  // TODO: a batching scheduler should merge waiting requests into one
  // packed batch instead of queueing them here.
  absl::Mutex& run_mutex() const { return run_mu_; }

 private:
  std::vector<ModelEntry> models_;
  mutable absl::Mutex run_mu_;
};

// Loads one model folder; exposed for tests.
ModelEntry LoadModelFolder(const std::string& dir, const std::string& name,
                           const engine::DeviceId& default_device = {});

}  // namespace rnnserve::server

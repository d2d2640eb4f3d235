// Reading and writing safetensors files, the container for a model's arrays.
//
// A safetensors file is an 8-byte little-endian unsigned header length N,
// then N bytes of UTF-8 JSON, then a data region. The JSON object maps each
// array name to {"dtype", "shape", "data_offsets": [begin, end]}, the offsets
// being relative to the start of the data region, plus an optional
// "__metadata__" object of string values. Arrays are stored row-major and
// little-endian.
//
// SafetensorsFile maps the file and hands out views into the mapping; nothing
// is copied until a caller copies it (ReadF32 or its own memcpy).

#ifndef RNNSERVE_ENGINE_SAFETENSORS_H_
#define RNNSERVE_ENGINE_SAFETENSORS_H_

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace rnnserve::engine {

// The element types this engine reads. The format defines a few more (U16,
// U32, U64, the 8-bit floats); files using them are refused as Unimplemented.
enum class DType { kF64, kF32, kF16, kBF16, kI64, kI32, kI16, kI8, kU8, kBool };

// Bytes per element: 8, 4, 2, 2, 8, 4, 2, 1, 1, 1 in the order above.
size_t DTypeSize(DType dtype);

// The name the format spells the dtype with: "F64", "F32", ..., "BOOL".
absl::string_view DTypeName(DType dtype);

// The dtype a format name stands for; nullopt for names outside DType
// (including the format's dtypes that this engine does not support).
std::optional<DType> DTypeFromName(absl::string_view name);

// One array inside an open SafetensorsFile. `data` points into the file's
// mapping and is valid only while that SafetensorsFile lives. It carries no
// alignment guarantee (the format makes none), so read elements with memcpy,
// never through a cast pointer. nbytes == product(shape) * DTypeSize(dtype);
// an empty shape is a scalar of one element; a zero dim makes nbytes 0.
struct TensorView {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  const uint8_t* data;
  size_t nbytes;
};

// A safetensors file mapped read-only, its header validated in full.
//
// Thread safety: immutable after Open; every method may be called from any
// number of threads at once.
//
// The file must not be truncated or rewritten in place while it is open: the
// arrays are read lazily through the mapping, and a page that disappears
// under it raises SIGBUS. Model versions are written to fresh paths (see
// WriteSafetensors, which renames into place) so this does not arise in a
// model repository.
class SafetensorsFile {
 public:
  // Memory-maps `path` read-only and validates the whole header. Every error
  // message starts with `path`, then names the problem and, where there is
  // one, the array. Status codes:
  //   NotFound, PermissionDenied, ... (from errno): the file cannot be
  //     opened, inspected or mapped.
  //   FailedPrecondition: `path` is not a regular file.
  //   DataLoss: the file is not a well-formed safetensors file: it is
  //     truncated; the header length is over 100 MB; the header is not a JSON
  //     object (or repeats a key); an entry is not an object, or lacks or
  //     mistypes "dtype", "shape" or "data_offsets"; a dim is negative; the
  //     dtype is unknown; "__metadata__" is not an object of strings; offsets
  //     are reversed, reach past the end of the file, disagree with the shape
  //     and dtype, or two arrays overlap.
  //   Unimplemented: an array uses a dtype the format defines but this
  //     engine does not read (U16, U32, U64, the 8-bit floats, ...).
  //
  // Accepted although the format's reference reader refuses them: bytes in
  // the data region that no array covers, and unknown keys inside an entry.
  // Neither makes any array's contents ambiguous, and refusing them would
  // only turn away files from lenient writers.
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(
      const std::string& path);

  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  // Unmaps the file; every TensorView taken from it dangles afterwards.
  ~SafetensorsFile();

  // The array called `name`, or nullptr when there is none. The pointer is
  // owned by this object. O(log n).
  const TensorView* Find(absl::string_view name) const;

  // Every array, sorted by name.
  const std::vector<TensorView>& tensors() const { return tensors_; }

  // The "__metadata__" object; empty when the file has none.
  const std::map<std::string, std::string>& metadata() const {
    return metadata_;
  }

  const std::string& path() const { return path_; }

 private:
  SafetensorsFile(std::string path, void* mapping, size_t mapping_size);

  std::string path_;
  void* mapping_;  // Owned; the destructor unmaps it.
  size_t mapping_size_;
  std::vector<TensorView> tensors_;
  std::map<std::string, std::string> metadata_;
};

// Copies an F32 array out. InvalidArgument, naming the array, when its dtype
// is not F32. Assumes a little-endian host, as the engine does throughout.
absl::StatusOr<std::vector<float>> ReadF32(const TensorView& tensor);

// One array for WriteSafetensors: `bytes` holds product(shape) elements of
// `dtype`, row-major and little-endian.
struct TensorToWrite {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  std::string bytes;
};

// Writes `tensors` and `metadata` to `path` as a safetensors file that the
// format's reference reader also accepts: the header is padded with spaces
// to a multiple of 8 bytes and the arrays are packed without gaps, larger
// element types first, so that every array starts at an offset that is a
// multiple of its element size.
//
// The file is written next to `path` under a temporary name and renamed over
// `path`, so a reader never sees it half written. Nothing is fsynced.
//
// InvalidArgument when an array's name is repeated or "__metadata__", when a
// name or metadata string is not UTF-8, when a dim is negative, or when
// `bytes` does not hold exactly the elements its shape calls for;
// errno-derived codes when the file cannot be written.
absl::Status WriteSafetensors(
    const std::string& path, const std::vector<TensorToWrite>& tensors,
    const std::map<std::string, std::string>& metadata = {});

}  // namespace rnnserve::engine

#endif  // RNNSERVE_ENGINE_SAFETENSORS_H_

// Encoders turn client data into net input; decoders name net output.
#pragma once

#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "rnnserve/v1/net.pb.h"

namespace rnnserve::engine {

// Maps each Unicode character of a UTF-8 string to its index in an
// alphabet. Immutable after Create; thread-safe.
class CharactersEncoder {
 public:
  // INVALID_ARGUMENT when the alphabet is empty, not UTF-8, repeats a
  // character, or needs more ids than `vocab_size`.
  static absl::StatusOr<CharactersEncoder> Create(
      const v1::CharactersEncoder& spec, int64_t vocab_size);

  // Appends the ids of `text` to `ids`. INVALID_ARGUMENT naming the
  // character and its position when the text is not valid UTF-8 or holds a
  // character outside the alphabet (unless the encoder has an unknown
  // token).
  absl::Status Encode(absl::string_view text, std::vector<int32_t>* ids) const;

  // Number of ids the encoder can produce.
  int64_t vocab_size() const;

 private:
  std::unordered_map<char32_t, int32_t> ids_;
  bool ignore_case_ = false;
  int32_t unknown_id_ = -1;
};

// Decodes one UTF-8 character starting at text[*pos] and advances *pos.
// Returns false on a malformed sequence (leaving *pos unchanged).
bool DecodeUtf8(absl::string_view text, size_t* pos, char32_t* out);

// "'a' (U+0061)", for messages about a character.
std::string DescribeCharacter(char32_t c);

}  // namespace rnnserve::engine

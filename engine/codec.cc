#include "engine/codec.h"

#include "absl/strings/str_format.h"

namespace rnnserve::engine {
namespace {

// Case folding covers ASCII and Latin-1 letters, which is what the example
// alphabets use. TODO: full Unicode case folding needs ICU; characters
// outside Latin-1 are compared as they are.
char32_t Fold(char32_t c) {
  if (c >= 'A' && c <= 'Z') return c + 32;
  if (c >= 0xC0 && c <= 0xDE && c != 0xD7) return c + 32;
  return c;
}

void AppendUtf8(char32_t c, std::string* out) {
  if (c < 0x80) {
    out->push_back(static_cast<char>(c));
  } else if (c < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (c >> 6)));
    out->push_back(static_cast<char>(0x80 | (c & 0x3F)));
  } else if (c < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (c >> 12)));
    out->push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (c & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (c >> 18)));
    out->push_back(static_cast<char>(0x80 | ((c >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (c & 0x3F)));
  }
}

}  // namespace

bool DecodeUtf8(absl::string_view text, size_t* pos, char32_t* out) {
  const size_t i = *pos;
  const auto byte = [&](size_t k) {
    return static_cast<unsigned char>(text[i + k]);
  };
  const unsigned char b0 = byte(0);
  int extra;
  char32_t c;
  if (b0 < 0x80) {
    extra = 0, c = b0;
  } else if ((b0 & 0xE0) == 0xC0) {
    extra = 1, c = b0 & 0x1F;
  } else if ((b0 & 0xF0) == 0xE0) {
    extra = 2, c = b0 & 0x0F;
  } else if ((b0 & 0xF8) == 0xF0) {
    extra = 3, c = b0 & 0x07;
  } else {
    return false;
  }
  if (i + extra >= text.size()) return false;  // truncated sequence
  for (int k = 1; k <= extra; ++k) {
    if ((byte(k) & 0xC0) != 0x80) return false;
    c = (c << 6) | (byte(k) & 0x3F);
  }
  // Overlong forms, surrogates and values past U+10FFFF are not UTF-8.
  static constexpr char32_t kMin[] = {0, 0x80, 0x800, 0x10000};
  if (c < kMin[extra] || c > 0x10FFFF || (c >= 0xD800 && c <= 0xDFFF)) {
    return false;
  }
  *out = c;
  *pos = i + 1 + extra;
  return true;
}

std::string DescribeCharacter(char32_t c) {
  std::string glyph;
  if (c >= 0x20 && c != 0x7F) AppendUtf8(c, &glyph);
  if (glyph.empty()) return absl::StrFormat("U+%04X", static_cast<int>(c));
  return absl::StrFormat("'%s' (U+%04X)", glyph, static_cast<int>(c));
}

absl::StatusOr<CharactersEncoder> CharactersEncoder::Create(
    const v1::CharactersEncoder& spec, int64_t vocab_size) {
  CharactersEncoder encoder;
  encoder.ignore_case_ = spec.ignore_case();
  const absl::string_view alphabet = spec.alphabet();
  if (alphabet.empty()) {
    return absl::InvalidArgumentError("characters encoder has no alphabet");
  }
  size_t pos = 0;
  int32_t next_id = 0;
  while (pos < alphabet.size()) {
    char32_t c;
    if (!DecodeUtf8(alphabet, &pos, &c)) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "characters encoder alphabet is not valid UTF-8 at byte %d", pos));
    }
    if (encoder.ignore_case_) c = Fold(c);
    if (!encoder.ids_.emplace(c, next_id).second) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "characters encoder alphabet lists %s twice%s", DescribeCharacter(c),
          encoder.ignore_case_ ? " (ignoring case)" : ""));
    }
    ++next_id;
  }
  if (spec.unknown_token()) encoder.unknown_id_ = next_id;
  if (encoder.vocab_size() > vocab_size) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "characters encoder needs %d token ids but the input has vocab_size "
        "%d",
        encoder.vocab_size(), vocab_size));
  }
  return encoder;
}

int64_t CharactersEncoder::vocab_size() const {
  return static_cast<int64_t>(ids_.size()) + (unknown_id_ >= 0 ? 1 : 0);
}

absl::Status CharactersEncoder::Encode(absl::string_view text,
                                       std::vector<int32_t>* ids) const {
  size_t pos = 0;
  int64_t index = 0;
  while (pos < text.size()) {
    char32_t c;
    if (!DecodeUtf8(text, &pos, &c)) {
      return absl::InvalidArgumentError(
          absl::StrFormat("text is not valid UTF-8 at byte %d", pos));
    }
    auto it = ids_.find(ignore_case_ ? Fold(c) : c);
    if (it != ids_.end()) {
      ids->push_back(it->second);
    } else if (unknown_id_ >= 0) {
      ids->push_back(unknown_id_);
    } else {
      return absl::InvalidArgumentError(absl::StrFormat(
          "character %s at position %d is not in the model's alphabet",
          DescribeCharacter(c), index));
    }
    ++index;
  }
  return absl::OkStatus();
}

}  // namespace rnnserve::engine

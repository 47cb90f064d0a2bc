// BERT WordPiece for ASCII texts (csrc/wordpiece_cpu.cpp): the host pipeline's tokenizer for the
// texts that are pure ASCII (98% of the shared corpus). Other texts are left to the caller's
// general tokenizer (nanotoken or Hugging Face tokenizers), and the Python side
// (postembed_fast/tokenization.py) verifies the combination against Hugging Face before use.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace postembed {

// What tokenizer.json says, for the components this tokenizer implements: BertNormalizer
// (clean_text must be true; lowercase; strip_accents and handle_chinese_chars are no-ops on ASCII),
// BertPreTokenizer, WordPiece, and a post-processor that puts fixed special tokens around one text.
struct WordPieceConfig {
  std::vector<std::string> vocab;  // token id -> token
  int32_t unk_id = 0;
  std::string continuing_prefix = "##";
  int64_t max_input_chars_per_word = 100;
  bool lowercase = true;
  std::vector<int32_t> prefix_ids;  // e.g. [CLS]
  std::vector<int32_t> suffix_ids;  // e.g. [SEP]
  int64_t max_length = 0;           // tokens including prefix and suffix; 0: no truncation
  bool truncate_left = false;
  // Added-token contents: a text containing one is left to the general tokenizer (Hugging Face
  // splits them out of the raw text before normalization).
  std::vector<std::string> added_tokens;
};

class AsciiWordPiece {
 public:
  explicit AsciiWordPiece(WordPieceConfig cfg);

  // ptrs[i]/sizes[i]: the bytes of text i, or ptrs[i] == nullptr for a text this tokenizer must not
  // take (not ASCII). lens[i] = tokens of text i (specials included) or -1 if not handled here;
  // ids = the handled texts' tokens, concatenated in text order. Runs on num_threads OpenMP threads
  // (0: the OpenMP default). No Python object is touched: the caller releases the GIL.
  void encode(const char* const* ptrs, const int64_t* sizes, int64_t n, int64_t* lens, std::vector<int32_t>& ids,
              int num_threads) const;

 private:
  struct Slot {
    uint32_t off = 0, len = 0;
    int32_t id = -1;
  };
  struct Table {  // open addressing: token bytes -> id
    std::vector<Slot> slots;
    std::string arena;
    uint64_t mask = 0;
    uint32_t max_len = 0;
    void build(const std::vector<std::pair<std::string, int32_t>>& entries);
    int32_t find(const char* s, uint32_t n) const;
  };

  bool encode_one(const char* s, int64_t n, std::vector<int32_t>& out, std::string& word) const;
  void word_pieces(const std::string& word, std::vector<int32_t>& out) const;
  bool added_token_at(const char* s, int64_t n, int64_t i) const;

  WordPieceConfig cfg_;
  Table head_, cont_;  // word-initial pieces; continuation pieces with the prefix stripped
  uint8_t cls_[256];   // byte class (see wordpiece_cpu.cpp)
  bool added_first_[256];
  int64_t budget_;  // content tokens kept after truncation
};

}  // namespace postembed

// BERT WordPiece on ASCII texts, OpenMP over texts, no per-token allocation.
//
// On ASCII input Hugging Face's BERT pipeline reduces to a few byte rules, which is why this file is
// short (and why non-ASCII texts are not handled here: NFD, accent stripping, Unicode categories and
// CJK splitting are left to a full tokenizer):
//   BertNormalizer(clean_text)  drops NUL and the Cc control characters other than \t \n \r
//                               (so \v and \f are dropped, not spaces), and maps \t \n \r to ' ';
//   lowercase                   ASCII A-Z -> a-z; strip_accents and handle_chinese_chars do nothing;
//   BertPreTokenizer            splits on ' ' and isolates every ASCII punctuation character
//                               (Rust's is_ascii_punctuation: all 32 of !"#$%&'()*+,-./:;<=>?@[\]^_`{|}~);
//   WordPiece                   greedy longest match first, "##" continuation pieces, a word longer than
//                               max_input_chars_per_word or with an unmatched remainder becomes [UNK];
//   truncation + specials       content cut to max_length - specials, then [CLS] ... [SEP].
// A dropped control character inside a word joins its two halves ("a\x01b" is the word "ab"), as
// the normalizer runs before the pre-tokenizer. The Python side checks all of this against Hugging
// Face on probe texts before using it, and tests do on the whole corpus.
#include "wordpiece.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace postembed {

namespace {

enum ByteClass : uint8_t { kWord = 0, kSpace = 1, kPunct = 2, kDrop = 3 };

uint64_t hash_bytes(const char* s, uint32_t n) {
  uint64_t h = 1469598103934665603ull;  // FNV-1a: words are short, a simple byte loop is enough
  for (uint32_t i = 0; i < n; ++i) h = (h ^ static_cast<uint8_t>(s[i])) * 1099511628211ull;
  return h ^ (h >> 29);
}

}  // namespace

void AsciiWordPiece::Table::build(const std::vector<std::pair<std::string, int32_t>>& entries) {
  uint64_t cap = 16;
  while (cap < 2 * entries.size() + 1) cap <<= 1;
  slots.assign(cap, Slot{});
  mask = cap - 1;
  for (const auto& [tok, id] : entries) {
    if (tok.empty() || tok.size() > 0xFFFF) continue;
    if (find(tok.data(), static_cast<uint32_t>(tok.size())) >= 0) continue;  // first id wins, as a map built in id order
    uint64_t h = hash_bytes(tok.data(), static_cast<uint32_t>(tok.size())) & mask;
    while (slots[h].id >= 0) h = (h + 1) & mask;
    slots[h] = Slot{static_cast<uint32_t>(arena.size()), static_cast<uint32_t>(tok.size()), id};
    arena += tok;
    max_len = std::max<uint32_t>(max_len, static_cast<uint32_t>(tok.size()));
  }
}

int32_t AsciiWordPiece::Table::find(const char* s, uint32_t n) const {
  if (slots.empty()) return -1;
  uint64_t h = hash_bytes(s, n) & mask;
  for (;;) {
    const Slot& e = slots[h];
    if (e.id < 0) return -1;
    if (e.len == n && std::memcmp(arena.data() + e.off, s, n) == 0) return e.id;
    h = (h + 1) & mask;
  }
}

AsciiWordPiece::AsciiWordPiece(WordPieceConfig cfg) : cfg_(std::move(cfg)) {
  if (cfg_.unk_id < 0 || static_cast<size_t>(cfg_.unk_id) >= cfg_.vocab.size())
    throw std::invalid_argument("AsciiWordPiece: unk_id is not in the vocabulary");
  const int64_t specials = static_cast<int64_t>(cfg_.prefix_ids.size() + cfg_.suffix_ids.size());
  if (cfg_.max_length > 0 && cfg_.max_length <= specials)
    throw std::invalid_argument("AsciiWordPiece: max_length leaves no room for text after the special tokens");
  budget_ = cfg_.max_length > 0 ? cfg_.max_length - specials : INT64_MAX;

  // The vocabulary in id order; a token listed twice keeps its first id.
  std::vector<std::pair<std::string, int32_t>> head, cont;
  const std::string& pre = cfg_.continuing_prefix;
  for (size_t id = 0; id < cfg_.vocab.size(); ++id) {
    const std::string& t = cfg_.vocab[id];
    head.emplace_back(t, static_cast<int32_t>(id));
    if (!pre.empty() && t.size() > pre.size() && t.compare(0, pre.size(), pre) == 0)
      cont.emplace_back(t.substr(pre.size()), static_cast<int32_t>(id));
  }
  head_.build(head);
  cont_.build(cont);

  for (int c = 0; c < 256; ++c) {
    uint8_t k = kWord;
    if (c == '\t' || c == '\n' || c == '\r' || c == ' ')
      k = kSpace;
    else if (c < 0x20 || c == 0x7F)
      k = kDrop;
    else if ((c >= 0x21 && c <= 0x2F) || (c >= 0x3A && c <= 0x40) || (c >= 0x5B && c <= 0x60) ||
             (c >= 0x7B && c <= 0x7E))
      k = kPunct;
    cls_[c] = k;
    added_first_[c] = false;
  }
  for (const std::string& t : cfg_.added_tokens)
    if (!t.empty()) added_first_[static_cast<uint8_t>(t[0])] = true;
}

bool AsciiWordPiece::added_token_at(const char* s, int64_t n, int64_t i) const {
  for (const std::string& t : cfg_.added_tokens) {
    const int64_t m = static_cast<int64_t>(t.size());
    if (m > 0 && i + m <= n && std::memcmp(s + i, t.data(), m) == 0) return true;
  }
  return false;
}

void AsciiWordPiece::word_pieces(const std::string& word, std::vector<int32_t>& out) const {
  const uint32_t L = static_cast<uint32_t>(word.size());
  if (static_cast<int64_t>(L) > cfg_.max_input_chars_per_word) {
    out.push_back(cfg_.unk_id);
    return;
  }
  const size_t mark = out.size();
  uint32_t start = 0;
  while (start < L) {
    const Table& table = start == 0 ? head_ : cont_;
    uint32_t end = std::min(L, start + table.max_len);
    int32_t id = -1;
    for (; end > start; --end) {
      id = table.find(word.data() + start, end - start);
      if (id >= 0) break;
    }
    if (id < 0) {  // no piece matches the rest: the whole word is [UNK]
      out.resize(mark);
      out.push_back(cfg_.unk_id);
      return;
    }
    out.push_back(id);
    start = end;
  }
}

bool AsciiWordPiece::encode_one(const char* s, int64_t n, std::vector<int32_t>& out, std::string& word) const {
  const size_t first = out.size();
  out.insert(out.end(), cfg_.prefix_ids.begin(), cfg_.prefix_ids.end());
  const size_t content = out.size();
  const bool stop_early = !cfg_.truncate_left;
  auto full = [&] { return stop_early && static_cast<int64_t>(out.size() - content) >= budget_; };
  word.clear();
  for (int64_t i = 0; i <= n && !full(); ++i) {
    const uint8_t c = i < n ? static_cast<uint8_t>(s[i]) : ' ';
    if (i < n && added_first_[c] && added_token_at(s, n, i)) {
      out.resize(first);
      return false;
    }
    const uint8_t k = cls_[c];
    if (k == kWord) {
      word.push_back(cfg_.lowercase && c >= 'A' && c <= 'Z' ? static_cast<char>(c + 32) : static_cast<char>(c));
      continue;
    }
    if (k == kDrop) continue;  // removed by the normalizer: the word goes on
    if (!word.empty()) {
      word_pieces(word, out);
      word.clear();
    }
    if (k == kPunct && !full()) {
      word.push_back(static_cast<char>(c));
      word_pieces(word, out);
      word.clear();
    }
  }
  const int64_t got = static_cast<int64_t>(out.size() - content);
  if (got > budget_) {
    if (cfg_.truncate_left)
      out.erase(out.begin() + content, out.begin() + content + (got - budget_));
    else
      out.resize(content + budget_);
  }
  out.insert(out.end(), cfg_.suffix_ids.begin(), cfg_.suffix_ids.end());
  return true;
}

void AsciiWordPiece::encode(const char* const* ptrs, const int64_t* sizes, int64_t n, int64_t* lens,
                            std::vector<int32_t>& ids, int num_threads) const {
  int threads = 1;
#ifdef _OPENMP
  threads = num_threads > 0 ? num_threads : omp_get_max_threads();
#endif
  (void)num_threads;
  // Contiguous blocks of texts, several per thread (texts differ in length), each with its own
  // output; concatenated in order at the end.
  const int64_t nblocks = n < 64 ? 1 : std::min<int64_t>(n, 8 * static_cast<int64_t>(threads));
  std::vector<std::vector<int32_t>> outs(nblocks);
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (nblocks > 1)
  for (int64_t b = 0; b < nblocks; ++b) {
    const int64_t lo = n * b / nblocks, hi = n * (b + 1) / nblocks;
    std::vector<int32_t>& out = outs[b];
    std::string word;
    for (int64_t i = lo; i < hi; ++i) {
      const size_t before = out.size();
      lens[i] = (ptrs[i] != nullptr && encode_one(ptrs[i], sizes[i], out, word))
                    ? static_cast<int64_t>(out.size() - before)
                    : -1;
    }
  }
  size_t total = 0;
  for (const auto& o : outs) total += o.size();
  ids.resize(total);
  size_t at = 0;
  for (const auto& o : outs) {
    if (!o.empty()) std::memcpy(ids.data() + at, o.data(), o.size() * sizeof(int32_t));
    at += o.size();
  }
}

}  // namespace postembed

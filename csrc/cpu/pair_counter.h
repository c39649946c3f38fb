// The CPU side of pair counting, shared by pq_pair_counts (id maps) and panoptic_png_file_pq_statistics (the
// rows of two PNG files): a small open-addressing table of pair counts and the run-length pass that feeds it.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "pq_pair_counts.h"

namespace eyecool {

using KeyCount = std::pair<int64_t, int64_t>;

// Open-addressing table from pair key (>= 0) to pixel count; an empty slot holds kInvalidPairKey.
class PairCounter {
 public:
  PairCounter() { rehash(256); }

  void add(int64_t key, int64_t count) {
    uint64_t slot = hash(key);
    while (true) {
      int64_t& k = keys_[slot];
      if (k == key) {
        counts_[slot] += count;
        return;
      }
      if (k == kInvalidPairKey) {
        k = key;
        counts_[slot] = count;
        if (++size_ * 2 > static_cast<int64_t>(keys_.size())) rehash(keys_.size() * 2);
        return;
      }
      slot = (slot + 1) & mask_;
    }
  }

  void append_to(std::vector<KeyCount>& out) const {
    for (size_t i = 0; i < keys_.size(); ++i) {
      if (keys_[i] != kInvalidPairKey) out.emplace_back(keys_[i], counts_[i]);
    }
  }

 private:
  uint64_t hash(int64_t key) const {
    // Fibonacci hashing: the multiply spreads the (gt << 32 | pred) bits over the top bits kept.
    return (static_cast<uint64_t>(key) * 0x9E3779B97F4A7C15ULL) >> shift_;
  }

  void rehash(size_t capacity) {
    std::vector<int64_t> old_keys = std::move(keys_);
    std::vector<int64_t> old_counts = std::move(counts_);
    keys_.assign(capacity, kInvalidPairKey);
    counts_.assign(capacity, 0);
    mask_ = capacity - 1;
    shift_ = 64;
    for (size_t c = capacity; c > 1; c >>= 1) --shift_;
    size_ = 0;
    for (size_t i = 0; i < old_keys.size(); ++i) {
      if (old_keys[i] != kInvalidPairKey) add(old_keys[i], old_counts[i]);
    }
  }

  std::vector<int64_t> keys_, counts_;
  uint64_t mask_ = 0;
  int shift_ = 64;
  int64_t size_ = 0;
};

// Counts the pairs of pixels [begin, end) of one image into sink (anything with add(key, count): a
// PairCounter, or a RunList that keeps one row's runs). Returns false at the first id outside [0, 2^31) and
// stores that pixel's offset in bad_pixel.
//
// The run test compares the raw ids, 16 pixels at a time with a branch-free OR of XORs that the compiler
// vectorises; encoding and range checks happen only where a run starts.
template <typename id_t, typename Sink>
bool count_pixels(const id_t* gt, const id_t* pred, int64_t begin, int64_t end, Sink& counter,
                  int64_t& bad_pixel) {
  constexpr int64_t kBlock = 16;
  int64_t i = begin;
  while (i < end) {
    const id_t run_gt = gt[i], run_pred = pred[i];
    const int64_t key = encode_pair(static_cast<int64_t>(run_gt), static_cast<int64_t>(run_pred));
    if (key == kInvalidPairKey) {
      bad_pixel = i;
      return false;
    }
    const int64_t run_begin = i++;
    while (i + kBlock <= end) {
      id_t differs = 0;
      for (int64_t k = 0; k < kBlock; ++k) differs |= (gt[i + k] ^ run_gt) | (pred[i + k] ^ run_pred);
      if (differs) break;
      i += kBlock;
    }
    while (i < end && gt[i] == run_gt && pred[i] == run_pred) ++i;
    counter.add(key, i - run_begin);
  }
  return true;
}

// One row's runs, kept so that the rows that repeat it (most rows of a panoptic PNG) add them again without
// looking at a pixel.
struct RunList {
  std::vector<KeyCount> runs;
  void add(int64_t key, int64_t count) { runs.emplace_back(key, count); }
};

}  // namespace eyecool

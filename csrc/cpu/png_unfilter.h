// PNG's scanline filters (ISO/IEC 15948, section 9) reversed for 8-bit RGB / RGBA rows, and the COCO panoptic
// colour -> id rule: the pixel half of the panoptic PNG reader (cpu/panoptic_png_reader.cpp). The numpy oracle
// is eyecool_ext/reference/panoptic_png_ids.py.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "common.h"

namespace eyecool {

// The byte predicted from its left (a), upper (b) and upper-left (c) neighbours by the Paeth filter. With
// p = a + b - c, |p - a| = |b - c|, |p - b| = |a - c| and |p - c| = |a + b - 2c|; written with selects, not
// branches, since the choice is data dependent and unpredictable.
EYECOOL_HD int paeth_predictor(int a, int b, int c) {
  const int pa = b > c ? b - c : c - b;
  const int pb = a > c ? a - c : c - a;
  const int pc = a + b - 2 * c > 0 ? a + b - 2 * c : 2 * c - a - b;
  const int b_or_c = pb <= pc ? b : c;
  return (pa <= pb && pa <= pc) ? a : b_or_c;
}

// Segment id of an RGB colour: R + 256 G + 256^2 B (panopticapi's rgb2id).
EYECOOL_HD int32_t rgb_to_segment_id(uint8_t r, uint8_t g, uint8_t b) {
  return static_cast<int32_t>(r) | (static_cast<int32_t>(g) << 8) | (static_cast<int32_t>(b) << 16);
}

// The same id read from the pixel's bytes at p (R, G, B, then at least one more readable byte): one unaligned
// 32-bit load with the fourth byte masked off on little-endian hosts, instead of three byte loads and shifts.
inline int32_t pixel_segment_id(const uint8_t* p) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
  uint32_t word;
  std::memcpy(&word, p, sizeof(word));
  return static_cast<int32_t>(word & 0xFFFFFFu);
#else
  return rgb_to_segment_id(p[0], p[1], p[2]);
#endif
}

// 32 zero bytes: the reference the flat-span test compares residuals against.
constexpr uint8_t kZeros[32] = {};

// Reverses one scanline's filter. filtered: the row's bytes after its filter-type byte; prior: the previous
// row already unfiltered (all zeros for the first row); row: the output. Returns false for an unknown filter.
//
// BPP (bytes per pixel) is a template argument so that the left pixel lives in registers (left[k]): Sub,
// Average and Paeth then carry no store-to-load dependency from one pixel to the next. Paeth has a shortcut
// for the flat regions that make up panoptic PNGs: with a zero residual and the upper pixel equal to the
// upper-left one (b == c, so |p - a| = 0), the prediction is the left pixel, exactly.
template <int BPP>
inline bool unfilter_row(const uint8_t* filtered, const uint8_t* prior, uint8_t* row, int64_t length, int filter) {
  uint8_t left[BPP];
  switch (filter) {
    case 0:  // None
      for (int64_t i = 0; i < length; ++i) row[i] = filtered[i];
      return true;
    case 1:  // Sub
      for (int k = 0; k < BPP; ++k) row[k] = left[k] = filtered[k];
      for (int64_t i = BPP; i < length; i += BPP) {
        // Zero residuals repeat the left pixel: whole spans of kSpan pixels at once, as for Paeth below.
        constexpr int64_t kSpan = 8 * BPP;
        while (i + kSpan <= length && std::memcmp(filtered + i, kZeros, kSpan) == 0) {
          for (int64_t j = 0; j < kSpan; j += BPP) {
            for (int k = 0; k < BPP; ++k) row[i + j + k] = left[k];
          }
          i += kSpan;
        }
        if (i >= length) break;
        for (int k = 0; k < BPP; ++k) row[i + k] = left[k] = static_cast<uint8_t>(filtered[i + k] + left[k]);
      }
      return true;
    case 2:  // Up
      for (int64_t i = 0; i < length; ++i) row[i] = static_cast<uint8_t>(filtered[i] + prior[i]);
      return true;
    case 3:  // Average
      for (int k = 0; k < BPP; ++k) row[k] = left[k] = static_cast<uint8_t>(filtered[k] + (prior[k] >> 1));
      for (int64_t i = BPP; i < length; i += BPP) {
        for (int k = 0; k < BPP; ++k) {
          row[i + k] = left[k] = static_cast<uint8_t>(filtered[i + k] + ((static_cast<int>(left[k]) + prior[i + k]) >> 1));
        }
      }
      return true;
    case 4:  // Paeth (the left and upper-left bytes of the first pixel are 0, so it predicts the upper byte)
      for (int k = 0; k < BPP; ++k) row[k] = left[k] = static_cast<uint8_t>(filtered[k] + prior[k]);
      for (int64_t i = BPP; i < length; i += BPP) {
        // Whole flat spans of kSpan pixels at once: zero residuals, and the upper row equal to itself shifted
        // by one pixel, checked with memcmp, which compiles to a few wide compares.
        constexpr int64_t kSpan = 8 * BPP;
        while (i + kSpan <= length && std::memcmp(filtered + i, kZeros, kSpan) == 0 &&
               std::memcmp(prior + i, prior + i - BPP, kSpan) == 0) {
          for (int64_t j = 0; j < kSpan; j += BPP) {
            for (int k = 0; k < BPP; ++k) row[i + j + k] = left[k];
          }
          i += kSpan;
        }
        if (i >= length) break;
        bool flat = true;
        for (int k = 0; k < BPP; ++k) flat &= (filtered[i + k] == 0) & (prior[i + k] == prior[i + k - BPP]);
        if (!flat) {
          for (int k = 0; k < BPP; ++k) {
            left[k] = static_cast<uint8_t>(filtered[i + k] + paeth_predictor(left[k], prior[i + k], prior[i + k - BPP]));
          }
        }
        for (int k = 0; k < BPP; ++k) row[i + k] = left[k];
      }
      return true;
    default:
      return false;
  }
}

}  // namespace eyecool

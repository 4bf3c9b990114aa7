// What the two native CPU GEMM paths share (cpu_gemm.cpp: AVX512-BF16 register blocks;
// cpu_gemm_amx.cpp: AMX tiles): the problem, and the two code layouts with the decode that turns
// one (tile, row pair) of codes into the 32 bf16 lanes [W[2p, 16t + j], W[2p + 1, 16t + j]] for
// j = 0..15. That order is both what vdpbf16ps pairs with a broadcast (x[2p], x[2p + 1]) and one
// row of an AMX B tile (16 column pairs of bf16).
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace tsq {

constexpr int64_t TILE = 16;  // output columns per tile (16 fp32 lanes)

// The lane order that turns cvtne2ps_pbh(w1, w0) = [w0 | w1] into a B-tile row: lane 2j takes
// w0[j], lane 2j + 1 takes w1[j]. Built once per decode call, not per row.
inline __m512i pair_order() {
  alignas(64) uint16_t idx[32];
  for (int j = 0; j < 16; ++j) {
    idx[2 * j] = static_cast<uint16_t>(j);
    idx[2 * j + 1] = static_cast<uint16_t>(16 + j);
  }
  return _mm512_load_si512(idx);
}

// One B-tile row from rows 2p (w0) and 2p + 1 (w1) of 16 columns in fp32, rounded to bf16
// (nearest even); `order` is pair_order().
inline void store_pair_row(uint8_t* dst, __m512 w0, __m512 w1, __m512i order) {
  const __m512i bf = (__m512i)_mm512_cvtne2ps_pbh(w1, w0);
  _mm512_storeu_si512(dst, _mm512_permutexvar_epi16(order, bf));
}

// 4-bit codes: the bf16 bit patterns of 0..15 (exact: small integers) are the decode's table.
struct Int4Codes {
  const uint8_t* w;  // at the block's first tile
  int64_t tile_stride;
  __m512i lut;

  static __m512i levels() {
    alignas(64) uint16_t lut[32] = {};
    for (int v = 0; v < 16; ++v) {
      float f = static_cast<float>(v);
      uint32_t bits;
      std::memcpy(&bits, &f, sizeof bits);
      lut[v] = static_cast<uint16_t>(bits >> 16);
    }
    return _mm512_load_si512(lut);
  }
  Int4Codes(const uint8_t* w, int64_t K) : w(w), tile_stride((K / 2) * TILE), lut(levels()) {}
  Int4Codes at(int64_t t) const { return {w + t * tile_stride, tile_stride, lut}; }
  __m512i load(int /*plane*/, int64_t j, int64_t p) const {
    const __m512i v = _mm512_cvtepu8_epi32(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + j * tile_stride + p * TILE)));
    const __m512i lo = _mm512_and_si512(v, _mm512_set1_epi32(0x0F));
    const __m512i hi = _mm512_slli_epi32(_mm512_and_si512(v, _mm512_set1_epi32(0xF0)), 12);
    return _mm512_permutexvar_epi16(_mm512_or_si512(lo, hi), lut);
  }
  // B-tile rows for pairs p0 .. p0 + n − 1 of tile j, all in one group (s, o: its 16 columns
  // of this tile), 64 bytes apart from dst: the tile path's decode, w = s·q + o in fp32, then
  // bf16. Written as s·(128 + q) + (o − 128·s): 128 + q is q's byte ORed into the bits of
  // 128.0f (no int-to-float conversion), the fma rounds once.
  void decode_rows(int64_t j, int64_t p0, int64_t n, const float* s, int64_t /*ld_plane*/,
                   int /*planes*/, const float* o, __m512i order, uint8_t* dst) const {
    const __m512 sv = _mm512_loadu_ps(s);
    const __m512 ov = _mm512_fnmadd_ps(_mm512_set1_ps(128.f), sv, _mm512_loadu_ps(o));
    const __m512i nibble = _mm512_set1_epi32(0xF << 16), f128 = _mm512_set1_epi32(0x43000000);
    const uint8_t* src = w + j * tile_stride + p0 * TILE;
    for (int64_t r = 0; r < n; ++r) {
      const __m512i v =
          _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + r * TILE)));
      constexpr int AND_OR = 0xEA;  // (a & b) | c
      const __m512i f0 = _mm512_ternarylogic_epi32(_mm512_slli_epi32(v, 16), nibble, f128, AND_OR);
      const __m512i f1 = _mm512_ternarylogic_epi32(_mm512_slli_epi32(v, 12), nibble, f128, AND_OR);
      store_pair_row(dst + 64 * r, _mm512_fmadd_ps(sv, _mm512_castsi512_ps(f0), ov),
                     _mm512_fmadd_ps(sv, _mm512_castsi512_ps(f1), ov), order);
    }
  }

 private:
  Int4Codes(const uint8_t* w, int64_t s, __m512i lut) : w(w), tile_stride(s), lut(lut) {}
};

// One-bit planes: the word of a (tile, pair) is the mask of its 32 lanes that hold 1.0.
struct BitPlanes {
  const uint32_t* w;  // plane 0 at the block's first tile
  int64_t tile_stride, plane_stride;

  BitPlanes at(int64_t t) const { return {w + t * tile_stride, tile_stride, plane_stride}; }
  __m512i load(int plane, int64_t j, int64_t p) const {
    return _mm512_maskz_mov_epi16(w[plane * plane_stride + j * tile_stride + p],
                                  _mm512_set1_epi16(0x3F80));  // bf16 1.0
  }
  // The same for w = o + Σ_i s_i·β_i: row 2p takes the even bits of each word, 2p + 1 the odd.
  void decode_rows(int64_t j, int64_t p0, int64_t n, const float* s, int64_t ld_plane,
                   int planes, const float* o, __m512i order, uint8_t* dst) const {
    __m512 sv[8];  // the tile path takes at most 8 planes
    for (int i = 0; i < planes; ++i) sv[i] = _mm512_loadu_ps(s + i * ld_plane);
    const __m512 ov = _mm512_loadu_ps(o);
    for (int64_t r = 0; r < n; ++r) {
      __m512 w0 = ov, w1 = ov;
      for (int i = 0; i < planes; ++i) {
        const uint32_t m = w[i * plane_stride + j * tile_stride + p0 + r];
        w0 = _mm512_mask_add_ps(w0, static_cast<__mmask16>(_pext_u32(m, 0x55555555u)), w0, sv[i]);
        w1 = _mm512_mask_add_ps(w1, static_cast<__mmask16>(_pext_u32(m, 0xAAAAAAAAu)), w1, sv[i]);
      }
      store_pair_row(dst + 64 * r, w0, w1, order);
    }
  }
};

// One call: y [M, 16T] = x [M, K] · W with per-group tables, b = k / G:
// W[k, n] = Σ_i s[i, b, n] · code_i[k, n] + o[b, n]. Row-major, contiguous, bf16 as raw bits.
// The tables are tile-major, [.., T, K/G, 16]: a tile's scales for all of K are one contiguous
// run that its decode walks in step with its codes. Stored group-major ([K/G, 16T]), one tile's
// walk down K touches a new cache line and page N_pad·4 bytes on per group, more pages at
// K = 8960 than the prefetchers track, and measured 1.3–1.6× slower for the whole AMX call.
struct Problem {
  const uint16_t* x;
  int64_t M, K, T, G;
  int n_planes;
  const float* s;     // [n_planes, T, K/G, 16]
  const float* o;     // [T, K/G, 16]
  const float* xsum;  // [M, K/G]: Σ of x over each group, the offset term's input
  uint16_t* y;

  int64_t n_blocks() const { return K / G; }
  int64_t n_pad() const { return TILE * T; }
  int64_t ld_plane() const { return T * n_blocks() * TILE; }
  // The 16 scales of plane i (offsets) of group b in tile t.
  const float* scale_at(int i, int64_t b, int64_t t) const {
    return s + i * ld_plane() + (t * n_blocks() + b) * TILE;
  }
  const float* offset_at(int64_t b, int64_t t) const { return o + (t * n_blocks() + b) * TILE; }
};

// The AMX path (cpu_gemm_amx.cpp). Needs K % 32 == 0 and amx_unavailable() == nullptr; reads
// neither xsum nor more than 8 planes.
template <class Codes>
void gemm_amx(const Problem& pr, const Codes& codes);
// nullptr when this CPU and kernel let this process use AMX tiles, else why not.
const char* amx_unavailable();

}  // namespace tsq

// The AMX path's exact-scale variant for decode batches: one row tile of x (M ≤ 16), 4-bit codes,
// groups of whole chunks (G % 32 == 0).
//
// The B tiles hold the codes themselves, as bf16(128 + q): exact, and one vpmultishiftqb and one
// ternary-logic op per 32 weights (the weight decode of cpu_gemm_amx.cpp needs eight, with the
// fp32 multiply and the rounding). Each group's products go to fresh accumulators, which are then
// stored and folded into fp32 sums per row with the group's scales, as the AVX-512 path does:
//   y[m, n] += s[g, n] · C_g[m, n] + (o[g, n] − 128·s[g, n]) · Σ_{k in g} x[m, k].
// The cost of that fold is per row of x, not per weight row, so it pays at M ≤ 16. Tile
// instructions have long latencies: the accumulators alternate between two pairs of tiles (0-1,
// 2-3), and group g − 1 is stored and folded after group g's multiplies are issued, so the store
// does not wait on them. One thread, one call, 1536 × 8960 to 4096 × 4096 at M = 4–16: 1.3–2×
// faster than the weight decode (a one-off comparison). Results differ from that path's in the
// last bits: here no weight is rounded to bf16.
//
// The int8 variant (opt-in: it changes the numerics) quantizes x per row and group instead,
// x ≈ sx·x8 with x8 = round(x · 127/amax) and sx = amax/127, and multiplies the codes as
// unsigned bytes into signed x8 (AMX-INT8, int32 sums, 64 k per tile multiply: half the tile
// loads and multiplies of bf16, one stored byte a weight instead of two):
//   y[m, n] += s[g, n] · sx[m, g] · C_g[m, n] + o[g, n] · Σ_{k in g} x[m, k]   (the sum exact).
// Its spec is kernels/reference.py's int8_activation_matmul_reference.
//
// Tiles: 0-1 and 2-3 accumulators of even and odd groups, 4 the x tile, 6-7 the code tiles.
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu_amx.h"

namespace tsq {
namespace {

// The B-tile column order: a 16-byte broadcast of a row's codes puts bytes 0–7 in the even and
// 8–15 in the odd 64-bit words, vpmultishiftqb moves bits only within a word, and word i holds
// the 32-bit lanes 2i and 2i + 1: so lanes 4i' .. 4i' + 1 take columns from bytes 0–7 and lanes
// 4i' + 2 .. 4i' + 3 from bytes 8–15. The C tiles hold their columns in this order too.
constexpr int RAW_COLUMN[16] = {0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15};

// Lane L (column RAW_COLUMN[L]) is the pair (row 2p: low nibble of the column's byte, row 2p + 1:
// high nibble) in its two bf16 halves; `shift` brings each nibble to the low bits of its half,
// `column` spreads a group's 16 scales to C-tile order, `c_of_y` puts y's columns back.
struct RawLanes {
  alignas(64) uint8_t shift[64];
  alignas(64) int32_t column[16];
  alignas(64) int32_t c_of_y[16];
};

constexpr RawLanes raw_lanes() {
  RawLanes t{};
  for (int L = 0; L < 16; ++L) {
    const int c = RAW_COLUMN[L];
    t.shift[4 * L] = static_cast<uint8_t>(8 * (c % 8));
    t.shift[4 * L + 2] = static_cast<uint8_t>(8 * (c % 8) + 4);
    t.column[L] = c;
    t.c_of_y[c] = L;
  }
  return t;
}
constexpr RawLanes RAW = raw_lanes();

// An int8 B-tile row holds rows 4r .. 4r + 3 of all 16 columns, column n in dword n: the code
// bytes b0, b1 of pairs 2r and 2r + 1 (32 contiguous bytes) are gathered to [b0[n], b1[n],
// b0[n + 1], b1[n + 1]] in the low half of 64-bit word n / 2, and vpmultishiftqb takes the four
// nibbles of each of those two 16-bit halves into the word's 8 bytes, in column order.
struct ByteLanes {
  alignas(64) uint8_t gather[64];
  alignas(64) uint8_t shift[64];
};

constexpr ByteLanes byte_lanes() {
  ByteLanes t{};
  for (int w = 0; w < 8; ++w) {
    const int n = 2 * w;
    const uint8_t src[4] = {static_cast<uint8_t>(n), static_cast<uint8_t>(TILE + n),
                            static_cast<uint8_t>(n + 1), static_cast<uint8_t>(TILE + n + 1)};
    for (int b = 0; b < 8; ++b) {
      t.gather[8 * w + b] = b < 4 ? src[b] : 0;
      t.shift[8 * w + b] = static_cast<uint8_t>(4 * b);
    }
  }
  return t;
}
constexpr ByteLanes BYTES = byte_lanes();

// One B tile of strip tile j from pair p0 on, 64 bytes a row. bf16: pair p0 + r in row r, each
// bf16 half 0x4300 | q, the bits of 128 + q. int8: pairs p0 + 2r, p0 + 2r + 1 in row r, q as bytes.
template <bool INT8>
TSQ_VBMI void decode_codes(const Int4Codes& codes, int64_t j, int64_t p0, uint8_t* dst) {
  if constexpr (INT8) {
    const __m512i gather = _mm512_load_si512(BYTES.gather), shift = _mm512_load_si512(BYTES.shift);
    const __m512i nibble = _mm512_set1_epi8(0x0F);
    for (int64_t r = 0; r < ROWS; ++r) {
      const __m512i bytes = _mm512_castsi256_si512(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes.row(j, p0 + 2 * r))));
      const __m512i q =
          _mm512_multishift_epi64_epi8(shift, _mm512_permutexvar_epi8(gather, bytes));
      _mm512_storeu_si512(dst + 64 * r, _mm512_and_si512(q, nibble));
    }
  } else {
    const __m512i shift = _mm512_load_si512(RAW.shift);
    const __m512i nibble = _mm512_set1_epi32(0x000F000F), b128 = _mm512_set1_epi32(0x43004300);
    constexpr int AND_OR = 0xEA;  // ternary logic (a & b) | c
    for (int64_t r = 0; r < ROWS; ++r) {
      const __m512i bytes = _mm512_broadcast_i32x4(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes.row(j, p0 + r))));
      const __m512i q = _mm512_multishift_epi64_epi8(shift, bytes);
      _mm512_storeu_si512(dst + 64 * r, _mm512_ternarylogic_epi32(q, nibble, b128, AND_OR));
    }
  }
}

// One group's products into accumulator tiles (C0, C1): zeroed, then Σ over its chunks of the x
// tile times the code tiles b [chunk][STRIP][1 KiB]. The tile numbers must be literals.
#define TSQ_TILE_DP(C, A, B)         \
  do {                               \
    if constexpr (INT8)              \
      _tile_dpbsud(C, A, B);         \
    else                             \
      _tile_dpbf16ps(C, A, B);       \
  } while (0)
#define TSQ_GROUP_PRODUCTS(C0, C1)                                                   \
  do {                                                                               \
    _tile_zero(C0);                                                                  \
    if (two) _tile_zero(C1);                                                         \
    for (int64_t ch = 0; ch < chunks; ++ch) {                                        \
      _tile_loadd(6, b + ch * STRIP * TILE_BYTES, 64);                               \
      if (two) _tile_loadd(7, b + ch * STRIP * TILE_BYTES + TILE_BYTES, 64);         \
      _tile_loadd(4, a + ch * TILE_BYTES, 64);                                       \
      TSQ_TILE_DP(C0, 4, 6);                                                         \
      if (two) TSQ_TILE_DP(C1, 4, 7);                                                \
    }                                                                                \
  } while (0)

template <bool INT8>
void group_products(bool odd, bool two, const uint8_t* a, const uint8_t* b, int64_t chunks) {
  if (odd)
    TSQ_GROUP_PRODUCTS(2, 3);
  else
    TSQ_GROUP_PRODUCTS(0, 1);
}

void store_group(bool odd, bool two, float* c) {
  if (odd) {
    _tile_stored(2, c, 64);
    if (two) _tile_stored(3, c + C_FLOATS, 64);
  } else {
    _tile_stored(0, c, 64);
    if (two) _tile_stored(1, c + C_FLOATS, 64);
  }
}

// x as the A tiles see it, one row tile: [chunk][16 rows][64 bytes], rows past M zero; for int8
// also each row's group scales sx [M, K/G].
struct RowTile {
  const uint8_t* a;
  const float* sx;
};

// sums [m][j][16] += s ⊙ C_g[j][m] + (o − 128·s)·xsum[m, g] (bf16), or
// s·sx[m, g] ⊙ C_g[j][m] + o·xsum[m, g] (int8), for the strip's nt tiles from t.
template <bool INT8>
void fold_group(const Problem& pr, const RowTile& x, int64_t g, int64_t t, int64_t nt,
                const float* c, float* sums) {
  const __m512i col = _mm512_load_si512(RAW.column);
  for (int64_t j = 0; j < nt; ++j) {
    __m512 s = _mm512_loadu_ps(pr.scale_at(0, g, t + j));
    __m512 o = _mm512_loadu_ps(pr.offset_at(g, t + j));
    if constexpr (!INT8) {
      s = _mm512_permutexvar_ps(col, s);
      o = _mm512_fnmadd_ps(_mm512_set1_ps(128.f), s, _mm512_permutexvar_ps(col, o));
    }
    for (int64_t m = 0; m < pr.M; ++m) {
      float* acc = sums + (m * STRIP + j) * TILE;
      const float* cm = c + j * C_FLOATS + m * TILE;
      __m512 v;
      if constexpr (INT8) {
        const __m512 sm = _mm512_mul_ps(s, _mm512_set1_ps(x.sx[m * pr.n_blocks() + g]));
        const __m512 cf = _mm512_cvtepi32_ps(_mm512_loadu_si512(cm));
        v = _mm512_fmadd_ps(sm, cf, _mm512_loadu_ps(acc));
      } else {
        v = _mm512_fmadd_ps(s, _mm512_loadu_ps(cm), _mm512_loadu_ps(acc));
      }
      v = _mm512_fmadd_ps(o, _mm512_set1_ps(pr.xsum[m * pr.n_blocks() + g]), v);
      _mm512_storeu_ps(acc, v);
    }
  }
}

// One strip (nt ≤ STRIP tiles from tile t): groups in order, each decoded into its half of b
// (2 groups' code tiles, so the decode of g never overwrites tiles g − 1's products still read).
template <bool INT8>
void strip(const Problem& pr, const Int4Codes& codes, const RowTile& x, int64_t t, int64_t nt,
           uint8_t* b) {
  constexpr int64_t chunk = INT8 ? INT8_CHUNK : CHUNK, pairs_per_tile = chunk / 2;
  const int64_t chunks = pr.G / chunk, n_groups = pr.n_blocks(), pairs = pr.G / 2;
  const bool two = nt == 2;
  alignas(64) float c[STRIP * C_FLOATS];
  alignas(64) float sums[ROWS * STRIP * TILE] = {};
  const Int4Codes strip_codes = codes.at(t);
  for (int64_t g = 0; g <= n_groups; ++g) {
    prefetch_ahead(pr, strip_codes, t, nt, g);
    if (g < n_groups) {
      uint8_t* bg = b + (g % 2) * chunks * STRIP * TILE_BYTES;
      for (int64_t ch = 0; ch < chunks; ++ch)
        for (int64_t j = 0; j < nt; ++j)
          decode_codes<INT8>(strip_codes, j, g * pairs + ch * pairs_per_tile,
                             bg + (ch * STRIP + j) * TILE_BYTES);
      group_products<INT8>(g % 2, two, x.a + g * chunks * TILE_BYTES, bg, chunks);
    }
    if (g > 0) {
      store_group((g - 1) % 2, two, c);
      fold_group<INT8>(pr, x, g - 1, t, nt, c, sums);
    }
  }
  const __m512i order = _mm512_load_si512(RAW.c_of_y);
  for (int64_t m = 0; m < pr.M; ++m)
    for (int64_t j = 0; j < nt; ++j) {
      __m512 v = _mm512_loadu_ps(sums + (m * STRIP + j) * TILE);
      if constexpr (!INT8) v = _mm512_permutexvar_ps(order, v);
      const __m256bh y = _mm512_cvtneps_pbh(v);
      std::memcpy(pr.y + m * pr.n_pad() + TILE * (t + j), &y, sizeof y);
    }
}

template <bool INT8>
void strips(const Problem& pr, const Int4Codes& codes, const RowTile& x, int64_t t0, int64_t t1) {
  constexpr int64_t chunk = INT8 ? INT8_CHUNK : CHUNK;
  std::vector<uint8_t> b(static_cast<size_t>(2 * (pr.G / chunk) * STRIP * TILE_BYTES));
  for (int64_t t = t0; t < t1; t += STRIP)
    strip<INT8>(pr, codes, x, t, std::min(STRIP, t1 - t), b.data());
}

}  // namespace

void gemm_amx_exact(const Problem& pr, const Int4Codes& codes, const uint8_t* xa, int64_t t0,
                    int64_t t1) {
  strips<false>(pr, codes, RowTile{xa, nullptr}, t0, t1);
}

void gemm_amx_int8(const Problem& pr, const Int4Codes& codes) {
  TORCH_CHECK(pr.M <= ROWS && pr.G % INT8_CHUNK == 0, "int8 tile path: needs M <= ", ROWS,
              " and group_size % ", INT8_CHUNK, " == 0, got M = ", pr.M, ", group_size = ", pr.G);
  const Int8Input in(pr, /*tile_order=*/true);
  const RowTile x{reinterpret_cast<const uint8_t*>(in.x8.data()), in.sx.data()};
  at::parallel_for(0, pr.T, STRIP, [&](int64_t t0, int64_t t1) {
    configure_tiles();
    strips<true>(in.pr, codes, x, t0, t1);
    _tile_release();
  });
}

}  // namespace tsq

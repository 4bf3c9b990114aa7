// The int8-activation path on AVX512-VNNI, for CPUs without AMX-INT8 (or with the tile path
// off): the math of cpu_gemm_amx_exact.cpp's int8 variant, with the same spec
// (kernels/reference.py's int8_activation_matmul_reference), x8 = round(x · 127/amax) and
// sx = amax/127 per row and group:
//   y[m, n] = Σ_g s[g, n] · sx[m, g] · Σ_{k in g} x8[m, k]·q[k, n] + o[g, n] · Σ_{k in g} x[m, k].
//
// vpdpbusd adds the products of 4 unsigned bytes and 4 signed bytes to an int32 lane: the codes
// are the unsigned operand, 4 consecutive k of one column per lane, and one broadcast dword of a
// row's x8 serves the tile's 16 columns. That is 64 weights per instruction and row, where the
// bf16 path's vdpbf16ps takes 32, and the decode is shared by the block's rows as there. Blocks,
// strips and threads are for_each_block's (cpu_gemm.h), as gemm_avx512's are, and each group's
// integer sums are folded in the order the tile path folds them, so where both run their results
// are the same.
// Any M. Each row block decodes the strip's codes again (6 vector operations per 64 weights
// against the block's 8 dot products): decoding a strip once into a buffer for all row blocks
// measured 1.16–1.33× slower at M = 16 and at most 1.12× faster at M = 32–128 (one thread,
// Qwen2.5-1.5B's MLP shapes, weights from memory; a one-off comparison), so it was dropped.
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <cpuid.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu_gemm.h"

// Only the functions marked with this are compiled for VNNI; they run after vnni_unavailable().
#define TSQ_VNNI __attribute__((target("avx512vnni")))

namespace tsq {
namespace {

// Rows 4r .. 4r + 3 of tile j's 16 columns as vpdpbusd's dwords, [q[4r], .., q[4r + 3]] of column
// n in lane n. Pairs 2r and 2r + 1 are the 32 contiguous bytes b0, b1 (Int4Codes): d = b0[n] |
// b1[n] << 16 holds rows 4r, 4r + 1 in byte 0 and 4r + 2, 4r + 3 in byte 2, and
// (d | d << 4) & 0x0F0F0F0F gives each nibble a byte of its own.
TSQ_INLINE __m512i code_quad(const Int4Codes& codes, int64_t j, int64_t r) {
  const uint8_t* p = codes.row(j, 2 * r);
  const __m512i b0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m512i b1 =
      _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + TILE)));
  const __m512i d = _mm512_or_si512(b0, _mm512_slli_epi32(b1, 16));
  constexpr int OR_AND = 0xA8;  // ternary logic (a | b) & c
  return _mm512_ternarylogic_epi32(d, _mm512_slli_epi32(d, 4), _mm512_set1_epi32(0x0F0F0F0F),
                                   OR_AND);
}

// x8 [M, K] row-major and its scales sx [M, K/G], beside the Problem (whose xsum is set).
struct Int8Rows {
  const int8_t* x8;
  const float* sx;
};

// MB rows of x from row m0 against NT adjacent tiles from tile t (codes at tile t), every group:
// MB·NT independent int32 chains per group, then the fold into fp32.
template <int MB, int NT>
TSQ_VNNI void block(const Problem& pr, const Int4Codes& codes, const Int8Rows& x, int64_t m0,
                    int64_t t) {
  const int64_t K = pr.K, n_blocks = pr.n_blocks(), quads = pr.G / 4;
  const int8_t* x8 = x.x8 + m0 * K;
  const float* sx = x.sx + m0 * n_blocks;
  const float* xsum = pr.xsum + m0 * n_blocks;
  __m512 out[MB][NT];
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < NT; ++j) out[m][j] = _mm512_setzero_ps();
  for (int64_t b = 0; b < n_blocks; ++b) {
    prefetch_ahead(pr, codes, t, NT, b);
    __m512i acc[MB][NT];
    for (int m = 0; m < MB; ++m)
      for (int j = 0; j < NT; ++j) acc[m][j] = _mm512_setzero_si512();
    for (int64_t r = b * quads; r < (b + 1) * quads; ++r) {
      __m512i wv[NT];
      for (int j = 0; j < NT; ++j) wv[j] = code_quad(codes, j, r);
      for (int m = 0; m < MB; ++m) {
        int32_t four;
        std::memcpy(&four, x8 + m * K + 4 * r, sizeof four);
        const __m512i xv = _mm512_set1_epi32(four);
        for (int j = 0; j < NT; ++j) acc[m][j] = _mm512_dpbusd_epi32(acc[m][j], wv[j], xv);
      }
    }
    for (int j = 0; j < NT; ++j) {
      const __m512 sv = _mm512_loadu_ps(pr.scale_at(0, b, t + j));
      const __m512 ov = _mm512_loadu_ps(pr.offset_at(b, t + j));
      for (int m = 0; m < MB; ++m) {
        const __m512 sm = _mm512_mul_ps(sv, _mm512_set1_ps(sx[m * n_blocks + b]));
        const __m512 v = _mm512_fmadd_ps(sm, _mm512_cvtepi32_ps(acc[m][j]), out[m][j]);
        out[m][j] = _mm512_fmadd_ps(ov, _mm512_set1_ps(xsum[m * n_blocks + b]), v);
      }
    }
  }
  uint16_t* y = pr.y + m0 * pr.n_pad() + TILE * t;
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < NT; ++j) {
      const __m256bh v = _mm512_cvtneps_pbh(out[m][j]);
      std::memcpy(y + m * pr.n_pad() + TILE * j, &v, sizeof v);
    }
}

using BlockFn = void (*)(const Problem&, const Int4Codes&, const Int8Rows&, int64_t, int64_t);

template <int NT>
constexpr BlockFn kBlocks[BLOCK_ROWS + 1] = {nullptr,      block<1, NT>, block<2, NT>,
                                             block<3, NT>, block<4, NT>, block<5, NT>,
                                             block<6, NT>, block<7, NT>, block<8, NT>};

}  // namespace

// Asked once: every int8 call checks it, and cpuid is slow (in a VM it can trap to the host).
const char* vnni_unavailable() {
  static const char* why = []() -> const char* {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(c & (1u << 11)))
      return "this CPU has no AVX512-VNNI (cpuid leaf 7)";
    return nullptr;
  }();
  return why;
}

void gemm_vnni_int8(const Problem& pr, const Int4Codes& codes) {
  TORCH_CHECK(pr.G % INT8_CHUNK == 0, "int8 VNNI path: needs group_size % ", INT8_CHUNK,
              " == 0, got ", pr.G);
  const Int8Input in(pr, /*tile_order=*/false);
  const Int8Rows x{in.x8.data(), in.sx.data()};
  for_each_block(pr.M, pr.T, [&](int64_t m0, int mb, int64_t t, int width) {
    const BlockFn f = width == 4 ? kBlocks<4>[mb] : width == 2 ? kBlocks<2>[mb] : kBlocks<1>[mb];
    f(in.pr, codes.at(t), x, m0, t);
  });
}

}  // namespace tsq

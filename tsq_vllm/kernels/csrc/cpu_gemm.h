// What the native CPU GEMM paths share (cpu_gemm.cpp: AVX512-BF16 register blocks;
// cpu_gemm_amx*.cpp: AMX tiles; cpu_gemm_vnni.cpp: int8 activations on VNNI): the problem and
// the two code layouts, each with the load that turns one (tile, row pair) of codes into the 32
// bf16 lanes [q[2p, 16t + j], q[2p + 1, 16t + j]] for j = 0..15 that vdpbf16ps pairs with a
// broadcast (x[2p], x[2p + 1]). The tile path's own
// decode (codes to scaled bf16 weights) lives in cpu_gemm_amx.cpp.
#pragma once

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace tsq {

constexpr int64_t TILE = 16;  // output columns per tile (16 fp32 lanes)

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
  const uint8_t* row(int64_t j, int64_t p) const { return w + j * tile_stride + p * TILE; }
  const void* addr(int /*plane*/, int64_t j, int64_t p) const { return row(j, p); }
  static constexpr int64_t BYTES_PER_PAIR = TILE;
  __m512i load(int /*plane*/, int64_t j, int64_t p) const {
    const __m512i v = _mm512_cvtepu8_epi32(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(row(j, p))));
    const __m512i lo = _mm512_and_si512(v, _mm512_set1_epi32(0x0F));
    const __m512i hi = _mm512_slli_epi32(_mm512_and_si512(v, _mm512_set1_epi32(0xF0)), 12);
    return _mm512_permutexvar_epi16(_mm512_or_si512(lo, hi), lut);
  }
 private:
  Int4Codes(const uint8_t* w, int64_t s, __m512i lut) : w(w), tile_stride(s), lut(lut) {}
};

// One-bit planes: the word of a (tile, pair) is the mask of its 32 lanes that hold 1.0.
struct BitPlanes {
  const uint32_t* w;  // plane 0 at the block's first tile
  int64_t tile_stride, plane_stride;

  BitPlanes at(int64_t t) const { return {w + t * tile_stride, tile_stride, plane_stride}; }
  const uint32_t* addr(int plane, int64_t j, int64_t p) const {
    return w + plane * plane_stride + j * tile_stride + p;
  }
  static constexpr int64_t BYTES_PER_PAIR = 4;
  uint32_t word(int plane, int64_t j, int64_t p) const { return *addr(plane, j, p); }
  __m512i load(int plane, int64_t j, int64_t p) const {
    return _mm512_maskz_mov_epi16(word(plane, j, p), _mm512_set1_epi16(0x3F80));  // bf16 1.0
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
  const float* xsum;  // [M, K/G]: group_sums(x), where the path folds offsets itself, else null
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

// Software prefetch: the kernels ask for the group PREFETCH_GROUPS ahead of the one they decode
// (past a strip's last group, the next strip's first). One strip's walk down K is short and runs
// 2–4 tiles' codes, scales and offsets side by side: too many streams, too short, for the
// hardware prefetchers alone. One thread, weights streamed from memory (copies cycled), Qwen2.5-
// 1.5B's shapes: 1.15× faster at M = 1, 1.4× at M = 16, 1.1–1.35× at M = 24–256; a one-off
// comparison, distances of 1–4 groups alike.
constexpr int64_t PREFETCH_GROUPS = 2;

// Both always inlined: GCC 12 takes a function whose only effect is a prefetch for one without
// side effects and drops the calls to it (checked in its assembly: not one prefetcht0 left).
#define TSQ_INLINE __attribute__((always_inline)) inline

TSQ_INLINE void prefetch_lines(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) _mm_prefetch(c + off, _MM_HINT_T0);
}

// Pairs [p, p + n) of tile j of `codes` (every plane), and the table rows of their group in
// tile t (the same tile, counted from the weight's first).
template <class Codes>
TSQ_INLINE void prefetch(const Problem& pr, const Codes& codes, int64_t j, int64_t t, int64_t p,
                         int64_t n) {
  const int64_t group = p / (pr.G / 2);
  for (int i = 0; i < pr.n_planes; ++i) {
    prefetch_lines(codes.addr(i, j, p), n * Codes::BYTES_PER_PAIR);
    prefetch_lines(pr.scale_at(i, group, t), 64);
  }
  prefetch_lines(pr.offset_at(group, t), 64);
}

// What tiles [t, t + nt) of `codes` (at tile t) read for group b + PREFETCH_GROUPS; past the
// last group, what the next nt tiles read for their first groups.
template <class Codes>
TSQ_INLINE void prefetch_ahead(const Problem& pr, const Codes& codes, int64_t t, int64_t nt,
                               int64_t b) {
  const int64_t ahead = b + PREFETCH_GROUPS, next = ahead >= pr.n_blocks() ? nt : 0;
  const int64_t pairs = pr.G / 2, p = (ahead % pr.n_blocks()) * pairs;
  for (int64_t j = 0; j < nt && t + next + j < pr.T; ++j)
    prefetch(pr, codes, j + next, t + next + j, p, pairs);
}

// Σ of each row's group of x in fp32 [M, n_blocks], the offset term's input (cpu_gemm.cpp).
std::vector<float> group_sums(const uint16_t* x, int64_t M, int64_t n_blocks, int64_t G);

// The register-block walk of the dot-product paths (cpu_gemm.cpp, cpu_gemm_vnni.cpp). Threads
// split the column tiles into strips of BLOCK_STRIP tiles; every row block of x (BLOCK_ROWS rows,
// the last one shorter) passes over a strip before the next strip starts, so the strip's codes
// (128 KiB of int4 codes at K = 4096) come from memory once and from cache after, whatever M is.
// Within a strip, block_tiles(mb) tiles at a time, a remainder one at a time (the same sums in
// the same order either way: results do not depend on the split). run(m0, mb, t, width) computes
// rows [m0, m0 + mb) of tiles [t, t + width).
constexpr int BLOCK_ROWS = 8;  // 2·BLOCK_ROWS accumulators + 3 live vectors in the 32 registers
constexpr int64_t BLOCK_STRIP = 4;
// Few rows need more tiles to have enough independent chains; MB·NT accumulators plus NT weight
// vectors stay within the 32 zmm registers.
constexpr int block_tiles(int mb) { return mb <= 2 ? 4 : 2; }

template <class Run>
void for_each_block(int64_t M, int64_t T, const Run& run) {
  at::parallel_for(0, T, BLOCK_STRIP, [&](int64_t t0, int64_t t1) {
    for (int64_t s0 = t0; s0 < t1; s0 += BLOCK_STRIP) {
      const int64_t s1 = std::min<int64_t>(s0 + BLOCK_STRIP, t1);
      for (int64_t m0 = 0; m0 < M; m0 += BLOCK_ROWS) {
        const int mb = static_cast<int>(std::min<int64_t>(BLOCK_ROWS, M - m0));
        const int nt = block_tiles(mb);
        for (int64_t t = s0; t < s1;) {
          const int width = nt <= s1 - t ? nt : 1;
          run(m0, mb, t, width);
          t += width;
        }
      }
    }
  });
}

// The int8-activation paths: x quantized per row and group (x ≈ sx·x8, x8 = round(x · 127/amax),
// sx = amax/127; spec: kernels/reference.py's int8_activation_matmul_reference) times 4-bit codes
// in int32, for groups of whole INT8_CHUNKs (the tiles: at most INT8_ROWS rows; VNNI: any M).
constexpr int64_t INT8_ROWS = 16;   // one AMX row tile
constexpr int64_t INT8_CHUNK = 64;  // k per AMX-INT8 tile multiply
// x8 and sx [M, K/G] (cpu_gemm.cpp): x8 row-major [M, K], or with tile_order in AMX A-tile order
// [K/INT8_CHUNK][INT8_ROWS][INT8_CHUNK] with zero rows past M (then M <= INT8_ROWS).
void quantize_rows(const Problem& pr, bool tile_order, std::vector<int8_t>& x8,
                   std::vector<float>& sx);

// x as an int8 path takes it: x8 and sx (quantize_rows), and the Problem with xsum set to x's
// exact group sums (group_sums). Not copyable: pr points into it.
struct Int8Input {
  std::vector<int8_t> x8;
  std::vector<float> sx, xsum;
  Problem pr;
  Int8Input(const Problem& p, bool tile_order) : pr(p) {
    quantize_rows(p, tile_order, x8, sx);
    xsum = group_sums(p.x, p.M, p.n_blocks(), p.G);
    pr.xsum = xsum.data();
  }
  Int8Input(const Int8Input&) = delete;
  Int8Input& operator=(const Int8Input&) = delete;
};

// The AMX path (cpu_gemm_amx.cpp). Needs K % 32 == 0 and amx_unavailable() == nullptr; takes
// at most 8 planes.
template <class Codes>
void gemm_amx(const Problem& pr, const Codes& codes);
// nullptr when this CPU and kernel let this process use AMX tiles, else why not.
const char* amx_unavailable();
// The same for the int8 tile multiplies (AMX-INT8) as well.
const char* amx_int8_unavailable();
// The int8 path on AMX-INT8 tiles (cpu_gemm_amx_exact.cpp; needs amx_int8_unavailable() ==
// nullptr) and on AVX512-VNNI dot products (cpu_gemm_vnni.cpp; needs vnni_unavailable() ==
// nullptr).
void gemm_amx_int8(const Problem& pr, const Int4Codes& codes);
void gemm_vnni_int8(const Problem& pr, const Int4Codes& codes);
const char* vnni_unavailable();

}  // namespace tsq

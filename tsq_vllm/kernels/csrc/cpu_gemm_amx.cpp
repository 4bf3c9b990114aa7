// The AMX path of the native GEMM (see cpu_gemm.cpp for the problem and the code layouts).
//
// On CPUs with AMX a bf16 matmul runs on tile units (tdpbf16ps: a 16 × 32 bf16 tile of x times a
// 32 × 16 tile of weights into a 16 × 16 fp32 tile in one instruction), and oneDNN's dense bf16
// GEMM uses them: the AVX512-BF16 dot products of cpu_gemm.cpp lose to it from M ≈ 16 rows on.
//
// Here a strip of 2 column tiles is decoded into bf16 B tiles, weights w = s·q + o computed in
// fp32 and rounded once to bf16 (as a dense bf16 model's weights are), and every 32-row pair of
// x tiles multiplies them into 4 accumulator tiles over the whole of K. The per-group scales are
// in the weights, so the accumulators run without a break: tile instructions have long
// latencies, and a store and reload of the accumulators per group (the exact-scale scheme of the
// AVX-512 path) measured 2–3× slower than this on the same host.
//
// Tiles: 0-3 accumulators C[r][c] (row tile r, column tile c), 4-5 x tiles A[r], 6-7 weight
// tiles B[c]; all 16 rows × 64 bytes. x is first copied into A-tile order, zero rows past M.
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <vector>

#include "cpu_gemm.h"

namespace tsq {
namespace {

constexpr int64_t ROWS = 16;          // rows of an A or C tile
constexpr int64_t CHUNK = 32;         // k per tile multiply: 16 bf16 pairs
constexpr int64_t TILE_BYTES = 1024;  // every tile: 16 rows × 64 bytes
constexpr int64_t STRIP = 2;          // column tiles per strip (C tiles 2 × 2)
constexpr int64_t WINDOW = 8;         // chunks decoded at a time when one row pair is all of x
constexpr int MAX_PLANES = 8;         // BCQ planes the tile path takes (GPTQT uses ≤ 4)

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

void configure_tiles() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = ROWS;
  }
  _tile_loadconfig(&cfg);
}

// The accumulators of a row pair (TWO_ROWS) × column pair (TWO_COLS): zero, Σ over chunks of
// A[r] · B[c], store to c_out [4][16][16] fp32 (C[r][c] at index 2r + c). a: chunk 0's A tile of
// the first row tile (chunk tiles 1 KiB apart, the second row tile a_step bytes on); b: B tiles
// [chunk][STRIP][1 KiB].
template <bool TWO_ROWS, bool TWO_COLS>
struct Block {
  static void zero() {
    _tile_zero(0);
    if constexpr (TWO_COLS) _tile_zero(1);
    if constexpr (TWO_ROWS) _tile_zero(2);
    if constexpr (TWO_ROWS && TWO_COLS) _tile_zero(3);
  }
  static void accumulate(const uint8_t* a, int64_t a_step, const uint8_t* b, int64_t chunks) {
    for (int64_t ch = 0; ch < chunks; ++ch) {
      const uint8_t* bc = b + ch * STRIP * TILE_BYTES;
      _tile_loadd(6, bc, 64);
      if constexpr (TWO_COLS) _tile_loadd(7, bc + TILE_BYTES, 64);
      _tile_loadd(4, a + ch * TILE_BYTES, 64);
      _tile_dpbf16ps(0, 4, 6);
      if constexpr (TWO_COLS) _tile_dpbf16ps(1, 4, 7);
      if constexpr (TWO_ROWS) {
        _tile_loadd(5, a + a_step + ch * TILE_BYTES, 64);
        _tile_dpbf16ps(2, 5, 6);
        if constexpr (TWO_COLS) _tile_dpbf16ps(3, 5, 7);
      }
    }
  }
  static void store(float* c_out) {
    constexpr int64_t C_FLOATS = TILE_BYTES / 4;
    _tile_stored(0, c_out, 64);
    if constexpr (TWO_COLS) _tile_stored(1, c_out + C_FLOATS, 64);
    if constexpr (TWO_ROWS) _tile_stored(2, c_out + 2 * C_FLOATS, 64);
    if constexpr (TWO_ROWS && TWO_COLS) _tile_stored(3, c_out + 3 * C_FLOATS, 64);
  }
};

struct BlockFns {
  void (*zero)();
  void (*accumulate)(const uint8_t*, int64_t, const uint8_t*, int64_t);
  void (*store)(float*);
};

template <bool R, bool C>
constexpr BlockFns block_fns() {
  return {Block<R, C>::zero, Block<R, C>::accumulate, Block<R, C>::store};
}

// B tiles of chunks [c0, c0 + n) of the strip's nt column tiles from tile t, into b
// [chunk − c0][STRIP][1 KiB]: per row pair, the fp32 weights rounded once to bf16. A chunk's 16
// pairs lie in one group when G is a multiple of 32; smaller groups split it into runs.
template <class Codes>
void decode(const Problem& pr, const Codes& codes, int64_t t, int64_t nt, int64_t c0, int64_t n,
            uint8_t* b) {
  const int64_t pairs = pr.G / 2;
  const __m512i order = pair_order();
  for (int64_t c = c0; c < c0 + n; ++c)
    for (int64_t j = 0; j < nt; ++j) {
      uint8_t* dst = b + ((c - c0) * STRIP + j) * TILE_BYTES;
      for (int64_t r = 0; r < ROWS;) {
        const int64_t p = c * ROWS + r, group = p / pairs;
        const int64_t run = std::min(ROWS - r, (group + 1) * pairs - p);
        codes.decode_rows(j, p, run, pr.scale_at(0, group, t + j), pr.ld_plane(), pr.n_planes,
                          pr.offset_at(group, t + j), order, dst + 64 * r);
        r += run;
      }
    }
}

// x in A-tile order, [row tile][chunk][16 rows][32 bf16] (zero rows past M): each A tile is
// 1 KiB of consecutive bytes. Loading tiles straight from x would read 16 rows 2K bytes apart,
// which for K a multiple of 2048 all fall into one L1 set.
std::vector<uint16_t> tile_rows(const Problem& pr) {
  const int64_t row_tiles = (pr.M + ROWS - 1) / ROWS, chunks = pr.K / CHUNK;
  std::vector<uint16_t> xa(static_cast<size_t>(row_tiles * ROWS * pr.K), 0);
  for (int64_t m = 0; m < pr.M; ++m)
    for (int64_t c = 0; c < chunks; ++c)
      std::memcpy(xa.data() + (((m / ROWS) * chunks + c) * ROWS + m % ROWS) * CHUNK,
                  pr.x + m * pr.K + c * CHUNK, CHUNK * sizeof(uint16_t));
  return xa;
}

// Rows [m0, m0 + rows) of the strip's columns from the stored accumulators into y (bf16).
void write_rows(const Problem& pr, const float* acc, int64_t m0, int64_t rows, int64_t t,
                int64_t nt) {
  constexpr int64_t C_FLOATS = TILE_BYTES / 4;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < nt; ++j) {
      const float* c = acc + ((r / ROWS) * 2 + j) * C_FLOATS + (r % ROWS) * TILE;
      const __m256bh v = _mm512_cvtneps_pbh(_mm512_loadu_ps(c));
      std::memcpy(pr.y + (m0 + r) * pr.n_pad() + TILE * (t + j), &v, sizeof v);
    }
}

// One strip (nt ≤ STRIP column tiles from tile t) of every row. With one row pair the decode
// runs a window of chunks ahead of the multiplies (the B tiles stay in L1); with more, the
// strip's whole B is decoded once and every row pair passes over it.
template <class Codes>
void strip(const Problem& pr, const Codes& codes, const uint8_t* xa, int64_t t, int64_t nt,
           std::vector<uint8_t>& bbuf, float* acc) {
  const int64_t chunks = pr.K / CHUNK, a_step = chunks * TILE_BYTES;
  const BlockFns fns[2][2] = {{block_fns<false, false>(), block_fns<false, true>()},
                              {block_fns<true, false>(), block_fns<true, true>()}};
  if (pr.M <= 2 * ROWS) {
    const BlockFns& f = fns[pr.M > ROWS][nt == 2];
    f.zero();
    for (int64_t c0 = 0; c0 < chunks; c0 += WINDOW) {
      const int64_t n = std::min(WINDOW, chunks - c0);
      decode(pr, codes.at(t), t, nt, c0, n, bbuf.data());
      f.accumulate(xa + c0 * TILE_BYTES, a_step, bbuf.data(), n);
    }
    f.store(acc);
    write_rows(pr, acc, 0, pr.M, t, nt);
    return;
  }
  decode(pr, codes.at(t), t, nt, 0, chunks, bbuf.data());
  for (int64_t m0 = 0; m0 < pr.M; m0 += 2 * ROWS) {
    const BlockFns& f = fns[m0 + ROWS < pr.M][nt == 2];
    f.zero();
    f.accumulate(xa + (m0 / ROWS) * a_step, a_step, bbuf.data(), chunks);
    f.store(acc);
    write_rows(pr, acc, m0, std::min(pr.M - m0, 2 * ROWS), t, nt);
  }
}

}  // namespace

const char* amx_unavailable() {
  static const char* why = []() -> const char* {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 24)) || !(d & (1u << 22)))
      return "this CPU has no AMX-TILE/AMX-BF16 (cpuid leaf 7)";
    // Linux hands out the tile state only on request, once per process (ARCH_REQ_XCOMP_PERM,
    // XFEATURE_XTILEDATA); without it the first tile instruction faults.
    constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0)
      return "the kernel refused the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM)";
    return nullptr;
  }();
  return why;
}

// Threads split the column tiles as the AVX-512 path does; each thread configures its own tiles
// (tile state is per thread) and releases them when its range is done. Every tile's sums run
// in the same order whatever the split.
template <class Codes>
void gemm_amx(const Problem& pr, const Codes& codes) {
  TORCH_CHECK(pr.n_planes <= MAX_PLANES, "AMX path: at most ", MAX_PLANES, " planes");
  const std::vector<uint16_t> xa = tile_rows(pr);
  const auto* xa_bytes = reinterpret_cast<const uint8_t*>(xa.data());
  const int64_t b_chunks = pr.M <= 2 * ROWS ? WINDOW : pr.K / CHUNK;
  at::parallel_for(0, pr.T, STRIP, [&](int64_t t0, int64_t t1) {
    configure_tiles();
    std::vector<uint8_t> bbuf(static_cast<size_t>(b_chunks * STRIP * TILE_BYTES));
    alignas(64) float acc[4 * TILE_BYTES / 4];
    for (int64_t t = t0; t < t1; t += STRIP)
      strip(pr, codes, xa_bytes, t, std::min(STRIP, t1 - t), bbuf, acc);
    _tile_release();
  });
}

template void gemm_amx<Int4Codes>(const Problem&, const Int4Codes&);
template void gemm_amx<BitPlanes>(const Problem&, const BitPlanes&);

}  // namespace tsq

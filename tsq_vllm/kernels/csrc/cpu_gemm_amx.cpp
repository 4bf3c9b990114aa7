// The AMX path of the native GEMM (see cpu_gemm.cpp for the problem and the code layouts).
//
// On CPUs with AMX a bf16 matmul runs on tile units (tdpbf16ps: a 16 × 32 bf16 tile of x times a
// 32 × 16 tile of weights into a 16 × 16 fp32 tile in one instruction), and oneDNN's dense bf16
// GEMM uses them: the AVX512-BF16 dot products of cpu_gemm.cpp lose to it from M ≈ 16 rows on.
//
// Here a strip of 2 column tiles is decoded into bf16 B tiles, weights w = s·q + o computed in
// fp32 and rounded once to bf16 (as a dense bf16 model's weights are), and every 32-row pair of
// x tiles multiplies them into 4 accumulator tiles. The per-group scales are in the weights, so
// the accumulators run without a break per group: tile instructions have long latencies, and a
// store and reload of the accumulators after every group, waiting on its multiplies, measured
// 2–3× slower than this. (For one row tile of 4-bit codes, cpu_gemm_amx_exact.cpp does keep the
// scales out of the tiles, with the stores put off by a group; there it pays.) Up to 32 rows the
// accumulators stay in their tiles over all of K; taller x (prefill) goes in panels of 16 strips
// and blocks of K, so that x is read once per panel (`panel`).
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
#include <type_traits>
#include <vector>

#include "cpu_amx.h"

namespace tsq {
namespace {

constexpr int64_t WINDOW = 8;   // chunks decoded at a time when one row pair is all of x
constexpr int64_t PANEL = 32;   // column tiles that share a pass over x when x is taller
constexpr int64_t K_BLOCK = 8;  // chunks per pass: a row pair's A tiles (16 KiB) stay in L1
constexpr int MAX_PLANES = 8;   // BCQ planes the tile path takes (GPTQT uses ≤ 4)

// The accumulators of a row pair (TWO_ROWS) × column pair (TWO_COLS): zero or load, Σ over
// chunks of A[r] · B[c], store; in memory c [4][16][16] fp32 (C[r][c] at index 2r + c). a: chunk
// 0's A tile of the first row tile (chunk tiles 1 KiB apart, the second row tile a_step bytes
// on); b: B tiles [chunk][STRIP][1 KiB].
template <bool TWO_ROWS, bool TWO_COLS>
struct Block {
  static void zero() {
    _tile_zero(0);
    if constexpr (TWO_COLS) _tile_zero(1);
    if constexpr (TWO_ROWS) _tile_zero(2);
    if constexpr (TWO_ROWS && TWO_COLS) _tile_zero(3);
  }
  static void load(const float* c) {
    _tile_loadd(0, c, 64);
    if constexpr (TWO_COLS) _tile_loadd(1, c + C_FLOATS, 64);
    if constexpr (TWO_ROWS) _tile_loadd(2, c + 2 * C_FLOATS, 64);
    if constexpr (TWO_ROWS && TWO_COLS) _tile_loadd(3, c + 3 * C_FLOATS, 64);
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
  static void store(float* c) {
    _tile_stored(0, c, 64);
    if constexpr (TWO_COLS) _tile_stored(1, c + C_FLOATS, 64);
    if constexpr (TWO_ROWS) _tile_stored(2, c + 2 * C_FLOATS, 64);
    if constexpr (TWO_ROWS && TWO_COLS) _tile_stored(3, c + 3 * C_FLOATS, 64);
  }
};

struct BlockFns {
  void (*zero)();
  void (*load)(const float*);
  void (*accumulate)(const uint8_t*, int64_t, const uint8_t*, int64_t);
  void (*store)(float*);
};

template <bool R, bool C>
constexpr BlockFns block_fns() {
  return {Block<R, C>::zero, Block<R, C>::load, Block<R, C>::accumulate, Block<R, C>::store};
}

// [has a second row tile][has a second column tile]
constexpr BlockFns BLOCKS[2][2] = {{block_fns<false, false>(), block_fns<false, true>()},
                                   {block_fns<true, false>(), block_fns<true, true>()}};

// The tile decode, codes to B-tile rows: a row holds 16 columns as bf16 pairs (w[2p, c],
// w[2p + 1, c]), weights w = s·q + o computed in fp32 and rounded once. The int4 decode starts
// from one broadcast of the row's 16 code bytes, in which 64-bit word i holds bytes 0–7 (i even)
// or 8–15 (i odd), and vpmultishiftqb moves bits only within a word: word i of a decode vector
// can hold column c only if c is in that half. So B tiles, and the C tiles they make, hold their
// columns in the order B_COLUMN, which write_rows undoes. (Natural order costs a vpermw per row
// and a widening per row pair: measured 15–30 % slower for the whole call.)
constexpr int B_COLUMN[16] = {0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15};

// Per-lane constants of the int4 decode's two fp32 vectors h = 0, 1 (B-row lanes 16h ..
// 16h + 15): lane L is row 2p + L % 2 of column B_COLUMN[8h + L / 2], its code the low (even L)
// or high nibble of that column's byte. `shift` is the vpmultishiftqb control that brings the
// nibble to bits 16–19 of the lane, `column` the permutation that spreads s and o to the lanes.
struct Int4Lanes {
  alignas(64) int32_t column[2][16];
  alignas(64) uint8_t shift[2][64];
};

constexpr Int4Lanes int4_lanes() {
  Int4Lanes t{};
  for (int h = 0; h < 2; ++h)
    for (int L = 0; L < 16; ++L) {
      const int c = B_COLUMN[8 * h + L / 2];
      t.column[h][L] = c;
      t.shift[h][4 * L + 2] = static_cast<uint8_t>(8 * (c % 8) + 4 * (L % 2));
    }
  return t;
}
constexpr Int4Lanes INT4_LANES = int4_lanes();

// Where y's column n is in a C tile, and the B-row lane order of the planes' decode: lane 2i
// takes row 2p of column B_COLUMN[i] from [w0 | w1] = cvtne2ps_pbh(w1, w0), lane 2i + 1 row 2p + 1.
struct ColumnOrder {
  alignas(64) int32_t c_of_y[16];
  alignas(64) uint16_t pair_lanes[32];
};

constexpr ColumnOrder column_order() {
  ColumnOrder t{};
  for (int i = 0; i < 16; ++i) {
    t.c_of_y[B_COLUMN[i]] = i;
    t.pair_lanes[2 * i] = static_cast<uint16_t>(B_COLUMN[i]);
    t.pair_lanes[2 * i + 1] = static_cast<uint16_t>(16 + B_COLUMN[i]);
  }
  return t;
}
constexpr ColumnOrder COLUMN_ORDER = column_order();

// Pairs p0 .. p0 + n − 1 of strip tile j (tile t of the layer), all in `group`, to B-tile rows
// 64 bytes apart from dst. w = s·q + o is computed as s·(128 + q) + (o − 128·s): 128 + q is the
// nibble in bits 16–19 ORed into the bits of 128.0f (no int-to-float conversion), and the fma
// rounds once.
TSQ_VBMI inline void decode_rows(const Problem& pr, const Int4Codes& codes, int64_t j, int64_t t,
                                 int64_t group, int64_t p0, int64_t n, uint8_t* dst) {
  const __m512 sv = _mm512_loadu_ps(pr.scale_at(0, group, t));
  const __m512 ov = _mm512_loadu_ps(pr.offset_at(group, t));
  const __m512 c128 = _mm512_set1_ps(128.f);
  __m512 s[2], o[2];
  __m512i shift[2];
  for (int h = 0; h < 2; ++h) {
    const __m512i col = _mm512_load_si512(INT4_LANES.column[h]);
    s[h] = _mm512_permutexvar_ps(col, sv);
    o[h] = _mm512_fnmadd_ps(c128, s[h], _mm512_permutexvar_ps(col, ov));
    shift[h] = _mm512_load_si512(INT4_LANES.shift[h]);
  }
  const __m512i nibble = _mm512_set1_epi32(0xF << 16), f128 = _mm512_set1_epi32(0x43000000);
  constexpr int AND_OR = 0xEA;  // ternary logic (a & b) | c
  for (int64_t r = 0; r < n; ++r) {
    const __m512i bytes = _mm512_broadcast_i32x4(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes.row(j, p0 + r))));
    __m512 w[2];
    for (int h = 0; h < 2; ++h) {
      const __m512i q = _mm512_multishift_epi64_epi8(shift[h], bytes);
      w[h] = _mm512_fmadd_ps(
          s[h], _mm512_castsi512_ps(_mm512_ternarylogic_epi32(q, nibble, f128, AND_OR)), o[h]);
    }
    _mm512_storeu_si512(dst + 64 * r, (__m512i)_mm512_cvtne2ps_pbh(w[1], w[0]));
  }
}

// The same for w = o + Σ_i s_i·β_i: row 2p takes the even bits of each word, 2p + 1 the odd.
TSQ_VBMI inline void decode_rows(const Problem& pr, const BitPlanes& codes, int64_t j, int64_t t,
                                 int64_t group, int64_t p0, int64_t n, uint8_t* dst) {
  __m512 sv[MAX_PLANES];
  for (int i = 0; i < pr.n_planes; ++i) sv[i] = _mm512_loadu_ps(pr.scale_at(i, group, t));
  const __m512 ov = _mm512_loadu_ps(pr.offset_at(group, t));
  const __m512i lanes = _mm512_load_si512(COLUMN_ORDER.pair_lanes);
  for (int64_t r = 0; r < n; ++r) {
    __m512 w0 = ov, w1 = ov;
    for (int i = 0; i < pr.n_planes; ++i) {
      const uint32_t m = codes.word(i, j, p0 + r);
      w0 = _mm512_mask_add_ps(w0, static_cast<__mmask16>(_pext_u32(m, 0x55555555u)), w0, sv[i]);
      w1 = _mm512_mask_add_ps(w1, static_cast<__mmask16>(_pext_u32(m, 0xAAAAAAAAu)), w1, sv[i]);
    }
    const __m512i bf = (__m512i)_mm512_cvtne2ps_pbh(w1, w0);
    _mm512_storeu_si512(dst + 64 * r, _mm512_permutexvar_epi16(lanes, bf));
  }
}

// B tiles of chunks [c0, c0 + n) of the strip's nt column tiles from tile t, into b
// [chunk − c0][STRIP][1 KiB]. A chunk's 16 pairs lie in one group when G is a multiple of 32;
// smaller groups split it into runs.
template <class Codes>
TSQ_VBMI void decode(const Problem& pr, const Codes& codes, int64_t t, int64_t nt, int64_t c0,
                     int64_t n, uint8_t* b) {
  const int64_t pairs = pr.G / 2, chunks = pr.K / CHUNK;
  constexpr int64_t AHEAD = 2 * PREFETCH_GROUPS;  // chunks: PREFETCH_GROUPS groups at G = 32
  for (int64_t c = c0; c < c0 + n; ++c)
    for (int64_t j = 0; j < nt; ++j) {
      if (c + AHEAD < chunks) prefetch(pr, codes, j, t + j, (c + AHEAD) * ROWS, ROWS);
      uint8_t* dst = b + ((c - c0) * STRIP + j) * TILE_BYTES;
      for (int64_t r = 0; r < ROWS;) {
        const int64_t p = c * ROWS + r, group = p / pairs;
        const int64_t run = std::min(ROWS - r, (group + 1) * pairs - p);
        decode_rows(pr, codes, j, t + j, group, p, run, dst + 64 * r);
        r += run;
      }
    }
}

// Rows [m0, m0 + rows) of the strip from the stored accumulators into y (bf16), the columns
// back from B_COLUMN order.
void write_rows(const Problem& pr, const float* acc, int64_t m0, int64_t rows, int64_t t,
                int64_t nt) {
  const __m512i order = _mm512_load_si512(COLUMN_ORDER.c_of_y);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < nt; ++j) {
      const float* c = acc + ((r / ROWS) * 2 + j) * C_FLOATS + (r % ROWS) * TILE;
      const __m512 row = _mm512_permutexvar_ps(order, _mm512_loadu_ps(c));
      const __m256bh v = _mm512_cvtneps_pbh(row);
      std::memcpy(pr.y + (m0 + r) * pr.n_pad() + TILE * (t + j), &v, sizeof v);
    }
}

// Few rows (one row pair): strip by strip, the decode runs a window of chunks ahead of the
// multiplies, so the B tiles stay in L1 and the accumulators in their tiles over all of K.
template <class Codes>
void short_strip(const Problem& pr, const Codes& codes, const uint8_t* xa, int64_t t, int64_t nt,
                 uint8_t* b, float* c) {
  const int64_t chunks = pr.K / CHUNK;
  const BlockFns& f = BLOCKS[pr.M > ROWS][nt == 2];
  f.zero();
  for (int64_t c0 = 0; c0 < chunks; c0 += WINDOW) {
    const int64_t n = std::min(WINDOW, chunks - c0);
    decode(pr, codes.at(t), t, nt, c0, n, b);
    f.accumulate(xa + c0 * TILE_BYTES, chunks * TILE_BYTES, b, n);
  }
  f.store(c);
  write_rows(pr, c, 0, pr.M, t, nt);
}

// More rows: a panel of nt ≤ PANEL tiles from tile t, K in blocks of K_BLOCK chunks. Per block
// the panel's B tiles are decoded (256 KiB) and every row pair runs over them strip by strip, its
// accumulators stored to c [row pair][strip][4 KiB] and reloaded for the next block (exact: the
// sums run in the order of one pass). x is read once per panel, not once per strip: decoding a
// whole strip (K·64 bytes) and passing every row pair over it measured 1.5× slower at K = 4096
// and 8960, M = 256–512 (about even at K = 1536), in a one-off comparison on one thread.
template <class Codes>
void panel(const Problem& pr, const Codes& codes, const uint8_t* xa, int64_t t, int64_t nt,
           uint8_t* b, float* c) {
  const int64_t chunks = pr.K / CHUNK, a_step = chunks * TILE_BYTES;
  const int64_t strips = (nt + STRIP - 1) / STRIP, row_pairs = (pr.M + 2 * ROWS - 1) / (2 * ROWS);
  const auto width = [&](int64_t s) { return std::min(STRIP, nt - s * STRIP); };
  const auto acc = [&](int64_t rp, int64_t s) { return c + (rp * strips + s) * 4 * C_FLOATS; };
  for (int64_t k0 = 0; k0 < chunks; k0 += K_BLOCK) {
    const int64_t kn = std::min(K_BLOCK, chunks - k0);
    for (int64_t s = 0; s < strips; ++s)
      decode(pr, codes.at(t + s * STRIP), t + s * STRIP, width(s), k0, kn,
             b + s * K_BLOCK * STRIP * TILE_BYTES);
    for (int64_t rp = 0; rp < row_pairs; ++rp) {
      const int64_t m0 = rp * 2 * ROWS;
      for (int64_t s = 0; s < strips; ++s) {
        const BlockFns& f = BLOCKS[m0 + ROWS < pr.M][width(s) == 2];
        if (k0 == 0)
          f.zero();
        else
          f.load(acc(rp, s));
        f.accumulate(xa + (m0 / ROWS) * a_step + k0 * TILE_BYTES, a_step,
                     b + s * K_BLOCK * STRIP * TILE_BYTES, kn);
        f.store(acc(rp, s));
      }
    }
  }
  for (int64_t rp = 0; rp < row_pairs; ++rp)
    for (int64_t s = 0; s < strips; ++s)
      write_rows(pr, acc(rp, s), rp * 2 * ROWS, std::min(pr.M - rp * 2 * ROWS, 2 * ROWS),
                 t + s * STRIP, width(s));
}

}  // namespace

// x in A-tile order, [row tile][chunk][16 rows][32 bf16] (zero rows past M): each A tile is
// 1 KiB of consecutive bytes. Loading tiles straight from x would read 16 rows 2K bytes apart,
// which for K a multiple of 2048 all fall into one L1 set.
std::vector<uint16_t> tile_rows(const Problem& pr) {
  const int64_t row_tiles = (pr.M + ROWS - 1) / ROWS, chunks = pr.K / CHUNK;
  std::vector<uint16_t> xa(static_cast<size_t>(row_tiles * ROWS * pr.K), 0);
  at::parallel_for(0, pr.M, ROWS, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t c = 0; c < chunks; ++c)
        std::memcpy(xa.data() + (((m / ROWS) * chunks + c) * ROWS + m % ROWS) * CHUNK,
                    pr.x + m * pr.K + c * CHUNK, CHUNK * sizeof(uint16_t));
  });
  return xa;
}

const char* amx_unavailable() {
  static const char* why = []() -> const char* {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 24)) || !(d & (1u << 22)))
      return "this CPU has no AMX-TILE/AMX-BF16 (cpuid leaf 7)";
    if (!(c & (1u << 1)))
      return "this CPU has no AVX512-VBMI (cpuid leaf 7), which the tile decodes use";
    // Linux hands out the tile state only on request, once per process (ARCH_REQ_XCOMP_PERM,
    // XFEATURE_XTILEDATA); without it the first tile instruction faults.
    constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0)
      return "the kernel refused the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM)";
    return nullptr;
  }();
  return why;
}

// Asked once, as amx_unavailable() is: every int8 call checks it.
const char* amx_int8_unavailable() {
  static const char* why = []() -> const char* {
    if (const char* amx = amx_unavailable()) return amx;
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 25)))
      return "this CPU has no AMX-INT8 (cpuid leaf 7)";
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
  const bool tall = pr.M > 2 * ROWS;
  const int64_t row_pairs = (pr.M + 2 * ROWS - 1) / (2 * ROWS);
  const size_t b_bytes = (tall ? PANEL * K_BLOCK : STRIP * WINDOW) * TILE_BYTES;
  const size_t c_floats = (tall ? row_pairs * PANEL / STRIP : 1) * 4 * C_FLOATS;
  // One row tile of 4-bit codes in whole-chunk groups: exact codes and fp32 scales instead,
  // which fold the offsets with x's group sums (computed here only for that variant).
  bool exact = false;
  if constexpr (std::is_same_v<Codes, Int4Codes>) exact = pr.M <= ROWS && pr.G % CHUNK == 0;
  const std::vector<float> xsum =
      exact ? group_sums(pr.x, pr.M, pr.n_blocks(), pr.G) : std::vector<float>();
  Problem with_sums = pr;
  with_sums.xsum = xsum.data();
  at::parallel_for(0, pr.T, STRIP, [&](int64_t t0, int64_t t1) {
    configure_tiles();
    if constexpr (std::is_same_v<Codes, Int4Codes>)
      if (exact) gemm_amx_exact(with_sums, codes, xa_bytes, t0, t1);
    if (!exact) {
      std::vector<uint8_t> b(b_bytes);
      std::vector<float> c(c_floats);
      if (tall)
        for (int64_t t = t0; t < t1; t += PANEL)
          panel(pr, codes, xa_bytes, t, std::min(PANEL, t1 - t), b.data(), c.data());
      else
        for (int64_t t = t0; t < t1; t += STRIP)
          short_strip(pr, codes, xa_bytes, t, std::min(STRIP, t1 - t), b.data(), c.data());
    }
    _tile_release();
  });
}

template void gemm_amx<Int4Codes>(const Problem&, const Int4Codes&);
template void gemm_amx<BitPlanes>(const Problem&, const BitPlanes&);

}  // namespace tsq

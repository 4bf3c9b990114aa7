// What the AMX tile paths share (cpu_gemm_amx.cpp: weights decoded to bf16, any batch;
// cpu_gemm_amx_exact.cpp: exact codes and fp32 scales, one row tile of x): tile shapes, the tile
// configuration, x in tile order.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <vector>

#include "cpu_gemm.h"

// The decodes use vpmultishiftqb (AVX512-VBMI, every CPU with AMX has it; amx_unavailable()
// checks); only the functions marked with this are compiled for it.
#define TSQ_VBMI __attribute__((target("avx512vbmi")))

namespace tsq {

constexpr int64_t ROWS = 16;          // rows of an A or C tile
constexpr int64_t CHUNK = 32;         // k per tile multiply: 16 bf16 pairs
constexpr int64_t TILE_BYTES = 1024;  // every tile: 16 rows × 64 bytes
constexpr int64_t STRIP = 2;          // column tiles per strip (C tiles 2 × 2)
constexpr int64_t C_FLOATS = TILE_BYTES / 4;  // fp32 values of a C tile

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

inline void configure_tiles() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = ROWS;
  }
  _tile_loadconfig(&cfg);
}

// x in A-tile order, [row tile][chunk][16 rows][32 bf16], zero rows past M (cpu_gemm_amx.cpp).
std::vector<uint16_t> tile_rows(const Problem& pr);

// One row tile of x (M ≤ 16) against tiles [t0, t1) of 4-bit codes, with G a multiple of CHUNK:
// the exact-scale path (cpu_gemm_amx_exact.cpp). The calling thread has configured its tiles;
// xa is tile_rows(pr), pr.xsum the group sums of x.
void gemm_amx_exact(const Problem& pr, const Int4Codes& codes, const uint8_t* xa, int64_t t0,
                    int64_t t1);

}  // namespace tsq

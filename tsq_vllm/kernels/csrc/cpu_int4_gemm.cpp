// y [M, N_pad] (bf16) = x [M, K] (bf16) · W, W[k, n] = s[b, n] · q[k, n] + o[b, n], b = k / G.
//
// The point of this kernel is the batch: every 16×2 tile of 4-bit codes is decoded to bf16 once
// and then used by up to MB_MAX rows of x (vdpbf16ps, fp32 accumulation), where aten's CPU int4
// kernel costs about linearly in M. Codes are summed unscaled per group and the group's scale and
// offset are applied once: Σ_k x_k (s q_k + o) = s Σ_k x_k q_k + o Σ_k x_k.
//
// Weight layout (kernels/cpu_native.py packs it): uint8 [N_pad/16, K/2, 16], byte [t, p, j] =
// q[2p, 16t + j] | q[2p + 1, 16t + j] << 4, so one 16-byte load decodes to the 32 bf16 lanes that
// vdpbf16ps pairs with a broadcast (x[2p], x[2p + 1]). Needs AVX-512 F/BW and AVX512_BF16; the
// Python side loads this only where torch reports avx512_bf16.
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int MB_MAX = 8;  // rows per register block: 2·MB_MAX accumulators + 3 live vectors

inline __m512i bf16_levels() {
  // The bf16 bit patterns of 0..15 (exact: small integers), the lookup table of the decode.
  alignas(64) uint16_t lut[32] = {};
  for (int v = 0; v < 16; ++v) {
    float f = static_cast<float>(v);
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof bits);
    lut[v] = static_cast<uint16_t>(bits >> 16);
  }
  return _mm512_load_si512(lut);
}

inline __m512i decode(const uint8_t* src, __m512i lut) {
  const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
  const __m512i lo = _mm512_and_si512(v, _mm512_set1_epi32(0x0F));
  const __m512i hi = _mm512_slli_epi32(_mm512_and_si512(v, _mm512_set1_epi32(0xF0)), 12);
  return _mm512_permutexvar_epi16(_mm512_or_si512(lo, hi), lut);
}

// MB rows of x against NT adjacent 16-column tiles. The MB·NT accumulators are independent
// chains (vdpbf16ps has a latency of several cycles: one chain alone would wait on itself), each
// decoded weight vector serves MB rows and each broadcast of x serves NT tiles.
template <int MB, int NT>
void block(const uint16_t* x, int64_t K, const uint8_t* w, const float* s, const float* o,
           int64_t ld_table, int64_t G, const float* xsum, int64_t n_blocks, uint16_t* y,
           int64_t ld_y) {
  const __m512i lut = bf16_levels();
  const int64_t tile_stride = (K / 2) * 16;
  __m512 out[MB][NT];
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < NT; ++j) out[m][j] = _mm512_setzero_ps();
  for (int64_t b = 0; b < n_blocks; ++b) {
    __m512 acc[MB][NT];
    for (int m = 0; m < MB; ++m)
      for (int j = 0; j < NT; ++j) acc[m][j] = _mm512_setzero_ps();
    const uint8_t* wb = w + b * (G / 2) * 16;
    const uint16_t* xb = x + b * G;
    for (int64_t p = 0; p < G / 2; ++p) {
      __m512i wv[NT];
      for (int j = 0; j < NT; ++j) wv[j] = decode(wb + j * tile_stride + p * 16, lut);
      for (int m = 0; m < MB; ++m) {
        int32_t pair;
        std::memcpy(&pair, xb + m * K + 2 * p, sizeof pair);
        const __m512i xv = _mm512_set1_epi32(pair);
        for (int j = 0; j < NT; ++j)
          acc[m][j] = _mm512_dpbf16_ps(acc[m][j], (__m512bh)xv, (__m512bh)wv[j]);
      }
    }
    for (int j = 0; j < NT; ++j) {
      const __m512 sv = _mm512_loadu_ps(s + b * ld_table + 16 * j);
      const __m512 ov = _mm512_loadu_ps(o + b * ld_table + 16 * j);
      for (int m = 0; m < MB; ++m) {
        out[m][j] = _mm512_fmadd_ps(sv, acc[m][j], out[m][j]);
        out[m][j] = _mm512_fmadd_ps(ov, _mm512_set1_ps(xsum[m * n_blocks + b]), out[m][j]);
      }
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < NT; ++j) {
      const __m256bh v = _mm512_cvtneps_pbh(out[m][j]);
      std::memcpy(y + m * ld_y + 16 * j, &v, sizeof v);
    }
}

using BlockFn = void (*)(const uint16_t*, int64_t, const uint8_t*, const float*, const float*,
                         int64_t, int64_t, const float*, int64_t, uint16_t*, int64_t);

// Tiles per block by rows: few rows need more tiles to have enough independent chains; MB·NT
// accumulators plus NT weight vectors stay within the 32 zmm registers.
constexpr int tiles_for(int mb) { return mb <= 2 ? 4 : 2; }

template <int NT>
constexpr BlockFn kBlocks[MB_MAX + 1] = {
    nullptr,        block<1, NT>, block<2, NT>, block<3, NT>, block<4, NT>,
    block<5, NT>,   block<6, NT>, block<7, NT>, block<8, NT>};

}  // namespace

at::Tensor int4_gemm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                     const at::Tensor& offset, int64_t group_size) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.is_contiguous(),
              "x must be a contiguous bf16 [M, K] tensor");
  TORCH_CHECK(w.dim() == 3 && w.scalar_type() == at::kByte && w.size(2) == 16 && w.is_contiguous(),
              "w must be a contiguous uint8 [N_pad/16, K/2, 16] tensor");
  const int64_t M = x.size(0), K = x.size(1), T = w.size(0), N_pad = 16 * T;
  const int64_t G = group_size, n_blocks = K / G;
  TORCH_CHECK(G > 0 && G % 2 == 0 && K % G == 0 && w.size(1) * 2 == K,
              "K, group_size and w do not match");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && offset.scalar_type() == at::kFloat &&
                  scale.is_contiguous() && offset.is_contiguous() &&
                  scale.sizes() == offset.sizes() && scale.size(0) == n_blocks &&
                  scale.size(1) == N_pad,
              "scale and offset must be contiguous fp32 [K/group_size, N_pad]");
  auto y = at::empty({M, N_pad}, x.options());
  if (M == 0) return y;
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  // Σ of each row's group of x in fp32 [M, n_blocks], the offset term's input; a loop here, not
  // three aten ops, because at M = 1 their dispatch would cost as much as the sums.
  std::vector<float> xsum(static_cast<size_t>(M * n_blocks));
  for (int64_t r = 0; r < M * n_blocks; ++r) {
    const uint16_t* src = xp + r * G;
    float acc = 0.f;
    for (int64_t k = 0; k < G; ++k) {
      const uint32_t bits = static_cast<uint32_t>(src[k]) << 16;
      float v;
      std::memcpy(&v, &bits, sizeof v);
      acc += v;
    }
    xsum[static_cast<size_t>(r)] = acc;
  }
  const auto* wp = w.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* op = offset.data_ptr<float>();
  const float* xs = xsum.data();
  auto* yp = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  // Threads split the column tiles; each walks its tiles in row blocks of MB_MAX (the last one
  // shorter), tiles_for(mb) tiles at a time, a remainder one tile at a time.
  at::parallel_for(0, T, 4, [&](int64_t t0, int64_t t1) {
    for (int64_t m0 = 0; m0 < M; m0 += MB_MAX) {
      const int mb = static_cast<int>(std::min<int64_t>(MB_MAX, M - m0));
      const int nt = tiles_for(mb);
      int64_t t = t0;
      for (; t + nt <= t1; t += nt) {
        const BlockFn f = nt == 4 ? kBlocks<4>[mb] : kBlocks<2>[mb];
        f(xp + m0 * K, K, wp + t * (K / 2) * 16, sp + 16 * t, op + 16 * t, N_pad, G,
          xs + m0 * n_blocks, n_blocks, yp + m0 * N_pad + 16 * t, N_pad);
      }
      for (; t < t1; ++t)
        kBlocks<1>[mb](xp + m0 * K, K, wp + t * (K / 2) * 16, sp + 16 * t, op + 16 * t, N_pad, G,
                       xs + m0 * n_blocks, n_blocks, yp + m0 * N_pad + 16 * t, N_pad);
    }
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int4_gemm", &int4_gemm, "x (bf16) · W (4-bit codes, per-group scale and offset)");
}

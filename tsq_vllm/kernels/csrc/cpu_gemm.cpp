// y [M, N_pad] (bf16) = x [M, K] (bf16) · W for two kinds of low-bit W, b = k / G:
//
//   int4_gemm   W[k, n] = s[b, n] · q[k, n] + o[b, n],              q ∈ [0, 16)   (GPTQ codes)
//   planes_gemm W[k, n] = Σ_i a[i, b, n] · β_i[k, n] + o[b, n],     β_i ∈ {0, 1}  (BCQ planes)
//
// (BCQ's signs are ±1: Σ α_i·(2β_i − 1) + c = Σ 2α_i·β_i + (c − Σ α_i), so a = 2α, o = c − Σ α.)
//
// The point of this kernel is the batch: every 16×2 tile of codes is decoded to bf16 once and
// then used by up to BLOCK_ROWS rows of x (vdpbf16ps, fp32 accumulation), where aten's CPU int4
// kernel costs about linearly in M. Codes are summed unscaled per group and plane, and the
// scales and the offset are applied once per group: Σ_k x_k (s q_k + o) = s Σ x q + o Σ x.
//
// Weight layouts (kernels/cpu_native.py packs them); one tile is 16 output columns:
//   int4   uint8 [N_pad/16, K/2, 16], byte [t, p, j] = q[2p, 16t + j] | q[2p + 1, 16t + j] << 4:
//          one 16-byte load decodes (vpermw on a 16-entry table) to the 32 bf16 lanes that
//          vdpbf16ps pairs with a broadcast (x[2p], x[2p + 1]).
//   planes int32 [k, N_pad/16, K/2], bit 2j + r of word [i, t, p] = β_i[2p + r, 16t + j]: one
//          32-bit load is the mask that selects 1.0 or 0 in the same 32 lanes (k bits per
//          weight in memory instead of 4).
//   tables fp32, tile-major: scale [planes, N_pad/16, K/G, 16], offset [N_pad/16, K/G, 16]
//          (element [t, b, j] is column 16t + j of group b; see Problem in cpu_gemm.h).
// Needs AVX-512 F/BW and AVX512_BF16; the Python side loads this only where torch reports
// avx512_bf16. On CPUs with AMX the caller's `amx` flag sends a call to the tile path instead
// (cpu_gemm_amx.cpp, cpu_gemm_amx_exact.cpp: the same layouts). `int4_gemm_int8` is the opt-in
// path that also quantizes x to int8 (AMX-INT8 tiles, or AVX512-VNNI in cpu_gemm_vnni.cpp).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <vector>

#include "cpu_gemm.h"

namespace tsq {
namespace {

// MB rows of x from row m0 against NT adjacent tiles from tile t, every group of every plane.
// The MB·NT accumulators are independent chains (vdpbf16ps has a latency of several cycles: one
// chain alone would wait on itself), each decoded weight vector serves MB rows and each
// broadcast of x serves NT tiles.
template <int MB, int NT, class Codes>
void block(const Problem& pr, const Codes& codes, int64_t m0, int64_t t) {
  const int64_t K = pr.K, n_blocks = pr.n_blocks(), pairs = pr.G / 2;
  const uint16_t* x = pr.x + m0 * K;
  const float* xsum = pr.xsum + m0 * n_blocks;
  __m512 out[MB][NT];
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < NT; ++j) out[m][j] = _mm512_setzero_ps();
  for (int64_t b = 0; b < n_blocks; ++b) {
    prefetch_ahead(pr, codes, t, NT, b);
    for (int i = 0; i < pr.n_planes; ++i) {
      __m512 acc[MB][NT];
      for (int m = 0; m < MB; ++m)
        for (int j = 0; j < NT; ++j) acc[m][j] = _mm512_setzero_ps();
      for (int64_t p = b * pairs; p < (b + 1) * pairs; ++p) {
        __m512i wv[NT];
        for (int j = 0; j < NT; ++j) wv[j] = codes.load(i, j, p);
        for (int m = 0; m < MB; ++m) {
          int32_t pair;
          std::memcpy(&pair, x + m * K + 2 * p, sizeof pair);
          const __m512i xv = _mm512_set1_epi32(pair);
          for (int j = 0; j < NT; ++j)
            acc[m][j] = _mm512_dpbf16_ps(acc[m][j], (__m512bh)xv, (__m512bh)wv[j]);
        }
      }
      for (int j = 0; j < NT; ++j) {
        const __m512 sv = _mm512_loadu_ps(pr.scale_at(i, b, t + j));
        for (int m = 0; m < MB; ++m) out[m][j] = _mm512_fmadd_ps(sv, acc[m][j], out[m][j]);
      }
    }
    for (int j = 0; j < NT; ++j) {
      const __m512 ov = _mm512_loadu_ps(pr.offset_at(b, t + j));
      for (int m = 0; m < MB; ++m)
        out[m][j] = _mm512_fmadd_ps(ov, _mm512_set1_ps(xsum[m * n_blocks + b]), out[m][j]);
    }
  }
  uint16_t* y = pr.y + m0 * pr.n_pad() + TILE * t;
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < NT; ++j) {
      const __m256bh v = _mm512_cvtneps_pbh(out[m][j]);
      std::memcpy(y + m * pr.n_pad() + TILE * j, &v, sizeof v);
    }
}

template <class Codes>
using BlockFn = void (*)(const Problem&, const Codes&, int64_t, int64_t);

template <int NT, class Codes>
constexpr BlockFn<Codes> kBlocks[BLOCK_ROWS + 1] = {
    nullptr,
    block<1, NT, Codes>,
    block<2, NT, Codes>,
    block<3, NT, Codes>,
    block<4, NT, Codes>,
    block<5, NT, Codes>,
    block<6, NT, Codes>,
    block<7, NT, Codes>,
    block<8, NT, Codes>};

void check_codes(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 3 && w.scalar_type() == at::kByte && w.size(2) == TILE && w.is_contiguous(),
              "w must be a contiguous uint8 [N_pad/16, K/2, 16] tensor");
}

void check_inputs(const at::Tensor& x, int64_t K, int64_t T, const at::Tensor& scale,
                  int64_t n_planes, const at::Tensor& offset, int64_t G) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.is_contiguous(),
              "x must be a contiguous bf16 [M, K] tensor");
  TORCH_CHECK(G > 0 && G % 2 == 0 && K % G == 0 && x.size(1) == K,
              "K, group_size and the weights do not match");
  TORCH_CHECK(offset.scalar_type() == at::kFloat && offset.is_contiguous() && offset.dim() == 3 &&
                  offset.size(0) == T && offset.size(1) == K / G && offset.size(2) == TILE,
              "offset must be contiguous fp32 [N_pad/16, K/group_size, 16]");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() &&
                  scale.numel() == n_planes * offset.numel(),
              "scale must be contiguous fp32 [planes, N_pad/16, K/group_size, 16]");
}

// The row blocks and strips of for_each_block (cpu_gemm.h).
template <class Codes>
void gemm_avx512(const Problem& pr, const Codes& codes) {
  for_each_block(pr.M, pr.T, [&](int64_t m0, int mb, int64_t t, int width) {
    const BlockFn<Codes> f = width == 4   ? kBlocks<4, Codes>[mb]
                             : width == 2 ? kBlocks<2, Codes>[mb]
                                          : kBlocks<1, Codes>[mb];
    f(pr, codes.at(t), m0, t);
  });
}

// y for either path; `amx` asks for the tile path (the caller checks amx_unavailable() and
// K % 32; a refusal here is a programming error, not a fallback).
template <class Codes>
at::Tensor gemm(const at::Tensor& x, const Codes& codes, int64_t T, const at::Tensor& scale,
                int n_planes, const at::Tensor& offset, int64_t G, bool amx) {
  const int64_t M = x.size(0), K = x.size(1);
  auto y = at::empty({M, TILE * T}, x.options());
  if (M == 0) return y;
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  Problem pr{xp, M, K, T, G, n_planes, scale.data_ptr<float>(), offset.data_ptr<float>(),
             nullptr, reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>())};
  if (amx) {
    const char* why = amx_unavailable();
    TORCH_CHECK(why == nullptr, "AMX path: ", why ? why : "");
    TORCH_CHECK(K % 32 == 0, "AMX path: K must be a multiple of 32, got ", K);
    gemm_amx(pr, codes);
  } else {
    const std::vector<float> xsum = group_sums(xp, M, K / G, G);
    pr.xsum = xsum.data();
    gemm_avx512(pr, codes);
  }
  return y;
}

}  // namespace

// A loop here, not three aten ops, because at M = 1 their dispatch would cost as much as the sums.
std::vector<float> group_sums(const uint16_t* x, int64_t M, int64_t n_blocks, int64_t G) {
  std::vector<float> xsum(static_cast<size_t>(M * n_blocks));
  for (int64_t r = 0; r < M * n_blocks; ++r) {
    const uint16_t* src = x + r * G;
    float acc = 0.f;
    for (int64_t k = 0; k < G; ++k) {
      const uint32_t bits = static_cast<uint32_t>(src[k]) << 16;
      float v;
      std::memcpy(&v, &bits, sizeof v);
      acc += v;
    }
    xsum[static_cast<size_t>(r)] = acc;
  }
  return xsum;
}

// Round to nearest even (the CPU's default rounding mode), as the spec does; 127/amax is one
// true fp32 division, as there. An all-zero group gets sx = 0, x8 = 0.
void quantize_rows(const Problem& pr, bool tile_order, std::vector<int8_t>& x8,
                   std::vector<float>& sx) {
  const int64_t nb = pr.n_blocks();
  TORCH_CHECK(!tile_order || pr.M <= INT8_ROWS, "tile order takes at most ", INT8_ROWS, " rows");
  TORCH_CHECK(pr.G % 16 == 0, "int8 rows: group_size must be a multiple of 16, got ", pr.G);
  x8.assign(static_cast<size_t>(tile_order ? pr.K * INT8_ROWS : pr.M * pr.K), 0);
  sx.assign(static_cast<size_t>(pr.M * nb), 0.f);
  for (int64_t m = 0; m < pr.M; ++m)
    for (int64_t g = 0; g < nb; ++g) {
      const uint16_t* src = pr.x + m * pr.K + g * pr.G;
      auto load = [&](int64_t k) {
        const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + k));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
      };
      __m512 amax = _mm512_setzero_ps();
      for (int64_t k = 0; k < pr.G; k += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(load(k)));
      const float mx = _mm512_reduce_max_ps(amax);
      const __m512 inv = _mm512_set1_ps(mx > 0.f ? 127.f / mx : 0.f);
      sx[static_cast<size_t>(m * nb + g)] = mx / 127.f;
      for (int64_t k = 0; k < pr.G; k += 16) {
        const int64_t kk = g * pr.G + k;  // column of x
        const int64_t at = tile_order
                               ? ((kk / INT8_CHUNK) * INT8_ROWS + m) * INT8_CHUNK + kk % INT8_CHUNK
                               : m * pr.K + kk;
        const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(load(k), inv));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(x8.data() + at), _mm512_cvtsepi32_epi8(q));
      }
    }
}

}  // namespace tsq

using tsq::TILE;

at::Tensor int4_gemm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                     const at::Tensor& offset, int64_t group_size, bool amx) {
  tsq::check_codes(w);
  const int64_t K = 2 * w.size(1), T = w.size(0);
  tsq::check_inputs(x, K, T, scale, 1, offset, group_size);
  return tsq::gemm(x, tsq::Int4Codes(w.data_ptr<uint8_t>(), K), T, scale, 1, offset, group_size,
                   amx);
}

at::Tensor planes_gemm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                       const at::Tensor& offset, int64_t group_size, bool amx) {
  TORCH_CHECK(w.dim() == 3 && w.scalar_type() == at::kInt && w.size(0) >= 1 && w.is_contiguous(),
              "w must be a contiguous int32 [planes, N_pad/16, K/2] tensor");
  const int64_t n_planes = w.size(0), T = w.size(1), K = 2 * w.size(2);
  tsq::check_inputs(x, K, T, scale, n_planes, offset, group_size);
  const tsq::BitPlanes codes{reinterpret_cast<const uint32_t*>(w.data_ptr<int32_t>()), K / 2,
                             T * K / 2};
  return tsq::gemm(x, codes, T, scale, static_cast<int>(n_planes), offset, group_size, amx);
}

// y with x quantized to int8 per row and group: an opt-in, other numerics. `amx`: on AMX-INT8
// tiles, else on AVX512-VNNI dot products (the same sums; the caller checks which can run).
at::Tensor int4_gemm_int8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                          const at::Tensor& offset, int64_t group_size, bool amx) {
  tsq::check_codes(w);
  const int64_t K = 2 * w.size(1), T = w.size(0), M = x.size(0);
  tsq::check_inputs(x, K, T, scale, 1, offset, group_size);
  const char* why = amx ? tsq::amx_int8_unavailable() : tsq::vnni_unavailable();
  TORCH_CHECK(why == nullptr, amx ? "int8 tile path: " : "int8 VNNI path: ", why ? why : "");
  auto y = at::empty({M, TILE * T}, x.options());
  if (M == 0) return y;
  tsq::Problem pr{reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()), M, K, T,
                  group_size, 1, scale.data_ptr<float>(), offset.data_ptr<float>(), nullptr,
                  reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>())};
  const tsq::Int4Codes codes(w.data_ptr<uint8_t>(), K);
  if (amx)
    tsq::gemm_amx_int8(pr, codes);
  else
    tsq::gemm_vnni_int8(pr, codes);
  return y;
}

// "" when the AMX path can run in this process (asking Linux for the tile state on first call).
std::string amx_unavailable_reason() {
  const char* why = tsq::amx_unavailable();
  return why ? why : "";
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int4_gemm", &int4_gemm, "x (bf16) · W (4-bit codes, per-group scale and offset)");
  m.def("planes_gemm", &planes_gemm, "x (bf16) · W (bit planes, per-group scales and offset)");
  m.def("amx_unavailable_reason", &amx_unavailable_reason, "why the AMX path cannot run here");
  m.def("int4_gemm_int8", &int4_gemm_int8, "int8(x) · W (4-bit codes), on tiles or VNNI");
  m.def("amx_int8_unavailable_reason", []() -> std::string {
    const char* why = tsq::amx_int8_unavailable();
    return why ? why : "";
  }, "why the int8 tile path cannot run here");
  m.def("vnni_unavailable_reason", []() -> std::string {
    const char* why = tsq::vnni_unavailable();
    return why ? why : "";
  }, "why the int8 VNNI path cannot run here");
}

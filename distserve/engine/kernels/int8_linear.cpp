// int8-weight linear layer for CPUs with AVX2 or AVX-512 VNNI (fp32 in and out).
//
// Weight layout ("blocked", what the runner's int8 file stores): output channels in blocks of 16,
//   codes  [N/16, K, 16] int8        codes[b, k, j] is the code of W[16b + j, k]
//   scale  [N/16, K/32, 16] fp32, offset the same shape, per group of 32 inputs:
//   W[16b + j, k] = codes[b, k, j] * scale[b, k / 32, j] + offset[b, k / 32, j]
// (N is padded to a multiple of 16 with zero rows; `n_out` says how many are real.)
//
// y[M, n_out] = residual + prologue(x) . W^T + bias, where prologue is one of
//   none        x as is                                      x: [M, K]
//   rms_norm    x * rsqrt(mean(x^2) + eps) * norm_weight     (the pre-norm of a Llama block)
//   silu_mul    silu(x[:, :K]) * x[:, K:]                    x: [M, 2K] (the gated MLP product)
// and residual / bias are optional.
//
// Arithmetic: the prologue's output is quantised to int16 per (row, group of 32): scale = absmax /
// 32767, so the activations keep 15 bits where int8 would keep 7 (int8 activations cost too much
// agreement with fp32; int16 ones none, on the quality benchmark). vpmaddwd multiplies 16 int16 pairs
// per instruction (AVX2: 1.65x the multiply-adds per cycle of fp32 FMA on a Zen 2-class EPYC;
// AVX-512 VNNI: vpdpwssd multiplies 32 pairs and accumulates in one, ~1.35x fp32 FMA on a Zen 4-class
// EPYC, whose fp32 GEMM is strong too), int32 sums per group
// (at most 16 * 2 * 32767 * 128 < 2^31) are scaled by the weight and activation scales in fp32, the
// offsets enter through the group sums of the activations.
//
// The codes are read where they lie (e.g. a read-only memory map shared by several processes): no
// private copy. For each block of 16 channels and chunk of inputs, the codes are widened once into
// an int16 tile (L1), pairs of inputs interleaved, and every row of x runs against it: 4 rows x 16
// channels per step, one 32-bit broadcast of two activations per row, two vpmaddwd per row (AVX2),
// or 8 rows per step and one vpdpwssd per row on a zmm holding the pair for all 16 channels (VNNI).
// Which one is compiled follows -march=native on the machine that builds the kernel.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/utils/pybind.h>  // not torch/extension.h: the whole C++ frontend doubled the compile

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define DS_AVX2 1
#endif
#if defined(__AVX512F__) && defined(__AVX512VNNI__)
#define DS_VNNI512 1
#endif
#include "vec.h"

namespace {

using namespace dsvec;

constexpr int64_t NB = 16;     // output channels per block
constexpr int64_t GROUP = 32;  // inputs per weight group and per activation scale
constexpr int64_t PREFETCH_BLOCKS = 4;  // how far ahead the weight stream is asked for
constexpr int64_t KC = 512;    // inputs per widened tile (16 KB of int16)
#if defined(__AVX512F__) && defined(__AVX512VNNI__)
constexpr int MR = 8;          // rows of x per micro-kernel call (32 zmm registers)
#else
constexpr int MR = 4;          // rows of x per micro-kernel call
#endif

enum Prologue : int64_t { NONE = 0, RMS_NORM = 1, SILU_MUL = 2 };

struct Activations {
  std::vector<int16_t> q;   // [M, K] codes
  std::vector<float> scale; // [M, G] per (row, group)
  std::vector<float> sum;   // [M, G] sum of the group's dequantised values
};

// The prologue and the activation quantiser run on W-lane vectors (vec.h): per row, the RMS scale or
// the SiLU-gate product, then per group of 32 the absmax, the int16 codes (rounded to nearest even, as
// nearbyint) and their sum.
static_assert(GROUP % W == 0, "a group is whole vectors");

inline vf silu(vf v) { return v / (1.f + vexp(-v)); }

// prologue(x) row by row, then int16 per (row, group).
void quantize_rows(const float* x, int64_t M, int64_t K, int64_t kind, const float* g, double eps, Activations& a) {
  const int64_t G = K / GROUP;
  a.q.resize(M * K);
  a.scale.resize(M * G);
  a.sum.resize(M * G);
  at::parallel_for(0, M, 4, [&](int64_t m0, int64_t m1) {
    std::vector<float> row(K);
    for (int64_t m = m0; m < m1; ++m) {
      if (kind == RMS_NORM) {
        const float* r = x + m * K;
        vf ss{};
        for (int64_t k = 0; k < K; k += W) {
          const vf v = load(r + k);
          ss += v * v;
        }
        const float inv = 1.f / std::sqrt(hsum(ss) / float(K) + float(eps));
        for (int64_t k = 0; k < K; k += W) store(row.data() + k, load(g + k) * (load(r + k) * inv));
      } else if (kind == SILU_MUL) {
        const float* r = x + m * 2 * K;
        for (int64_t k = 0; k < K; k += W) store(row.data() + k, silu(load(r + k)) * load(r + K + k));
      } else {
        std::memcpy(row.data(), x + m * K, K * sizeof(float));
      }
      for (int64_t gi = 0; gi < G; ++gi) {
        const float* v = row.data() + gi * GROUP;
        vf amax{};
        for (int64_t k = 0; k < GROUP; k += W) amax = vmax(amax, vabs(load(v + k)));
        const float mx = hmax(amax);
        const float sc = mx > 0.f ? mx / 32767.f : 1.f;
        const float inv = 1.f / sc;
        vf total{};
        int16_t* q = a.q.data() + m * K + gi * GROUP;
        for (int64_t k = 0; k < GROUP; k += W) {
          const vi c = round_int(load(v + k) * inv);  // |c| <= 32767: the absmax maps to 32767
          const vs c16 = __builtin_convertvector(c, vs);
          std::memcpy(q + k, &c16, sizeof c16);
          total += __builtin_convertvector(c, vf);  // exact: at most 32 * 32767 < 2^24
        }
        a.scale[m * G + gi] = sc;
        a.sum[m * G + gi] = hsum(total) * sc;
      }
    }
  });
}

// Asks for `bytes` from `p` on into the cache (L2), one line at a time: decode steps find the weights
// in memory, not in cache, and the kernel would otherwise wait on every line of a block it widens.
inline void prefetch(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off, 0, 2);
}

// tile[p][j][2] = codes of W[16b + j, k0 + 2p + {0, 1}] as int16, for the pairs of [k0, k0 + kn).
inline void widen(int16_t* tile, const int8_t* codes, int64_t k0, int64_t kn) {
  for (int64_t p = 0; p < kn / 2; ++p) {
    const int8_t* c0 = codes + (k0 + 2 * p) * NB;
#ifdef DS_AVX2
    const __m128i r0 = _mm_loadu_si128((const __m128i*)c0), r1 = _mm_loadu_si128((const __m128i*)(c0 + NB));
    _mm256_storeu_si256((__m256i*)(tile + p * 32), _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(r0, r1)));
    _mm256_storeu_si256((__m256i*)(tile + p * 32 + 16), _mm256_cvtepi8_epi16(_mm_unpackhi_epi8(r0, r1)));
#else
    for (int64_t j = 0; j < NB; ++j) {
      tile[p * 32 + 2 * j] = c0[j];
      tile[p * 32 + 2 * j + 1] = c0[NB + j];
    }
#endif
  }
}

// out[r][0..16) (+)= rows r of the activations over the groups of [k0, k0 + kn), against the tile.
template <int R>
inline void micro(const int16_t* tile, const Activations& a, int64_t m0, int64_t K, int64_t k0, int64_t kn,
                  const float* scale, const float* offset, float* out, bool accumulate) {
  const int64_t G = K / GROUP;
#if defined(DS_VNNI512)
  // one zmm holds a pair of inputs for all 16 channels; vpdpwssd multiplies and accumulates in one
  __m512 facc[R];
  for (int r = 0; r < R; ++r) facc[r] = accumulate ? _mm512_loadu_ps(out + r * NB) : _mm512_setzero_ps();
  for (int64_t kg = 0; kg < kn; kg += GROUP) {
    const int64_t gi = (k0 + kg) / GROUP;
    __m512i iacc[R];
    for (int r = 0; r < R; ++r) iacc[r] = _mm512_setzero_si512();
    const int16_t* t = tile + kg * NB;
    const int16_t* xq = a.q.data() + m0 * K + k0 + kg;
#pragma GCC unroll 4
    for (int64_t p = 0; p < GROUP / 2; ++p) {
      const __m512i w = _mm512_loadu_si512((const void*)(t + p * 32));
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        int32_t pair;
        std::memcpy(&pair, xq + r * K + 2 * p, 4);
        iacc[r] = _mm512_dpwssd_epi32(iacc[r], w, _mm512_set1_epi32(pair));
      }
    }
    const __m512 s = _mm512_loadu_ps(scale + gi * NB), z = _mm512_loadu_ps(offset + gi * NB);
    for (int r = 0; r < R; ++r) {
      const __m512 xs = _mm512_set1_ps(a.scale[(m0 + r) * G + gi]);
      const __m512 xsum = _mm512_set1_ps(a.sum[(m0 + r) * G + gi]);
      facc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[r]), _mm512_mul_ps(s, xs), _mm512_fmadd_ps(z, xsum, facc[r]));
    }
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(out + r * NB, facc[r]);
#elif defined(DS_AVX2)
  __m256 facc[R][2];
  for (int r = 0; r < R; ++r) {
    facc[r][0] = accumulate ? _mm256_loadu_ps(out + r * NB) : _mm256_setzero_ps();
    facc[r][1] = accumulate ? _mm256_loadu_ps(out + r * NB + 8) : _mm256_setzero_ps();
  }
  for (int64_t kg = 0; kg < kn; kg += GROUP) {
    const int64_t gi = (k0 + kg) / GROUP;
    __m256i iacc[R][2];
    for (int r = 0; r < R; ++r) iacc[r][0] = iacc[r][1] = _mm256_setzero_si256();
    const int16_t* t = tile + kg * NB;
    const int16_t* xq = a.q.data() + m0 * K + k0 + kg;
#pragma GCC unroll 2
    for (int64_t p = 0; p < GROUP / 2; ++p) {
      const __m256i w0 = _mm256_loadu_si256((const __m256i*)(t + p * 32));
      const __m256i w1 = _mm256_loadu_si256((const __m256i*)(t + p * 32 + 16));
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        int32_t pair;
        std::memcpy(&pair, xq + r * K + 2 * p, 4);
        const __m256i xb = _mm256_set1_epi32(pair);
        iacc[r][0] = _mm256_add_epi32(iacc[r][0], _mm256_madd_epi16(w0, xb));
        iacc[r][1] = _mm256_add_epi32(iacc[r][1], _mm256_madd_epi16(w1, xb));
      }
    }
    const __m256 s0 = _mm256_loadu_ps(scale + gi * NB), s1 = _mm256_loadu_ps(scale + gi * NB + 8);
    const __m256 z0 = _mm256_loadu_ps(offset + gi * NB), z1 = _mm256_loadu_ps(offset + gi * NB + 8);
    for (int r = 0; r < R; ++r) {
      const __m256 xs = _mm256_set1_ps(a.scale[(m0 + r) * G + gi]);
      const __m256 xsum = _mm256_set1_ps(a.sum[(m0 + r) * G + gi]);
      facc[r][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc[r][0]), _mm256_mul_ps(s0, xs), _mm256_fmadd_ps(z0, xsum, facc[r][0]));
      facc[r][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc[r][1]), _mm256_mul_ps(s1, xs), _mm256_fmadd_ps(z1, xsum, facc[r][1]));
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(out + r * NB, facc[r][0]);
    _mm256_storeu_ps(out + r * NB + 8, facc[r][1]);
  }
#else
  for (int r = 0; r < R; ++r)
    for (int64_t j = 0; j < NB; ++j) {
      float acc = accumulate ? out[r * NB + j] : 0.f;
      for (int64_t kg = 0; kg < kn; kg += GROUP) {
        const int64_t gi = (k0 + kg) / GROUP;
        int64_t isum = 0;
        for (int64_t k = kg; k < kg + GROUP; ++k)
          isum += int64_t(tile[(k / 2) * 32 + 2 * j + (k % 2)]) * a.q[(m0 + r) * K + k0 + k];
        acc += float(isum) * scale[gi * NB + j] * a.scale[(m0 + r) * G + gi] + offset[gi * NB + j] * a.sum[(m0 + r) * G + gi];
      }
      out[r * NB + j] = acc;
    }
#endif
}

inline void micro_any(int rows, const int16_t* tile, const Activations& a, int64_t m0, int64_t K, int64_t k0, int64_t kn,
                      const float* s, const float* z, float* out, bool acc) {
  switch (rows) {
#ifdef DS_VNNI512
    case 8: micro<8>(tile, a, m0, K, k0, kn, s, z, out, acc); break;
    case 7: micro<7>(tile, a, m0, K, k0, kn, s, z, out, acc); break;
    case 6: micro<6>(tile, a, m0, K, k0, kn, s, z, out, acc); break;
    case 5: micro<5>(tile, a, m0, K, k0, kn, s, z, out, acc); break;
#endif
    case 4: micro<4>(tile, a, m0, K, k0, kn, s, z, out, acc); break;
    case 3: micro<3>(tile, a, m0, K, k0, kn, s, z, out, acc); break;
    case 2: micro<2>(tile, a, m0, K, k0, kn, s, z, out, acc); break;
    default: micro<1>(tile, a, m0, K, k0, kn, s, z, out, acc); break;
  }
}

void check(const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& offset) {
  TORCH_CHECK(codes.dim() == 3 && codes.size(2) == NB && codes.scalar_type() == at::kChar && codes.is_contiguous(),
              "codes: contiguous int8 [N/16, K, 16]");
  TORCH_CHECK(scale.dim() == 3 && scale.scalar_type() == at::kFloat && offset.scalar_type() == at::kFloat &&
                  scale.is_contiguous() && offset.is_contiguous() && scale.sizes() == offset.sizes() &&
                  scale.size(0) == codes.size(0) && scale.size(2) == NB && codes.size(1) == scale.size(1) * GROUP,
              "scale and offset: contiguous fp32 [N/16, K/32, 16]");
}

// dst[k] = W[16b + j, k] for one row (j) of a block.
inline void widen_row(float* dst, const int8_t* codes, const float* scale, const float* offset, int64_t K, int64_t j) {
  for (int64_t k = 0; k < K; ++k) {
    const int64_t gi = k / GROUP;
    dst[k] = float(codes[k * NB + j]) * scale[gi * NB + j] + offset[gi * NB + j];
  }
}

}  // namespace

at::Tensor int8_linear(at::Tensor x, at::Tensor codes, at::Tensor scale, at::Tensor offset, int64_t n_out,
                          std::optional<at::Tensor> bias, int64_t kind, std::optional<at::Tensor> norm_weight,
                          double eps, std::optional<at::Tensor> residual) {
  check(codes, scale, offset);
  const int64_t blocks = codes.size(0), K = codes.size(1), G = scale.size(1), Npad = blocks * NB;
  TORCH_CHECK(n_out > Npad - NB && n_out <= Npad, "n_out does not match the blocks");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x: fp32 [M, K]");
  TORCH_CHECK(kind == NONE || kind == RMS_NORM || kind == SILU_MUL, "unknown prologue");
  TORCH_CHECK(x.size(1) == (kind == SILU_MUL ? 2 * K : K), "x has the wrong width for this weight");
  x = x.contiguous();
  const int64_t M = x.size(0);
  auto y = at::empty({M, n_out}, x.options());
  if (M == 0) return y;
  const float* b = nullptr;
  at::Tensor bt, rt, gt;
  if (bias.has_value() && bias->defined()) {
    bt = bias->contiguous();
    TORCH_CHECK(bt.scalar_type() == at::kFloat && bt.numel() == n_out, "bias: fp32 [n_out]");
    b = bt.data_ptr<float>();
  }
  const float* res = nullptr;
  if (residual.has_value() && residual->defined()) {
    rt = residual->contiguous();
    TORCH_CHECK(rt.scalar_type() == at::kFloat && rt.dim() == 2 && rt.size(0) == M && rt.size(1) == n_out, "residual: fp32 [M, n_out]");
    res = rt.data_ptr<float>();
  }
  const float* g = nullptr;
  if (kind == RMS_NORM) {
    TORCH_CHECK(norm_weight.has_value() && norm_weight->numel() == K, "rms_norm needs a norm weight of K floats");
    gt = norm_weight->contiguous().to(at::kFloat);
    g = gt.data_ptr<float>();
  }
  Activations act;
  quantize_rows(x.data_ptr<float>(), M, K, kind, g, eps, act);

  const int8_t* cp = codes.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* zp = offset.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<int16_t> tile(KC * NB);
    std::vector<float> out(M * NB);  // this block's outputs, every row
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int8_t* c = cp + blk * K * NB;
      const float* s = sp + blk * G * NB;
      const float* z = zp + blk * G * NB;
      for (int64_t ahead = blk == b0 ? 1 : PREFETCH_BLOCKS; ahead <= PREFETCH_BLOCKS && blk + ahead < b1; ++ahead) {
        // the codes and scales of the blocks ahead on their way while this one computes
        prefetch(c + ahead * K * NB, K * NB);
        prefetch(s + ahead * G * NB, G * NB * sizeof(float));
        prefetch(z + ahead * G * NB, G * NB * sizeof(float));
      }
      for (int64_t k0 = 0; k0 < K; k0 += KC) {
        const int64_t kn = std::min(KC, K - k0);
        widen(tile.data(), c, k0, kn);
        for (int64_t m0 = 0; m0 < M; m0 += MR)
          micro_any(int(std::min<int64_t>(MR, M - m0)), tile.data(), act, m0, K, k0, kn, s, z, out.data() + m0 * NB, k0 > 0);
      }
      const int64_t n0 = blk * NB, nn = std::min(NB, n_out - n0);
      for (int64_t m = 0; m < M; ++m) {
        float* dst = yp + m * n_out + n0;
        const float* src = out.data() + m * NB;
        const float* rr = res ? res + m * n_out + n0 : nullptr;
        for (int64_t j = 0; j < nn; ++j) dst[j] = src[j] + (b ? b[n0 + j] : 0.f) + (rr ? rr[j] : 0.f);
      }
    }
  });
  return y;
}

// The fp32 weight [n_out, K] (for large batches, where a tuned fp32 GEMM on a transient copy wins).
at::Tensor int8_dequantize(at::Tensor codes, at::Tensor scale, at::Tensor offset, int64_t n_out) {
  check(codes, scale, offset);
  const int64_t K = codes.size(1), G = scale.size(1);
  auto w = at::empty({n_out, K}, scale.options());
  const int8_t* cp = codes.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* zp = offset.data_ptr<float>();
  float* wp = w.data_ptr<float>();
  at::parallel_for(0, n_out, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t blk = n / NB;
      widen_row(wp + n * K, cp + blk * K * NB, sp + blk * G * NB, zp + blk * G * NB, K, n % NB);
    }
  });
  return w;
}

// Rows `ids` of an int8 table in the blocked layout, as fp32 [T, K].
at::Tensor int8_embedding(at::Tensor ids, at::Tensor codes, at::Tensor scale, at::Tensor offset, int64_t n_out) {
  check(codes, scale, offset);
  TORCH_CHECK(ids.scalar_type() == at::kLong, "ids: int64");
  ids = ids.contiguous();
  const int64_t T = ids.numel(), K = codes.size(1), G = scale.size(1);
  auto out = at::empty({T, K}, scale.options());
  const int64_t* ip = ids.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) TORCH_CHECK(ip[t] >= 0 && ip[t] < n_out, "token id out of range");
  const int8_t* cp = codes.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* zp = offset.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t) {
    const int64_t blk = ip[t] / NB;
    widen_row(op + t * K, cp + blk * K * NB, sp + blk * G * NB, zp + blk * G * NB, K, ip[t] % NB);
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int8_linear", &int8_linear, "residual + prologue(x) . W^T + bias, W as blocked int8 codes with per-group scale/offset",
        py::arg("x"), py::arg("codes"), py::arg("scale"), py::arg("offset"), py::arg("n_out"), py::arg("bias") = py::none(),
        py::arg("prologue") = 0, py::arg("norm_weight") = py::none(), py::arg("eps") = 1e-6, py::arg("residual") = py::none());
  m.def("int8_dequantize", &int8_dequantize, "the fp32 weight [n_out, K] of blocked int8 codes");
  m.def("int8_embedding", &int8_embedding, "fp32 rows of a blocked int8 table");
}

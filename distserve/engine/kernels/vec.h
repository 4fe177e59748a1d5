// W-lane fp32 vectors for the CPU kernels: one zmm with AVX-512, one ymm with AVX2, else 16 bytes of
// whatever the compiler makes of GCC's vector extension. Which one a build gets follows the flags it is
// compiled with (-march=native on the machine that runs it). Everything here is header-only.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace dsvec {

#if defined(__AVX512F__)
constexpr int W = 16;
#elif defined(__AVX2__)
constexpr int W = 8;
#else
constexpr int W = 4;
#endif
typedef float vf __attribute__((vector_size(W * 4)));
typedef int32_t vi __attribute__((vector_size(W * 4)));
typedef int16_t vs __attribute__((vector_size(W * 2)));
typedef int8_t vb __attribute__((vector_size(W)));

inline vf load(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }

// W int8 values widened to fp32
inline vf load(const int8_t* p) {
#if defined(__AVX512F__)
  return (vf)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
#elif defined(__AVX2__)
  return (vf)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
#else
  vb b;
  std::memcpy(&b, p, sizeof b);
  return __builtin_convertvector(b, vf);
#endif
}

inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline vf splat(float x) { return vf{} + x; }
inline vf vmax(vf a, vf b) { return a > b ? a : b; }
inline vf vabs(vf a) { return (vf)((vi)a & 0x7fffffff); }

inline float hsum(vf v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps((__m512)v);
#elif defined(__AVX2__)
  __m128 lo = _mm256_castps256_ps128((__m256)v), hi = _mm256_extractf128_ps((__m256)v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
#else
  float s = 0.f;
  for (int i = 0; i < W; ++i) s += v[i];
  return s;
#endif
}

inline float hmax(vf v) {
  float m = v[0];
  for (int i = 1; i < W; ++i) m = std::max(m, v[i]);
  return m;
}

// to the nearest integer, ties to even (the current rounding mode), as nearbyint does
inline vi round_int(vf v) {
#if defined(__AVX512F__)
  return (vi)_mm512_cvtps_epi32((__m512)v);
#elif defined(__AVX2__)
  return (vi)_mm256_cvtps_epi32((__m256)v);
#else
  vi r;
  for (int i = 0; i < W; ++i) r[i] = int32_t(std::nearbyint(v[i]));
  return r;
#endif
}

// exp(x), Cephes' expf: x = n ln2 + r with |r| <= ln2 / 2, a degree-7 polynomial for exp(r) and 2^n
// through the exponent bits; relative error ~1e-7. Inputs are clamped to [-87, 88], where fp32
// neither overflows nor goes subnormal.
inline vf vexp(vf x) {
  x = x < -87.f ? splat(-87.f) : x;
  x = x > 88.f ? splat(88.f) : x;
  const vi n = round_int(x * 1.44269504088896341f);
  const vf nf = __builtin_convertvector(n, vf);
  const vf r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  return p * (vf)((n + 127) << 23);  // n in [-126, 127]: a normal power of two
}

}  // namespace dsvec

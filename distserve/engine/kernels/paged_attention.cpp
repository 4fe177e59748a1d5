// Decode attention straight from the paged KV cache (CPU, fp32).
//
// For each (sequence, KV head) pair: read the sequence's K and V once through its block table, score
// all G query heads of that group against them, softmax, and accumulate V. No gather copy of the
// cache and no repeat of KV heads. Work is split over (sequence, KV head) pairs with at::parallel_for.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

static inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_hadd_ps(lo, lo);
  lo = _mm_hadd_ps(lo, lo);
  return _mm_cvtss_f32(lo);
}

static inline float dot(const float* a, const float* b, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  float s = hsum(_mm256_add_ps(acc0, acc1));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

static inline void axpy(float* y, float p, const float* x, int64_t n) {
  const __m256 pv = _mm256_set1_ps(p);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(pv, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += p * x[i];
}
#else
static inline float dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

static inline void axpy(float* y, float p, const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += p * x[i];
}
#endif

void paged_decode_attention(torch::Tensor out, torch::Tensor q, torch::Tensor kcache,
                            torch::Tensor vcache, torch::Tensor block_tables, torch::Tensor lens,
                            int64_t block_size, double scale) {
  TORCH_CHECK(q.is_contiguous() && out.is_contiguous(), "q and out must be contiguous");
  TORCH_CHECK(kcache.stride(2) == 1 && vcache.stride(2) == 1, "cache rows must be contiguous");
  TORCH_CHECK(q.scalar_type() == at::kFloat && kcache.scalar_type() == at::kFloat, "fp32 only");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t KH = kcache.size(0), G = H / KH;
  const int64_t maxblocks = block_tables.size(1);
  const int64_t ks = kcache.stride(0), kr = kcache.stride(1);
  const int64_t vs = vcache.stride(0), vr = vcache.stride(1);
  const float* qp = q.data_ptr<float>();
  const float* kp = kcache.data_ptr<float>();
  const float* vp = vcache.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t* bt = block_tables.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  const float sc = static_cast<float>(scale);

  at::parallel_for(0, B * KH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<float> acc;
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t b = idx / KH, kh = idx % KH;
      const int64_t L = lp[b];
      scores.resize(G * L);
      acc.assign(G * D, 0.f);
      const float* qb = qp + (b * H + kh * G) * D;
      const int64_t* table = bt + b * maxblocks;
      for (int64_t t = 0; t < L; ++t) {
        const int64_t slot = table[t / block_size] * block_size + t % block_size;
        const float* kt = kp + kh * ks + slot * kr;
        for (int64_t g = 0; g < G; ++g) scores[g * L + t] = dot(qb + g * D, kt, D) * sc;
      }
      for (int64_t g = 0; g < G; ++g) {
        float* row = scores.data() + g * L;
        const float m = *std::max_element(row, row + L);
        float sum = 0.f;
        for (int64_t t = 0; t < L; ++t) {
          row[t] = std::exp(row[t] - m);
          sum += row[t];
        }
        const float inv = 1.f / sum;
        for (int64_t t = 0; t < L; ++t) row[t] *= inv;
      }
      for (int64_t t = 0; t < L; ++t) {
        const int64_t slot = table[t / block_size] * block_size + t % block_size;
        const float* vt = vp + kh * vs + slot * vr;
        for (int64_t g = 0; g < G; ++g) axpy(acc.data() + g * D, scores[g * L + t], vt, D);
      }
      float* ob = op + (b * H + kh * G) * D;
      std::copy(acc.begin(), acc.end(), ob);
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention over a paged KV cache");
}

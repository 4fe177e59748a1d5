// Decode attention straight from the paged KV cache (CPU; fp32 cache, or int8 with per-block scales).
//
// For each (sequence, KV head) pair: read the sequence's K and V once through its block table, score
// all G query heads of that group against them, softmax, and accumulate V. No gather copy of the
// cache and no repeat of KV heads. Work is split over (sequence, KV head) pairs with at::parallel_for.
//
// int8 cache: every (layer, K|V, KV head, block) has one fp32 scale, value = q * scale. A K row is
// widened to fp32 once and scored against the G query heads; the V scale folds into the softmax weight.
// `kv_write_int8` quantises new K/V rows into their slots: a block's scale only grows (to the absmax of
// what it holds / 127); when it grows, the rows already in the block are requantised to the new scale;
// a block whose first slot is written in this call starts afresh (it was just allocated).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <utility>
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

// Decode attention of one (sequence, kv head) for its G query heads qb[G, D] over L cached tokens:
// scores, softmax, weighted sum of V into ob[G, D]. `key(t, buf)` / `value(t, buf)` give token t's row
// as fp32 (a pointer into the cache, or `buf` after widening) and the factor it is scaled by, so the
// fp32 and int8 caches share this loop.
template <class Key, class Value>
static void attend(const float* qb, int64_t G, int64_t D, int64_t L, float sc, Key key, Value value,
                   std::vector<float>& scores, std::vector<float>& acc, std::vector<float>& buf, float* ob) {
  scores.resize(G * L);
  acc.assign(G * D, 0.f);
  buf.resize(D);
  for (int64_t t = 0; t < L; ++t) {
    const auto [kt, f] = key(t, buf.data());
    for (int64_t g = 0; g < G; ++g) scores[g * L + t] = dot(qb + g * D, kt, D) * (f * sc);
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
    const auto [vt, f] = value(t, buf.data());
    for (int64_t g = 0; g < G; ++g) axpy(acc.data() + g * D, scores[g * L + t] * f, vt, D);
  }
  std::copy(acc.begin(), acc.end(), ob);
}

// Every (sequence, kv head) in parallel: `rows(kh, table)` gives the (key, value) row loaders of that
// head over that sequence's block table, and `attend` does the rest.
template <class Rows>
static void decode_attention(torch::Tensor& out, const torch::Tensor& q, const torch::Tensor& block_tables,
                             const torch::Tensor& lens, int64_t KH, double scale, Rows rows) {
  TORCH_CHECK(q.is_contiguous() && out.is_contiguous(), "q and out must be contiguous");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), G = H / KH;
  const int64_t maxblocks = block_tables.size(1);
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t* bt = block_tables.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, B * KH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, acc, buf;
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t b = idx / KH, kh = idx % KH;
      const auto [key, value] = rows(kh, bt + b * maxblocks);
      attend(qp + (b * H + kh * G) * D, G, D, lp[b], sc, key, value, scores, acc, buf, op + (b * H + kh * G) * D);
    }
  });
}

void paged_decode_attention(torch::Tensor out, torch::Tensor q, torch::Tensor kcache,
                            torch::Tensor vcache, torch::Tensor block_tables, torch::Tensor lens,
                            int64_t block_size, double scale) {
  TORCH_CHECK(kcache.stride(2) == 1 && vcache.stride(2) == 1, "cache rows must be contiguous");
  TORCH_CHECK(q.scalar_type() == at::kFloat && kcache.scalar_type() == at::kFloat, "fp32 only");
  const int64_t ks = kcache.stride(0), kr = kcache.stride(1);
  const int64_t vs = vcache.stride(0), vr = vcache.stride(1);
  const float* kp = kcache.data_ptr<float>();
  const float* vp = vcache.data_ptr<float>();
  decode_attention(out, q, block_tables, lens, kcache.size(0), scale, [=](int64_t kh, const int64_t* table) {
    auto slot = [=](int64_t t) { return table[t / block_size] * block_size + t % block_size; };
    auto key = [=](int64_t t, float*) { return std::pair<const float*, float>(kp + kh * ks + slot(t) * kr, 1.f); };
    auto value = [=](int64_t t, float*) { return std::pair<const float*, float>(vp + kh * vs + slot(t) * vr, 1.f); };
    return std::make_pair(key, value);
  });
}

static inline void widen_i8(float* dst, const int8_t* src, int64_t n) {
  int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(src + i)))));
#endif
  for (; i < n; ++i) dst[i] = float(src[i]);
}

void paged_decode_attention_int8(torch::Tensor out, torch::Tensor q, torch::Tensor kcache, torch::Tensor vcache,
                                 torch::Tensor kscale, torch::Tensor vscale, torch::Tensor block_tables,
                                 torch::Tensor lens, int64_t block_size, double scale) {
  TORCH_CHECK(kcache.stride(2) == 1 && vcache.stride(2) == 1, "cache rows must be contiguous");
  TORCH_CHECK(q.scalar_type() == at::kFloat && kcache.scalar_type() == at::kChar && vcache.scalar_type() == at::kChar,
              "fp32 queries and an int8 cache expected");
  TORCH_CHECK(kscale.stride(1) == 1 && vscale.stride(1) == 1 && kscale.scalar_type() == at::kFloat, "fp32 scales [KH, blocks]");
  const int64_t D = q.size(2);
  const int64_t ks = kcache.stride(0), kr = kcache.stride(1);
  const int64_t vs = vcache.stride(0), vr = vcache.stride(1);
  const int64_t kss = kscale.stride(0), vss = vscale.stride(0);
  const int8_t* kp = kcache.data_ptr<int8_t>();
  const int8_t* vp = vcache.data_ptr<int8_t>();
  const float* ksp = kscale.data_ptr<float>();
  const float* vsp = vscale.data_ptr<float>();
  decode_attention(out, q, block_tables, lens, kcache.size(0), scale, [=](int64_t kh, const int64_t* table) {
    // int8 rows are widened into the caller's buffer and scaled by their block's scale
    auto row = [=](const int8_t* cache, int64_t stride, int64_t rstride, const float* scales, int64_t sstride,
                   int64_t t, float* dst) {
      const int64_t blk = table[t / block_size];
      widen_i8(dst, cache + kh * stride + (blk * block_size + t % block_size) * rstride, D);
      return std::pair<const float*, float>(dst, scales[kh * sstride + blk]);
    };
    auto key = [=](int64_t t, float* dst) { return row(kp, ks, kr, ksp, kss, t, dst); };
    auto value = [=](int64_t t, float* dst) { return row(vp, vs, vr, vsp, vss, t, dst); };
    return std::make_pair(key, value);
  });
}

// cache [KH, slots, D] int8, scales [KH, blocks] fp32, src [n, KH, D] fp32, slots [n] int64.
static void write_int8(torch::Tensor cache, torch::Tensor scales, const torch::Tensor& src, const int64_t* slots,
                       const std::vector<int64_t>& order, const std::vector<int64_t>& group_start, int64_t block_size) {
  const int64_t n = src.size(0), KH = src.size(1), D = src.size(2);
  const int64_t cs = cache.stride(0), cr = cache.stride(1), ss = scales.stride(0);
  TORCH_CHECK(cache.stride(2) == 1 && scales.stride(1) == 1, "cache rows and scales must be contiguous");
  int8_t* cp = cache.data_ptr<int8_t>();
  float* sp = scales.data_ptr<float>();
  const float* xp = src.data_ptr<float>();
  const int64_t groups = int64_t(group_start.size()) - 1;
  at::parallel_for(0, KH, 1, [&](int64_t h0, int64_t h1) {
    for (int64_t h = h0; h < h1; ++h) {
      for (int64_t gi = 0; gi < groups; ++gi) {
        const int64_t blk = slots[order[group_start[gi]]] / block_size;
        bool fresh = false;
        float need = 0.f;
        for (int64_t j = group_start[gi]; j < group_start[gi + 1]; ++j) {
          const int64_t i = order[j];
          fresh |= slots[i] % block_size == 0;
          const float* x = xp + (i * KH + h) * D;
          for (int64_t d = 0; d < D; ++d) need = std::max(need, std::fabs(x[d]));
        }
        need /= 127.f;
        float& s = sp[h * ss + blk];
        const float old = fresh ? 0.f : s;
        const float now = std::max(old, need);
        int8_t* base = cp + h * cs + blk * block_size * cr;
        if (old > 0.f && now > old) {  // requantise what the block already holds
          const float f = old / now;
          for (int64_t r = 0; r < block_size; ++r)
            for (int64_t d = 0; d < D; ++d) {
              int8_t& v = base[r * cr + d];
              v = int8_t(std::nearbyint(float(v) * f));
            }
        }
        s = now;
        const float inv = now > 0.f ? 1.f / now : 0.f;
        for (int64_t j = group_start[gi]; j < group_start[gi + 1]; ++j) {
          const int64_t i = order[j];
          const float* x = xp + (i * KH + h) * D;
          int8_t* dst = cp + h * cs + slots[i] * cr;
          for (int64_t d = 0; d < D; ++d) dst[d] = int8_t(std::clamp(int(std::nearbyint(x[d] * inv)), -127, 127));
        }
      }
    }
  });
}

void kv_write_int8(torch::Tensor kcache, torch::Tensor vcache, torch::Tensor kscale, torch::Tensor vscale,
                   torch::Tensor slots, torch::Tensor k, torch::Tensor v, int64_t block_size) {
  TORCH_CHECK(kcache.scalar_type() == at::kChar && vcache.scalar_type() == at::kChar, "int8 cache expected");
  TORCH_CHECK(k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat, "fp32 K/V expected");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous(), "int64 slots expected");
  k = k.contiguous();
  v = v.contiguous();
  const int64_t n = slots.numel();
  const int64_t* sl = slots.data_ptr<int64_t>();
  // Group the new rows by block (stable, so rows of one block keep their order).
  std::vector<int64_t> order(n);
  for (int64_t i = 0; i < n; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return sl[a] / block_size < sl[b] / block_size; });
  std::vector<int64_t> group_start;
  for (int64_t j = 0; j < n; ++j)
    if (j == 0 || sl[order[j]] / block_size != sl[order[j - 1]] / block_size) group_start.push_back(j);
  group_start.push_back(n);
  write_int8(kcache, kscale, k, sl, order, group_start, block_size);
  write_int8(vcache, vscale, v, sl, order, group_start, block_size);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention over a paged KV cache");
  m.def("paged_decode_attention_int8", &paged_decode_attention_int8, "decode attention over an int8 paged KV cache");
  m.def("kv_write_int8", &kv_write_int8, "quantise new K/V rows into an int8 paged cache with per-block scales");
}

// Decode attention straight from the paged KV cache (CPU; fp32 cache, or int8 with per-block scales).
//
// For each (sequence, KV head) pair: read the sequence's K and V once through its block table, score
// all G query heads of that group against them, softmax, and accumulate V. No gather copy of the
// cache and no repeat of KV heads. Work is split over (sequence, KV head) pairs with at::parallel_for.
// The loops are written on W-lane vectors (AVX-512: 16, AVX2: 8, as -march=native finds them) and
// specialised per head size, so a K row, a query head's outputs and a block's V rows sit in registers;
// the softmax exponentials are vectorised (Cephes' expf polynomial).
//
// int8 cache: every (layer, K|V, KV head, block) has one fp32 scale, value = q * scale. K rows are
// widened to fp32 in registers and the K scale folds into the scores; a block's V rows are widened
// once into an L1 tile that every query head of the group reads, and the V scale folds into the
// softmax weights.
// `kv_write_int8` quantises new K/V rows into their slots: a block's scale only grows (to the absmax of
// what it holds / 127); when it grows, the rows already in the block are requantised to the new scale;
// a block whose first slot is written in this call starts afresh (it was just allocated).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/utils/pybind.h>  // not torch/extension.h: the whole C++ frontend doubled the compile

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "vec.h"

namespace {

using namespace dsvec;

// One block of a sequence's cache for one KV head: its first K and V rows (fp32 or int8 codes), the
// distance between rows, and the factor the codes are scaled by (1 for fp32).
template <class T>
struct Block {
  const T* k;
  const T* v;
  int64_t stride;
  float kscale, vscale;
};

// Decode attention of one (sequence, kv head) for its G queries qb[G, D] (D = NC * W) over L cached
// tokens: scores, softmax, weighted sum of V into ob[G, D]. `block(j)` gives the j-th block. Query g
// sees the first Lq[g] <= L tokens (Lq null: all L): a speculating sequence's rows each see the
// context up to themselves, and all of them are served by one pass over its K and V.
// Scores: each K row is loaded (and widened) once into registers and dotted with the G queries.
// Sums: per block, each query keeps its D outputs in registers while the block's V rows (widened
// once per block for int8) stream past.
template <int NC, class T, class Blocks>
void attend(const float* qb, int64_t G, int64_t L, const int64_t* Lq, int64_t bs, float sc, Blocks block,
            std::vector<float>& scores, std::vector<float>& vtile, std::vector<float>& acc, std::vector<float>& inv,
            float* ob) {
  constexpr int64_t D = NC * W;
  scores.resize(G * L);
  acc.assign(G * D, 0.f);
  vtile.resize(bs * D);
  for (int64_t j = 0, t0 = 0; t0 < L; ++j, t0 += bs) {
    const Block<T> B = block(j);
    const int64_t n = std::min(bs, L - t0);
    const float f = B.kscale * sc;
    for (int64_t r = 0; r < n; ++r) {
      vf k[NC];
      for (int c = 0; c < NC; ++c) k[c] = load(B.k + r * B.stride + c * W);
      for (int64_t g = 0; g < G; ++g) {
        const float* q = qb + g * D;
        vf s = load(q) * k[0];
        for (int c = 1; c < NC; ++c) s += load(q + c * W) * k[c];
        scores[g * L + t0 + r] = hsum(s) * f;
      }
    }
  }
  inv.resize(G);
  for (int64_t g = 0; g < G; ++g) {
    float* row = scores.data() + g * L;
    const int64_t Lg = Lq ? Lq[g] : L;
    const float m = *std::max_element(row, row + Lg);
    vf vsum{};
    int64_t t = 0;
    for (; t + W <= Lg; t += W) {
      const vf e = vexp(load(row + t) - m);
      store(row + t, e);
      vsum += e;
    }
    float sum = hsum(vsum);
    for (; t < Lg; ++t) {
      row[t] = std::exp(row[t] - m);
      sum += row[t];
    }
    inv[g] = 1.f / sum;
  }
  for (int64_t j = 0, t0 = 0; t0 < L; ++j, t0 += bs) {
    const Block<T> B = block(j);
    const int64_t n = std::min(bs, L - t0);
    const float* v;
    int64_t vstride;
    if constexpr (std::is_same_v<T, float>) {
      v = B.v;
      vstride = B.stride;
    } else {
      for (int64_t r = 0; r < n; ++r)
        for (int c = 0; c < NC; ++c) store(vtile.data() + r * D + c * W, load(B.v + r * B.stride + c * W));
      v = vtile.data();
      vstride = D;
    }
    for (int64_t g = 0; g < G; ++g) {
      const float* p = scores.data() + g * L + t0;
      const int64_t ng = Lq ? std::min(n, Lq[g] - t0) : n;  // this query's tokens in the block
      if (ng <= 0) continue;
      vf a[NC];
      for (int c = 0; c < NC; ++c) a[c] = load(acc.data() + g * D + c * W);
      for (int64_t r = 0; r < ng; ++r) {
        const vf pr = splat(p[r] * B.vscale);
        for (int c = 0; c < NC; ++c) a[c] += pr * load(v + r * vstride + c * W);
      }
      for (int c = 0; c < NC; ++c) store(acc.data() + g * D + c * W, a[c]);
    }
  }
  for (int64_t g = 0; g < G; ++g)
    for (int64_t d = 0; d < D; ++d) ob[g * D + d] = acc[g * D + d] * inv[g];
}

// The head sizes the kernel is built for: D = NC * W for these NC.
template <class F>
bool with_chunks(int64_t D, F f) {
  if (D % W) return false;
  switch (D / W) {
    case 1: f(std::integral_constant<int, 1>{}); return true;
    case 2: f(std::integral_constant<int, 2>{}); return true;
    case 3: f(std::integral_constant<int, 3>{}); return true;
    case 4: f(std::integral_constant<int, 4>{}); return true;
    case 5: f(std::integral_constant<int, 5>{}); return true;
    case 6: f(std::integral_constant<int, 6>{}); return true;
    case 8: f(std::integral_constant<int, 8>{}); return true;
    case 16: f(std::integral_constant<int, 16>{}); return true;
    default: return false;
  }
}

// Every (sequence, kv head) in parallel: `blocks(kh, table)` gives the block loader of that head over
// that sequence's block table, and `attend` does the rest. `groups` (int64 [S + 1], or empty: one row
// per sequence) gives the first row of each sequence: the rows of one sequence (its last token and its
// speculative drafts, at consecutive positions, sharing the first row's block table) are attended
// together, their G query heads each as one query of the group, so its K and V are read once.
template <class T, class Blocks>
void decode_attention(at::Tensor& out, const at::Tensor& q, const at::Tensor& block_tables,
                      const at::Tensor& lens, const at::Tensor& groups, int64_t KH, int64_t block_size,
                      double scale, Blocks blocks) {
  TORCH_CHECK(q.is_contiguous() && out.is_contiguous(), "q and out must be contiguous");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && lens.scalar_type() == at::kLong &&
                  block_tables.is_contiguous() && lens.is_contiguous(), "int64 block tables and lengths expected");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), G = H / KH;
  const int64_t maxblocks = block_tables.size(1);
  const bool grouped = groups.numel() > 0;
  TORCH_CHECK(!grouped || (groups.scalar_type() == at::kLong && groups.is_contiguous()), "int64 row groups expected");
  const int64_t S = grouped ? groups.numel() - 1 : B;
  const int64_t* gp = grouped ? groups.data_ptr<int64_t>() : nullptr;
  const int64_t* lp = lens.data_ptr<int64_t>();
  if (grouped) {
    TORCH_CHECK(gp[0] == 0 && gp[S] == B, "row groups must start at 0 and end at the row count");
    for (int64_t s = 0; s < S; ++s) {
      TORCH_CHECK(gp[s + 1] > gp[s], "empty row group");
      for (int64_t r = gp[s] + 1; r < gp[s + 1]; ++r) TORCH_CHECK(lp[r] == lp[r - 1] + 1, "a group's rows must be consecutive positions");
    }
  }
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t* bt = block_tables.data_ptr<int64_t>();
  const float sc = static_cast<float>(scale);
  const bool ok = with_chunks(D, [&](auto nc) {
    at::parallel_for(0, S * KH, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scores, vtile, acc, inv, qtile, otile;  // scratch, reused over this thread's pairs
      std::vector<int64_t> lq;
      for (int64_t idx = begin; idx < end; ++idx) {
        const int64_t s = idx / KH, kh = idx % KH;
        const int64_t r0 = grouped ? gp[s] : s, nr = grouped ? gp[s + 1] - gp[s] : 1;
        if (nr == 1) {
          attend<decltype(nc)::value, T>(qp + (r0 * H + kh * G) * D, G, lp[r0], nullptr, block_size, sc,
                                         blocks(kh, bt + r0 * maxblocks), scores, vtile, acc, inv, op + (r0 * H + kh * G) * D);
          continue;
        }
        qtile.resize(nr * G * D);
        otile.resize(nr * G * D);
        lq.resize(nr * G);
        for (int64_t r = 0; r < nr; ++r) {
          std::memcpy(qtile.data() + r * G * D, qp + ((r0 + r) * H + kh * G) * D, G * D * sizeof(float));
          for (int64_t g = 0; g < G; ++g) lq[r * G + g] = lp[r0 + r];
        }
        attend<decltype(nc)::value, T>(qtile.data(), nr * G, lp[r0 + nr - 1], lq.data(), block_size, sc,
                                       blocks(kh, bt + r0 * maxblocks), scores, vtile, acc, inv, otile.data());
        for (int64_t r = 0; r < nr; ++r)
          std::memcpy(op + ((r0 + r) * H + kh * G) * D, otile.data() + r * G * D, G * D * sizeof(float));
      }
    });
  });
  TORCH_CHECK(ok, "head_dim ", D, " is not supported by the native kernel (see supports_head_dim)");
}

}  // namespace

bool supports_head_dim(int64_t D) {
  return with_chunks(D, [](auto) {});
}

void paged_decode_attention(at::Tensor out, at::Tensor q, at::Tensor kcache,
                            at::Tensor vcache, at::Tensor block_tables, at::Tensor lens,
                            at::Tensor groups, int64_t block_size, double scale) {
  TORCH_CHECK(kcache.stride(2) == 1 && vcache.stride(2) == 1 && kcache.stride(1) == vcache.stride(1),
              "cache rows must be contiguous");
  TORCH_CHECK(q.scalar_type() == at::kFloat && kcache.scalar_type() == at::kFloat, "fp32 only");
  const int64_t ks = kcache.stride(0), vs = vcache.stride(0), r = kcache.stride(1);
  const float* kp = kcache.data_ptr<float>();
  const float* vp = vcache.data_ptr<float>();
  decode_attention<float>(out, q, block_tables, lens, groups, kcache.size(0), block_size, scale, [=](int64_t kh, const int64_t* table) {
    return [=](int64_t j) {
      const int64_t row = table[j] * block_size * r;
      return Block<float>{kp + kh * ks + row, vp + kh * vs + row, r, 1.f, 1.f};
    };
  });
}

void paged_decode_attention_int8(at::Tensor out, at::Tensor q, at::Tensor kcache, at::Tensor vcache,
                                 at::Tensor kscale, at::Tensor vscale, at::Tensor block_tables,
                                 at::Tensor lens, at::Tensor groups, int64_t block_size, double scale) {
  TORCH_CHECK(kcache.stride(2) == 1 && vcache.stride(2) == 1 && kcache.stride(1) == vcache.stride(1),
              "cache rows must be contiguous");
  TORCH_CHECK(q.scalar_type() == at::kFloat && kcache.scalar_type() == at::kChar && vcache.scalar_type() == at::kChar,
              "fp32 queries and an int8 cache expected");
  TORCH_CHECK(kscale.stride(1) == 1 && vscale.stride(1) == 1 && kscale.scalar_type() == at::kFloat, "fp32 scales [KH, blocks]");
  const int64_t ks = kcache.stride(0), vs = vcache.stride(0), r = kcache.stride(1);
  const int64_t kss = kscale.stride(0), vss = vscale.stride(0);
  const int8_t* kp = kcache.data_ptr<int8_t>();
  const int8_t* vp = vcache.data_ptr<int8_t>();
  const float* ksp = kscale.data_ptr<float>();
  const float* vsp = vscale.data_ptr<float>();
  decode_attention<int8_t>(out, q, block_tables, lens, groups, kcache.size(0), block_size, scale, [=](int64_t kh, const int64_t* table) {
    return [=](int64_t j) {
      const int64_t blk = table[j], row = blk * block_size * r;
      return Block<int8_t>{kp + kh * ks + row, vp + kh * vs + row, r, ksp[kh * kss + blk], vsp[kh * vss + blk]};
    };
  });
}

// Rotary embedding of the new tokens' queries and keys, in place in the QKV projection's output, and
// (fp32 cache) their K and V rows stored into their cache slots: one pass instead of a dozen tensor
// ops per layer. qkv [n, (H + 2 KH) * D] fp32 holds each token's H query heads, then KH key heads,
// then KH value heads; cos / sin [max_len, D] are the rotary tables (the rotate-half convention:
// x' = x * cos + rotate_half(x) * sin, rotate_half(x) = (-x[D/2:], x[:D/2])).
// kcache / vcache [KH, slots, D] fp32, or undefined to rotate only (an int8 cache quantises on write).
void rope_kv_write(at::Tensor qkv, int64_t H, int64_t KH, at::Tensor cos, at::Tensor sin,
                   at::Tensor positions, std::optional<at::Tensor> kcache, std::optional<at::Tensor> vcache,
                   std::optional<at::Tensor> slots_arg) {
  TORCH_CHECK(qkv.dim() == 2 && qkv.is_contiguous() && qkv.scalar_type() == at::kFloat, "qkv: contiguous fp32 [n, (H + 2KH) * D]");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.scalar_type() == at::kFloat && sin.sizes() == cos.sizes(),
              "cos, sin: contiguous fp32 [max_len, D]");
  const int64_t n = qkv.size(0), D = cos.size(1), half = D / 2, width = qkv.size(1);
  TORCH_CHECK(width == (H + 2 * KH) * D && D % 2 == 0, "qkv width does not match the heads");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous() && positions.numel() == n, "int64 positions [n]");
  const bool store = kcache.has_value() && kcache->defined();
  float* kc = nullptr;
  float* vc = nullptr;
  int64_t ks = 0, vs = 0, kr = 0, vr = 0;
  if (store) {
    TORCH_CHECK(vcache.has_value() && vcache->defined(), "kcache and vcache go together");
    TORCH_CHECK(kcache->scalar_type() == at::kFloat && vcache->scalar_type() == at::kFloat && kcache->stride(2) == 1 &&
                    vcache->stride(2) == 1 && kcache->size(2) == D && kcache->size(0) == KH, "fp32 cache [KH, slots, D]");
    TORCH_CHECK(slots_arg.has_value() && slots_arg->scalar_type() == at::kLong && slots_arg->is_contiguous() &&
                    slots_arg->numel() == n, "int64 slots [n]");
    kc = kcache->data_ptr<float>();
    vc = vcache->data_ptr<float>();
    ks = kcache->stride(0), kr = kcache->stride(1), vs = vcache->stride(0), vr = vcache->stride(1);
  }
  const int64_t max_len = cos.size(0), nslots = store ? kcache->size(1) : 0;
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* sl = store ? slots_arg->data_ptr<int64_t>() : nullptr;
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(pos[i] >= 0 && pos[i] < max_len, "position out of the rotary table");
    TORCH_CHECK(!store || (sl[i] >= 0 && sl[i] < nslots), "slot out of the cache");
  }
  float* x = qkv.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  at::parallel_for(0, n, 16, [&](int64_t i0, int64_t i1) {
    std::vector<float> tmp(D);
    for (int64_t i = i0; i < i1; ++i) {
      const float* c = cp + pos[i] * D;
      const float* s = sp + pos[i] * D;
      float* row = x + i * width;
      for (int64_t h = 0; h < H + KH; ++h) {  // query heads, then key heads
        float* v = row + h * D;
        for (int64_t d = 0; d < half; ++d) {
          tmp[d] = v[d] * c[d] - v[d + half] * s[d];
          tmp[d + half] = v[d + half] * c[d + half] + v[d] * s[d + half];
        }
        std::copy(tmp.begin(), tmp.end(), v);
      }
      if (store)
        for (int64_t h = 0; h < KH; ++h) {
          std::copy(row + (H + h) * D, row + (H + h + 1) * D, kc + h * ks + sl[i] * kr);
          std::copy(row + (H + KH + h) * D, row + (H + KH + h + 1) * D, vc + h * vs + sl[i] * vr);
        }
    }
  });
}

// cache [KH, slots, D] int8, scales [KH, blocks] fp32, src [n, KH, D] fp32, slots [n] int64.
static void write_int8(at::Tensor cache, at::Tensor scales, const at::Tensor& src, const int64_t* slots,
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

void kv_write_int8(at::Tensor kcache, at::Tensor vcache, at::Tensor kscale, at::Tensor vscale,
                   at::Tensor slots, at::Tensor k, at::Tensor v, int64_t block_size) {
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

// The fp32 decoder layer's glue between its linears, one pass each instead of a handful of tensor ops
// (at batch 16 those ops took 15% of an fp32 decode step). add_rms_norm: h += x in place (x may be
// undefined), then rms_norm(h) * w into a new tensor, as the Llama norms compute it (mean of squares,
// 1 / sqrt(. + eps), times the row, times the weight). silu_mul: silu(gu[:, :m]) * gu[:, m:].
at::Tensor add_rms_norm(at::Tensor h, std::optional<at::Tensor> x, at::Tensor w, double eps) {
  TORCH_CHECK(h.dim() == 2 && h.is_contiguous() && h.scalar_type() == at::kFloat, "h: contiguous fp32 [n, K]");
  const int64_t n = h.size(0), K = h.size(1);
  TORCH_CHECK(w.is_contiguous() && w.scalar_type() == at::kFloat && w.numel() == K, "w: contiguous fp32 [K]");
  const bool add = x.has_value() && x->defined();
  at::Tensor xt;
  if (add) {
    xt = x->contiguous();
    TORCH_CHECK(xt.scalar_type() == at::kFloat && xt.sizes() == h.sizes(), "x: fp32, the shape of h");
  }
  auto y = at::empty({n, K}, h.options());
  float* hp = h.data_ptr<float>();
  const float* xp = add ? xt.data_ptr<float>() : nullptr;
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t Kv = K - K % W;
  at::parallel_for(0, n, 8, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      float* r = hp + i * K;
      vf ss{};
      for (int64_t k = 0; k < Kv; k += W) {
        vf v = load(r + k);
        if (add) store(r + k, v = v + load(xp + i * K + k));
        ss += v * v;
      }
      float tail = 0.f;
      for (int64_t k = Kv; k < K; ++k) {
        if (add) r[k] += xp[i * K + k];
        tail += r[k] * r[k];
      }
      const float inv = 1.f / std::sqrt((hsum(ss) + tail) / float(K) + float(eps));
      float* o = yp + i * K;
      for (int64_t k = 0; k < Kv; k += W) store(o + k, load(wp + k) * (load(r + k) * inv));
      for (int64_t k = Kv; k < K; ++k) o[k] = wp[k] * (r[k] * inv);
    }
  });
  return y;
}

at::Tensor silu_mul(at::Tensor gu) {
  TORCH_CHECK(gu.dim() == 2 && gu.is_contiguous() && gu.scalar_type() == at::kFloat && gu.size(1) % 2 == 0,
              "gu: contiguous fp32 [n, 2m]");
  const int64_t n = gu.size(0), m = gu.size(1) / 2, mv = m - m % W;
  auto y = at::empty({n, m}, gu.options());
  const float* gp = gu.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, n, 8, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const float* g = gp + i * 2 * m;
      float* o = yp + i * m;
      for (int64_t k = 0; k < mv; k += W) {
        const vf v = load(g + k);
        store(o + k, v / (1.f + vexp(-v)) * load(g + m + k));
      }
      for (int64_t k = mv; k < m; ++k) o[k] = g[k] / (1.f + std::exp(-g[k])) * g[m + k];
    }
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("supports_head_dim", &supports_head_dim, "whether the decode attention kernels take this head size");
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention over a paged KV cache");
  m.def("paged_decode_attention_int8", &paged_decode_attention_int8, "decode attention over an int8 paged KV cache");
  m.def("rope_kv_write", &rope_kv_write, "rotary embedding of q and k in place in the QKV output, and the fp32 K/V rows into their slots",
        py::arg("qkv"), py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("cos"), py::arg("sin"), py::arg("positions"),
        py::arg("kcache") = py::none(), py::arg("vcache") = py::none(), py::arg("slots") = py::none());
  m.def("kv_write_int8", &kv_write_int8, "quantise new K/V rows into an int8 paged cache with per-block scales");
  m.def("add_rms_norm", &add_rms_norm, "h += x in place (x optional), then rms_norm(h) * w", py::arg("h"), py::arg("x"),
        py::arg("w"), py::arg("eps"));
  m.def("silu_mul", &silu_mul, "silu(gu[:, :m]) * gu[:, m:]");
}

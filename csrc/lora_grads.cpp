// The LoRA adapter gradients' rank-r products of the native CPU backend, reading a bf16/fp16 operand as it is.
//
//   bread_kernels::rank_products(Tensor a, Tensor? bt, Tensor? w) -> (Tensor, Tensor)
//   bread_kernels::add_rank_product_(Tensor(a!) target, Tensor v, Tensor a, float alpha, bool round_term) -> ()
//
// a [M, N] fp32 / bf16 / fp16, bt [r, N] fp32, w [M, r] fp32 (all contiguous); returns, in fp32,
//   p = a btᵀ   [M, r]   (an empty tensor without bt)
//   q = wᵀ a    [r, N]   (an empty tensor without w)
// each element of a converted to fp32 in registers, where BLAS would need a and the rank-r operand in one dtype:
// peft's fp32 adapters on a bf16 layer then cost a [M, N] fp32 copy of g (and of x̃) and two fp32 reads of it.  With
// a = g: v = g B and dBᵀ = uᵀ g; with a = x̃: dA = vᵀ x̃ (w = v).
//
// fp32 sums of the products (each rounded to fp32), in an order that does not depend on the thread count: p's over N
// in 16 partial sums, q's over the rows in order (threads split q's columns).  BLAS sums in another order.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <vector>

#include "mixed_sum.h"

namespace {

constexpr int kLanes = 16;

// a·b over n in kLanes independent partial sums: vectorises without reassociating a single sum
inline float dot(const float* a, const float* b, int64_t n) {
  float part[kLanes] = {0.f};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) part[l] += a[i + l] * b[i + l];
  float tail = 0.f;
  for (; i < n; ++i) tail += a[i] * b[i];
  float sum = 0.f;
  for (int l = 0; l < kLanes; ++l) sum += part[l];
  return sum + tail;
}

template <typename A>
void rank_products_impl(const A* a, const float* bt, const float* w, float* p, float* q, int64_t m, int64_t n,
                        int64_t r) {
  if (p != nullptr) {  // p: rows in parallel, each row converted once and dotted with bt's r rows
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, n * r));
    at::parallel_for(0, m, grain, [&](int64_t begin, int64_t end) {
      std::vector<float> row(n);
      for (int64_t t = begin; t < end; ++t) {
        const A* source = a + t * n;
        for (int64_t k = 0; k < n; ++k) row[k] = static_cast<float>(source[k]);
        for (int64_t j = 0; j < r; ++j) p[t * r + j] = dot(row.data(), bt + j * n, n);
      }
    });
  }
  if (q != nullptr) {  // q: blocks of columns in parallel, each summed over the rows in order
    constexpr int64_t block = 64;
    at::parallel_for(0, (n + block - 1) / block, 1, [&](int64_t first, int64_t last) {
      float segment[block];
      for (int64_t b = first; b < last; ++b) {
        const int64_t c0 = b * block, width = std::min(block, n - c0);
        for (int64_t t = 0; t < m; ++t) {
          const A* source = a + t * n + c0;
          for (int64_t c = 0; c < width; ++c) segment[c] = static_cast<float>(source[c]);
          for (int64_t j = 0; j < r; ++j) {
            const float coefficient = w[t * r + j];
            float* sums = q + j * n + c0;
            for (int64_t c = 0; c < width; ++c) sums[c] += coefficient * segment[c];
          }
        }
      }
    });
  }
}

std::tuple<at::Tensor, at::Tensor> rank_products(const at::Tensor& a, const c10::optional<at::Tensor>& bt,
                                                  const c10::optional<at::Tensor>& w) {
  TORCH_CHECK(a.device().is_cpu(), "bread_kernels native backend: CPU tensors only");
  TORCH_CHECK(a.dim() == 2 && a.is_contiguous(), "rank_products: a must be a contiguous 2-D tensor");
  TORCH_CHECK(bt.has_value() || w.has_value(), "rank_products: give bt, w or both");
  const int64_t m = a.size(0), n = a.size(1);
  const int64_t r = bt.has_value() ? bt->size(0) : w->size(1);
  if (bt.has_value())
    TORCH_CHECK(bt->scalar_type() == at::kFloat && bt->is_contiguous() && bt->dim() == 2 && bt->size(1) == n,
                "rank_products: bt must be a contiguous fp32 [r, ", n, "] tensor, got ", bt->sizes());
  if (w.has_value())
    TORCH_CHECK(w->scalar_type() == at::kFloat && w->is_contiguous() && w->dim() == 2 && w->size(0) == m &&
                    w->size(1) == r,
                "rank_products: w must be a contiguous fp32 [", m, ", ", r, "] tensor, got ", w->sizes());
  const auto options = a.options().dtype(at::kFloat);
  at::Tensor p = at::empty({bt.has_value() ? m : 0, r}, options);
  at::Tensor q = at::zeros({r, w.has_value() ? n : 0}, options);
  const float* btp = bt.has_value() ? bt->data_ptr<float>() : nullptr;
  const float* wp = w.has_value() ? w->data_ptr<float>() : nullptr;
  float* pp = bt.has_value() ? p.data_ptr<float>() : nullptr;
  float* qp = w.has_value() ? q.data_ptr<float>() : nullptr;
  switch (a.scalar_type()) {
    case at::kFloat: rank_products_impl(a.data_ptr<float>(), btp, wp, pp, qp, m, n, r); break;
    case at::kBFloat16: rank_products_impl(a.data_ptr<c10::BFloat16>(), btp, wp, pp, qp, m, n, r); break;
    case at::kHalf: rank_products_impl(a.data_ptr<c10::Half>(), btp, wp, pp, qp, m, n, r); break;
    default: TORCH_CHECK(false, "rank_products: a must be float32, bfloat16 or float16, got ", a.scalar_type());
  }
  return {p, q};
}

// target [M, K] bf16 / fp16 / fp32 += alpha·(v a), v [M, r] and a [r, K] fp32: the LoRA dX's adapter branch
// s·v A added into g W without its fp32 [M, K] product.  Per element, as bread_kernels::add_scaled_ with other = v a:
// term = fp32(alpha · Σ_j v[t, j]·a[j, k]) (the sum in j order), rounded to target's dtype with round_term, then
// target = round(fp32(target) + term).  BLAS's product would be the same sum in its own order.
template <typename T, bool ROUND_TERM>
void add_rank_product_impl(T* target, const float* v, const float* a, float alpha, int64_t m, int64_t k,
                           int64_t r) {
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, k));
  at::parallel_for(0, m, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> sums(k);
    for (int64_t t = begin; t < end; ++t) {
      std::fill(sums.begin(), sums.end(), 0.f);
      for (int64_t j = 0; j < r; ++j) {
        const float coefficient = v[t * r + j];
        const float* row = a + j * k;
        for (int64_t c = 0; c < k; ++c) sums[c] += coefficient * row[c];
      }
      T* out = target + t * k;
      for (int64_t c = 0; c < k; ++c) {
        out[c] = add_rounded<T, ROUND_TERM>(out[c], alpha * sums[c]);
      }
    }
  });
}

template <typename T>
void add_rank_product_rounding(at::Tensor& target, const at::Tensor& v, const at::Tensor& a, float alpha,
                               bool round_term) {
  const int64_t m = target.size(0), k = target.size(1), r = v.size(1);
  if (round_term)
    add_rank_product_impl<T, true>(target.data_ptr<T>(), v.data_ptr<float>(), a.data_ptr<float>(), alpha, m, k, r);
  else
    add_rank_product_impl<T, false>(target.data_ptr<T>(), v.data_ptr<float>(), a.data_ptr<float>(), alpha, m, k, r);
}

void add_rank_product_(at::Tensor target, const at::Tensor& v, const at::Tensor& a, double alpha, bool round_term) {
  TORCH_CHECK(target.device().is_cpu() && v.device().is_cpu() && a.device().is_cpu(),
              "bread_kernels native backend: CPU tensors only");
  TORCH_CHECK(target.dim() == 2 && target.is_contiguous(), "add_rank_product_: target must be a contiguous 2-D tensor");
  TORCH_CHECK(v.scalar_type() == at::kFloat && a.scalar_type() == at::kFloat && v.is_contiguous() &&
                  a.is_contiguous() && v.dim() == 2 && a.dim() == 2,
              "add_rank_product_: v and a must be contiguous 2-D fp32 tensors");
  TORCH_CHECK(v.size(0) == target.size(0) && a.size(1) == target.size(1) && v.size(1) == a.size(0),
              "add_rank_product_: v ", v.sizes(), " times a ", a.sizes(), " is not target's shape ", target.sizes());
  const float s = static_cast<float>(alpha);
  switch (target.scalar_type()) {
    case at::kFloat: return add_rank_product_rounding<float>(target, v, a, s, round_term);
    case at::kBFloat16: return add_rank_product_rounding<c10::BFloat16>(target, v, a, s, round_term);
    case at::kHalf: return add_rank_product_rounding<c10::Half>(target, v, a, s, round_term);
    default:
      TORCH_CHECK(false, "add_rank_product_: target must be float32, bfloat16 or float16, got ", target.scalar_type());
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(bread_kernels, m) {
  m.def("rank_products(Tensor a, Tensor? bt, Tensor? w) -> (Tensor, Tensor)");
  m.def("add_rank_product_(Tensor(a!) target, Tensor v, Tensor a, float alpha, bool round_term=False) -> ()");
}

TORCH_LIBRARY_IMPL(bread_kernels, CPU, m) {
  m.impl("rank_products", &rank_products);
  m.impl("add_rank_product_", &add_rank_product_);
}

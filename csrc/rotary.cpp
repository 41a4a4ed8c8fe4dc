// The rotary position embedding of the native CPU backend: one pass over x where autograd's rotate-half form runs
// six ops forward (mul, slice, neg, cat, mul, add) and about ten backward (zero-filled slice gradients included).
//
//   bread_kernels::rotary_(Tensor(a!) out, Tensor x, Tensor cos, Tensor sin, bool backward) -> ()
//
// x, out: [B, H, S, D] (any strides with a unit last stride), cos, sin: [Bc, S, D] contiguous with Bc 1 or B; each
// of x, out and the table fp32 / bf16 / fp16 (cos and sin one dtype); D even, h = D/2.  Element d of a row
// (b, h, s), with c = cos[b or 0, s] and z = sin[...], every operand widened to fp32 exactly:
//
//   forward   out[d] = x[d]·c[d] − x[d+h]·z[d]            d <  h      (x·cos + rotate_half(x)·sin)
//             out[d] = x[d]·c[d] + x[d−h]·z[d]            d >= h
//   backward  out[d] = x[d]·c[d] + x[d+h]·z[d+h]          d <  h      (x = ∂L/∂out: g·cos + rotate_halfᵀ(g·sin))
//             out[d] = x[d]·c[d] − x[d−h]·z[d−h]          d >= h
//
// each product rounded to out's dtype, then the sum (nearest-even): the rounding of autograd's ops — whose negation
// is exact, whose zero-filled slice gradients add nothing, and which, where the dtypes differ (a bf16 q under
// autocast with an fp32 model's fp32 cos), compute the forward in the promoted dtype and round each gradient term
// to q's dtype before summing — so the values are theirs bit for bit.  Compiled with -ffp-contract=off: no FMA
// fuses a product into the sum.

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>

namespace {

template <typename T>
inline float rounded(float value) {
  return static_cast<float>(static_cast<T>(value));
}

template <>
inline float rounded<float>(float value) {
  return value;
}

// one row, its two halves in one loop (x1 = x[:h], x2 = x[h:]; restrict: out never aliases an input, which lets the
// compiler vectorise the loop)
template <typename O, bool BACKWARD, typename X, typename C>
void rotary_row(O* __restrict__ out, const X* __restrict__ x, const C* __restrict__ c, const C* __restrict__ z,
                int64_t half) {
  const X* __restrict__ x2 = x + half;
  const C* __restrict__ c2 = c + half;
  const C* __restrict__ z2 = z + half;
  O* __restrict__ out2 = out + half;
  for (int64_t d = 0; d < half; ++d) {
    const float a = static_cast<float>(x[d]), b = static_cast<float>(x2[d]);
    const float direct1 = rounded<O>(a * static_cast<float>(c[d]));
    const float direct2 = rounded<O>(b * static_cast<float>(c2[d]));
    if (BACKWARD) {  // out1 = x1·c1 + x2·z2,  out2 = x2·c2 − x1·z1
      out[d] = static_cast<O>(direct1 + rounded<O>(b * static_cast<float>(z2[d])));
      out2[d] = static_cast<O>(direct2 - rounded<O>(a * static_cast<float>(z[d])));
    } else {  // out1 = x1·c1 − x2·z1,  out2 = x2·c2 + x1·z2
      out[d] = static_cast<O>(direct1 - rounded<O>(b * static_cast<float>(z[d])));
      out2[d] = static_cast<O>(direct2 + rounded<O>(a * static_cast<float>(z2[d])));
    }
  }
}

template <typename O, typename X, typename C, bool BACKWARD>
void rotary_impl(at::Tensor& out, const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t heads = x.size(1), seq = x.size(2), dim = x.size(3);
  const int64_t rows = x.size(0) * heads * seq;
  const bool per_batch = cos.size(0) != 1;
  const X* xp = x.data_ptr<X>();
  O* op = out.data_ptr<O>();
  const C* cp = cos.data_ptr<C>();
  const C* sp = sin.data_ptr<C>();
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(1, dim));
  const int64_t xb = x.stride(0), xh = x.stride(1), xs = x.stride(2);
  const int64_t ob = out.stride(0), oh = out.stride(1), os = out.stride(2);
  // rows in x's memory order: heads innermost where x is the transposed view of a [B, S, H·D] projection
  const bool heads_inner = xh < xs;
  const int64_t inner_size = heads_inner ? heads : seq, outer_size = heads_inner ? seq : heads;
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    // (b, outer, inner) of the first row, then counted up: no division per row
    int64_t inner = begin % inner_size, outer = (begin / inner_size) % outer_size;
    int64_t b = begin / (inner_size * outer_size);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t h = heads_inner ? inner : outer, s = heads_inner ? outer : inner;
      const int64_t table = ((per_batch ? b : 0) * seq + s) * dim;
      rotary_row<O, BACKWARD>(op + b * ob + h * oh + s * os, xp + b * xb + h * xh + s * xs, cp + table, sp + table,
                              dim / 2);
      if (++inner == inner_size) {
        inner = 0;
        if (++outer == outer_size) {
          outer = 0;
          ++b;
        }
      }
    }
  });
}

// one dtype switch per operand: out's, then x's, then the table's
template <typename O, typename X>
void rotary_table(at::Tensor& out, const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool backward) {
  switch (cos.scalar_type()) {
    case at::kFloat:
      return backward ? rotary_impl<O, X, float, true>(out, x, cos, sin)
                      : rotary_impl<O, X, float, false>(out, x, cos, sin);
    case at::kBFloat16:
      return backward ? rotary_impl<O, X, c10::BFloat16, true>(out, x, cos, sin)
                      : rotary_impl<O, X, c10::BFloat16, false>(out, x, cos, sin);
    case at::kHalf:
      return backward ? rotary_impl<O, X, c10::Half, true>(out, x, cos, sin)
                      : rotary_impl<O, X, c10::Half, false>(out, x, cos, sin);
    default: TORCH_CHECK(false, "rotary_: cos must be float32, bfloat16 or float16, got ", cos.scalar_type());
  }
}

template <typename O>
void rotary_input(at::Tensor& out, const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool backward) {
  switch (x.scalar_type()) {
    case at::kFloat: return rotary_table<O, float>(out, x, cos, sin, backward);
    case at::kBFloat16: return rotary_table<O, c10::BFloat16>(out, x, cos, sin, backward);
    case at::kHalf: return rotary_table<O, c10::Half>(out, x, cos, sin, backward);
    default: TORCH_CHECK(false, "rotary_: x must be float32, bfloat16 or float16, got ", x.scalar_type());
  }
}

void rotary_(at::Tensor out, const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool backward) {
  TORCH_CHECK(x.device().is_cpu() && out.device().is_cpu() && cos.device().is_cpu() && sin.device().is_cpu(),
              "bread_kernels native backend: CPU tensors only");
  TORCH_CHECK(x.dim() == 4 && out.sizes() == x.sizes(), "rotary_: x and out must be [B, H, S, D] of one shape, got ",
              x.sizes(), " and ", out.sizes());
  TORCH_CHECK(x.size(3) % 2 == 0 && x.stride(3) == 1 && out.stride(3) == 1,
              "rotary_: the head dimension must be even with unit stride");
  TORCH_CHECK(cos.dim() == 3 && cos.sizes() == sin.sizes() && cos.is_contiguous() && sin.is_contiguous() &&
                  (cos.size(0) == 1 || cos.size(0) == x.size(0)) && cos.size(1) == x.size(2) &&
                  cos.size(2) == x.size(3),
              "rotary_: cos and sin must be contiguous [1 or B, S, D] for x ", x.sizes(), ", got ", cos.sizes(),
              " and ", sin.sizes());
  TORCH_CHECK(cos.scalar_type() == sin.scalar_type(), "rotary_: cos and sin must share one dtype");
  switch (out.scalar_type()) {
    case at::kFloat: return rotary_input<float>(out, x, cos, sin, backward);
    case at::kBFloat16: return rotary_input<c10::BFloat16>(out, x, cos, sin, backward);
    case at::kHalf: return rotary_input<c10::Half>(out, x, cos, sin, backward);
    default: TORCH_CHECK(false, "rotary_: out must be float32, bfloat16 or float16, got ", out.scalar_type());
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(bread_kernels, m) {
  m.def("rotary_(Tensor(a!) out, Tensor x, Tensor cos, Tensor sin, bool backward) -> ()");
}

TORCH_LIBRARY_IMPL(bread_kernels, CPU, m) {
  m.impl("rotary_", &rotary_);
}

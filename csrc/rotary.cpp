// The rotary position embedding of the native CPU backend: one pass over x where autograd's rotate-half form runs
// six ops forward (mul, slice, neg, cat, mul, add) and about ten backward (zero-filled slice gradients included).
//
//   bread_kernels::rotary_(Tensor(a!) out, Tensor x, Tensor cos, Tensor sin, bool backward) -> ()
//
// x, out: [B, H, S, D] (any strides with a unit last stride), cos, sin: [Bc, S, D] contiguous with Bc 1 or B; one
// dtype, fp32 / bf16 / fp16; D even, h = D/2.  Element d of a row (b, h, s), with c = cos[b or 0, s] and z = sin[...]:
//
//   forward   out[d] = x[d]·c[d] − x[d+h]·z[d]            d <  h      (x·cos + rotate_half(x)·sin)
//             out[d] = x[d]·c[d] + x[d−h]·z[d]            d >= h
//   backward  out[d] = x[d]·c[d] + x[d+h]·z[d+h]          d <  h      (x = ∂L/∂out: g·cos + rotate_halfᵀ(g·sin))
//             out[d] = x[d]·c[d] − x[d−h]·z[d−h]          d >= h
//
// each product rounded to the dtype, then the sum (nearest-even): the rounding of autograd's ops, whose negation is
// exact and whose zero-filled slice gradients add nothing, so the values are theirs bit for bit.  Compiled with
// -ffp-contract=off: no FMA fuses a product into the sum.

#include <torch/extension.h>
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

template <typename T, bool BACKWARD>
void rotary_row(T* out, const T* x, const T* c, const T* z, int64_t half) {
  for (int64_t d = 0; d < half; ++d) {
    const float direct = rounded<T>(static_cast<float>(x[d]) * static_cast<float>(c[d]));
    const int64_t other = BACKWARD ? d + half : d;
    const float rotated = rounded<T>(static_cast<float>(x[d + half]) * static_cast<float>(z[other]));
    out[d] = static_cast<T>(BACKWARD ? direct + rotated : direct - rotated);
  }
  for (int64_t d = half; d < 2 * half; ++d) {
    const float direct = rounded<T>(static_cast<float>(x[d]) * static_cast<float>(c[d]));
    const int64_t other = BACKWARD ? d - half : d;
    const float rotated = rounded<T>(static_cast<float>(x[d - half]) * static_cast<float>(z[other]));
    out[d] = static_cast<T>(BACKWARD ? direct - rotated : direct + rotated);
  }
}

template <typename T, bool BACKWARD>
void rotary_impl(at::Tensor& out, const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t heads = x.size(1), seq = x.size(2), dim = x.size(3);
  const int64_t rows = x.size(0) * heads * seq;
  const bool per_batch = cos.size(0) != 1;
  const T* xp = x.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const T* cp = cos.data_ptr<T>();
  const T* sp = sin.data_ptr<T>();
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(1, dim));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t s = row % seq, h = (row / seq) % heads, b = row / (seq * heads);
      const int64_t table = ((per_batch ? b : 0) * seq + s) * dim;
      rotary_row<T, BACKWARD>(op + b * out.stride(0) + h * out.stride(1) + s * out.stride(2),
                              xp + b * x.stride(0) + h * x.stride(1) + s * x.stride(2), cp + table, sp + table,
                              dim / 2);
    }
  });
}

template <typename T>
void rotary_direction(at::Tensor& out, const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                      bool backward) {
  if (backward) rotary_impl<T, true>(out, x, cos, sin);
  else rotary_impl<T, false>(out, x, cos, sin);
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
  TORCH_CHECK(x.scalar_type() == out.scalar_type() && x.scalar_type() == cos.scalar_type() &&
                  x.scalar_type() == sin.scalar_type(),
              "rotary_: x, out, cos and sin must share one dtype");
  switch (x.scalar_type()) {
    case at::kFloat: return rotary_direction<float>(out, x, cos, sin, backward);
    case at::kBFloat16: return rotary_direction<c10::BFloat16>(out, x, cos, sin, backward);
    case at::kHalf: return rotary_direction<c10::Half>(out, x, cos, sin, backward);
    default: TORCH_CHECK(false, "rotary_: x must be float32, bfloat16 or float16, got ", x.scalar_type());
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(bread_kernels, m) {
  m.def("rotary_(Tensor(a!) out, Tensor x, Tensor cos, Tensor sin, bool backward) -> ()");
}

TORCH_LIBRARY_IMPL(bread_kernels, CPU, m) {
  m.impl("rotary_", &rotary_);
}

// The update epilogue of the native CPU backend: one pass over a cache-resident chunk.
//
//   bread_kernels::apply_update_(Tensor(a!) param, Tensor grad, float step, bool sign, int rounding,
//                                int key1, int key2, int offset, Tensor? ok) -> ()
//   bread_kernels::apply_update_if_finite_(Tensor(a!) param, Tensor grad, float step, bool sign, int rounding,
//                                         int key1, int key2, int offset, Tensor[] checked, Tensor? ok=None)
//                                         -> Tensor
//                                         apply_update_ unless ok is false or an element of `checked` is inf/nan;
//                                         returns that flag (the check and the write of a whole dW in one op)
//   bread_kernels::all_finite(Tensor[] tensors) -> Tensor                 0-dim bool: no element is inf or nan
//   bread_kernels::addmm_if_finite_(Tensor(a!) self, Tensor grad_output, Tensor input, float alpha,
//                                   Tensor[] checked, Tensor? ok=None) -> Tensor
//                                         self += alpha*grad_outputᵀ*input unless ok is false or an element of
//                                         `checked` is inf/nan; returns that flag (0-dim bool).  The SGD update's
//                                         check and write in one op: one dispatch on a path that runs per weight
//   bread_kernels::add_scaled_(Tensor(a!) self, Tensor other, float alpha, bool round_term) -> ()
//                                         self += alpha*other across dtypes, rounded once; one pass, no temporaries
//
// ``ok`` is a 0-dim bool tensor (the finiteness flag of the update's gradient): where it is false nothing is
// written.  Reading it here is a memory read, not an aten op: the Python side never converts a tensor to a number.
//
// param: 1-D or 2-D, fp32 / bf16 / fp16, any strides (a row chunk of a weight, a transposed view, a bias).
// grad:  fp32 / bf16 / fp16, contiguous, same shape as param (the chunk of dW the GEMM just wrote).
// For every element i (row-major logical index):  u = sign ? sign(g) : g;  new = float(p) - step*u;
// p = round(new), nearest-even (rounding == 0) or stochastic (rounding == 1) with random bits
// lowbias32(lowbias32((offset + i) ^ key1) ^ key2).  Same maths, bit for bit, as backends/epilogue.py and the
// Triton kernel; compiled with -ffp-contract=off so no FMA changes the rounding of step*u.

#include <ATen/core/Tensor.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "mixed_sum.h"

namespace {

inline uint32_t lowbias32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

template <typename T>
inline T round_stochastic(float value, uint32_t bits);

template <>
inline float round_stochastic<float>(float value, uint32_t) {
  return value;
}

template <>
inline c10::BFloat16 round_stochastic<c10::BFloat16>(float value, uint32_t bits) {
  uint32_t pattern = float_bits(value) + (bits & 0xFFFFu);
  // the top half is the result (the low 16 bits are dropped, not rounded): built from its bits, which vectorises
  return c10::BFloat16(static_cast<uint16_t>(pattern >> 16), c10::BFloat16::from_bits());
}

template <>
inline c10::Half round_stochastic<c10::Half>(float value, uint32_t bits) {
  int32_t exponent = static_cast<int32_t>((float_bits(value) >> 23) & 0xFFu) - 127;
  exponent = exponent < -14 ? -14 : (exponent > 15 ? 15 : exponent);
  float ulp = bits_float(static_cast<uint32_t>(exponent - 10 + 127) << 23);
  float inv_ulp = bits_float(static_cast<uint32_t>(127 - (exponent - 10)) << 23);
  float uniform = static_cast<float>(bits >> 8) * 5.9604644775390625e-08f;  // 2^-24
  float scaled = value * inv_ulp;  // exact: a power of two
  float lower = std::floor(scaled);
  float up = uniform < scaled - lower ? 1.f : 0.f;  // P(up) = fractional part, exactly
  return c10::Half((lower + up) * ulp);
}

template <typename T, typename G, bool SIGN, bool STOCHASTIC>
void apply_update_impl(at::Tensor& param, const at::Tensor& grad, float step, uint32_t key1, uint32_t key2,
                       int64_t offset) {
  const int64_t rows = param.dim() == 2 ? param.size(0) : 1;
  const int64_t cols = param.dim() == 2 ? param.size(1) : param.size(0);
  const int64_t row_stride = param.dim() == 2 ? param.stride(0) : 0;
  const int64_t col_stride = param.dim() == 2 ? param.stride(1) : param.stride(0);
  T* p = param.data_ptr<T>();
  const G* g = grad.data_ptr<G>();

  // One element; the loops below only differ in how they address the parameter (unit stride vectorises).
  auto update = [&](T& w, G gradient, int64_t index) {
    float gv = static_cast<float>(gradient);
    float u = SIGN ? static_cast<float>((gv > 0.f) - (gv < 0.f)) : gv;
    float scaled = step * u;
    float value = static_cast<float>(w) - scaled;
    if constexpr (STOCHASTIC) {
      uint32_t counter = static_cast<uint32_t>(static_cast<uint64_t>(index) & 0xFFFFFFFFull);
      w = round_stochastic<T>(value, lowbias32(lowbias32(counter ^ key1) ^ key2));
    } else {
      w = static_cast<T>(value);
    }
  };

  // Threads only for work that repays waking them (~32K elements a task): a small weight or bias runs inline,
  // where a parallel region would cost more than the update, and far more on a busy machine.
  const int64_t grain_rows = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, cols));
  at::parallel_for(0, rows, grain_rows, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* prow = p + r * row_stride;
      const G* grow = g + r * cols;
      const int64_t base = offset + r * cols;
      if (col_stride == 1) {
        for (int64_t c = 0; c < cols; ++c) update(prow[c], grow[c], base + c);
      } else {
        for (int64_t c = 0; c < cols; ++c) update(prow[c * col_stride], grow[c], base + c);
      }
    }
  });
}

template <typename T, typename G>
void dispatch_flags(at::Tensor& param, const at::Tensor& grad, float step, bool sign, bool stochastic, uint32_t k1,
                    uint32_t k2, int64_t offset) {
  if (sign && stochastic) apply_update_impl<T, G, true, true>(param, grad, step, k1, k2, offset);
  else if (sign) apply_update_impl<T, G, true, false>(param, grad, step, k1, k2, offset);
  else if (stochastic) apply_update_impl<T, G, false, true>(param, grad, step, k1, k2, offset);
  else apply_update_impl<T, G, false, false>(param, grad, step, k1, k2, offset);
}

template <typename T>
void dispatch_grad(at::Tensor& param, const at::Tensor& grad, float step, bool sign, bool stochastic, uint32_t k1,
                   uint32_t k2, int64_t offset) {
  switch (grad.scalar_type()) {
    case at::kFloat: return dispatch_flags<T, float>(param, grad, step, sign, stochastic, k1, k2, offset);
    case at::kBFloat16: return dispatch_flags<T, c10::BFloat16>(param, grad, step, sign, stochastic, k1, k2, offset);
    case at::kHalf: return dispatch_flags<T, c10::Half>(param, grad, step, sign, stochastic, k1, k2, offset);
    default: TORCH_CHECK(false, "apply_update_: grad dtype must be float32, bfloat16 or float16, got ", grad.scalar_type());
  }
}

bool flag_is_set(const c10::optional<at::Tensor>& ok) {
  if (!ok.has_value()) return true;
  TORCH_CHECK(ok->numel() == 1 && ok->scalar_type() == at::kBool && ok->device().is_cpu(),
              "bread_kernels native backend: ok must be a one-element bool CPU tensor");
  return *ok->data_ptr<bool>();
}

void apply_update_(at::Tensor param, const at::Tensor& grad, double step, bool sign, int64_t rounding, int64_t key1,
                   int64_t key2, int64_t offset, const c10::optional<at::Tensor>& ok) {
  if (!flag_is_set(ok)) return;
  TORCH_CHECK(param.device().is_cpu() && grad.device().is_cpu(), "bread_kernels native backend: CPU tensors only");
  TORCH_CHECK(param.dim() == 1 || param.dim() == 2, "apply_update_: param must be 1-D or 2-D, got ", param.dim(), "-D");
  TORCH_CHECK(grad.is_contiguous(), "apply_update_: grad must be contiguous");
  TORCH_CHECK(grad.sizes() == param.sizes(), "apply_update_: grad shape ", grad.sizes(), " != param shape ",
              param.sizes());
  TORCH_CHECK(rounding == 0 || rounding == 1, "apply_update_: rounding must be 0 (nearest) or 1 (stochastic)");
  const auto k1 = static_cast<uint32_t>(key1);
  const auto k2 = static_cast<uint32_t>(key2);
  const float s = static_cast<float>(step);
  switch (param.scalar_type()) {
    case at::kFloat: return dispatch_grad<float>(param, grad, s, sign, false, k1, k2, offset);
    case at::kBFloat16: return dispatch_grad<c10::BFloat16>(param, grad, s, sign, rounding == 1, k1, k2, offset);
    case at::kHalf: return dispatch_grad<c10::Half>(param, grad, s, sign, rounding == 1, k1, k2, offset);
    default:
      TORCH_CHECK(false, "apply_update_: param dtype must be float32, bfloat16 or float16, got ",
                  param.scalar_type());
  }
}

// A non-finite float has every exponent bit set: test the bit pattern, no float compares.  The scan is a min
// reduction of (bits & exponent) ^ exponent, which is 0 exactly for a non-finite element: unsigned min vectorises
// to one instruction per vector (a bool OR of compares did not, and ran at a quarter of the bandwidth in bf16).
template <typename U>
bool finite_bits(const U* bits, int64_t n, U exponent) {
  U smallest = exponent;
  for (int64_t i = 0; i < n; ++i) {
    U v = static_cast<U>((bits[i] & exponent) ^ exponent);
    smallest = v < smallest ? v : smallest;
  }
  return smallest != 0;
}

bool tensor_is_finite(const at::Tensor& t) {
  if (t.numel() == 0) return true;
  if (!t.is_contiguous()) return tensor_is_finite(t.contiguous());
  const int64_t n = t.numel();
  std::atomic<bool> finite{true};
  at::parallel_for(0, n, 1 << 16, [&](int64_t begin, int64_t end) {
    if (!finite.load(std::memory_order_relaxed)) return;
    bool ok;
    switch (t.scalar_type()) {
      case at::kFloat:
        ok = finite_bits(reinterpret_cast<const uint32_t*>(t.data_ptr<float>()) + begin, end - begin, 0x7F800000u);
        break;
      case at::kBFloat16:
        ok = finite_bits(reinterpret_cast<const uint16_t*>(t.data_ptr<c10::BFloat16>()) + begin, end - begin,
                         static_cast<uint16_t>(0x7F80u));
        break;
      case at::kHalf:
        ok = finite_bits(reinterpret_cast<const uint16_t*>(t.data_ptr<c10::Half>()) + begin, end - begin,
                         static_cast<uint16_t>(0x7C00u));
        break;
      default:
        TORCH_CHECK(false, "bread_kernels native backend: the tensors whose finiteness gates an update must be ",
                    "float32, bfloat16 or float16 (cast them first), got ", t.scalar_type());
    }
    if (!ok) finite.store(false, std::memory_order_relaxed);
  });
  return finite.load();
}

// ok and'ed with the finiteness of every tensor in `checked` (read here: a memory read, not an aten op)
bool gate(at::TensorList checked, const c10::optional<at::Tensor>& ok) {
  bool finite = flag_is_set(ok);
  for (const auto& t : checked) {
    if (!finite) break;
    TORCH_CHECK(t.device().is_cpu(), "bread_kernels native backend: CPU tensors only");
    finite = tensor_is_finite(t);
  }
  return finite;
}

at::Tensor all_finite(at::TensorList tensors) {
  return at::scalar_tensor(gate(tensors, c10::nullopt), at::TensorOptions().dtype(at::kBool));
}

at::Tensor apply_update_if_finite_(at::Tensor param, const at::Tensor& grad, double step, bool sign, int64_t rounding,
                                   int64_t key1, int64_t key2, int64_t offset, at::TensorList checked,
                                   const c10::optional<at::Tensor>& ok) {
  TORCH_CHECK(ok.has_value() || !checked.empty(),
              "apply_update_if_finite_: give ok or tensors to check; an ungated write needs no gate");
  const bool finite = gate(checked, ok);
  if (finite) apply_update_(param, grad, step, sign, rounding, key1, key2, offset, c10::nullopt);
  return at::scalar_tensor(finite, at::TensorOptions().dtype(at::kBool));
}

at::Tensor addmm_if_finite_(at::Tensor self, const at::Tensor& grad_output, const at::Tensor& input, double alpha,
                            at::TensorList checked, const c10::optional<at::Tensor>& ok) {
  TORCH_CHECK(ok.has_value() || !checked.empty(),
              "addmm_if_finite_: give ok or tensors to check; an ungated write needs no gate");
  const bool finite = gate(checked, ok);
  if (finite) self.addmm_(grad_output.t(), input, 1, alpha);
  return at::scalar_tensor(finite, at::TensorOptions().dtype(at::kBool));
}

// self = round(float(self) + term), term = alpha*other in other's dtype (rounded on to self's dtype first with
// round_term), nearest-even: what torch computes for self.add_(other * alpha), in one pass that reads each operand
// once and writes self once (bread_kernels/backends/add_scaled.py: the maths and the torch form, which on a CPU
// copies the low-precision operand to fp32 and rounds the fp32 sum in passes of their own).
template <typename S, typename O, bool ROUND_TERM>
void add_scaled_impl(at::Tensor& self, const at::Tensor& other, float alpha) {
  S* out = self.data_ptr<S>();
  const O* in = other.data_ptr<O>();
  at::parallel_for(0, self.numel(), 1 << 15, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float term = static_cast<float>(static_cast<O>(alpha * static_cast<float>(in[i])));  // exact for alpha 1
      out[i] = add_rounded<S, ROUND_TERM>(out[i], term);
    }
  });
}

template <typename S, bool ROUND_TERM>
void add_scaled_other(at::Tensor& self, const at::Tensor& other, float alpha) {
  switch (other.scalar_type()) {
    case at::kFloat: return add_scaled_impl<S, float, ROUND_TERM>(self, other, alpha);
    case at::kBFloat16: return add_scaled_impl<S, c10::BFloat16, ROUND_TERM>(self, other, alpha);
    case at::kHalf: return add_scaled_impl<S, c10::Half, ROUND_TERM>(self, other, alpha);
    default: TORCH_CHECK(false, "add_scaled_: other must be float32, bfloat16 or float16, got ", other.scalar_type());
  }
}

template <typename S>
void add_scaled_rounding(at::Tensor& self, const at::Tensor& other, float alpha, bool round_term) {
  if (round_term) add_scaled_other<S, true>(self, other, alpha);
  else add_scaled_other<S, false>(self, other, alpha);
}

void add_scaled_(at::Tensor self, const at::Tensor& other, double alpha, bool round_term) {
  TORCH_CHECK(self.device().is_cpu() && other.device().is_cpu(), "bread_kernels native backend: CPU tensors only");
  TORCH_CHECK(self.is_contiguous() && other.is_contiguous(), "add_scaled_: self and other must be contiguous");
  TORCH_CHECK(self.sizes() == other.sizes(), "add_scaled_: self shape ", self.sizes(), " != other shape ",
              other.sizes());
  const float a = static_cast<float>(alpha);
  switch (self.scalar_type()) {
    case at::kFloat: return add_scaled_rounding<float>(self, other, a, round_term);
    case at::kBFloat16: return add_scaled_rounding<c10::BFloat16>(self, other, a, round_term);
    case at::kHalf: return add_scaled_rounding<c10::Half>(self, other, a, round_term);
    default: TORCH_CHECK(false, "add_scaled_: self must be float32, bfloat16 or float16, got ", self.scalar_type());
  }
}

}  // namespace

TORCH_LIBRARY(bread_kernels, m) {
  m.def(
      "apply_update_(Tensor(a!) param, Tensor grad, float step, bool sign, int rounding, int key1, int key2, "
      "int offset, Tensor? ok=None) -> ()");
  m.def(
      "apply_update_if_finite_(Tensor(a!) param, Tensor grad, float step, bool sign, int rounding, int key1, "
      "int key2, int offset, Tensor[] checked, Tensor? ok=None) -> Tensor");
  m.def("all_finite(Tensor[] tensors) -> Tensor");
  m.def(
      "addmm_if_finite_(Tensor(a!) self, Tensor grad_output, Tensor input, float alpha, Tensor[] checked, "
      "Tensor? ok=None) -> Tensor");
  m.def("add_scaled_(Tensor(a!) self, Tensor other, float alpha, bool round_term=False) -> ()");
}

TORCH_LIBRARY_IMPL(bread_kernels, CPU, m) {
  m.impl("apply_update_", &apply_update_);
  m.impl("apply_update_if_finite_", &apply_update_if_finite_);
  m.impl("all_finite", &all_finite);
  m.impl("addmm_if_finite_", &addmm_if_finite_);
  m.impl("add_scaled_", &add_scaled_);
}

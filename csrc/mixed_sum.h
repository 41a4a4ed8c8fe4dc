// The element of bread_kernels::add_scaled_ and add_rank_product_ (bread_kernels/backends/add_scaled.py has the
// maths): term, already alpha times the addend in the addend's dtype, is rounded to the target's dtype first with
// ROUND_TERM (as autograd rounds a gradient to its tensor's dtype before summing it); the sum is fp32, rounded once,
// nearest-even, to the target's dtype (what torch's add of mixed dtypes computes).
#pragma once

template <typename T, bool ROUND_TERM>
inline T add_rounded(T target, float term) {
  if constexpr (ROUND_TERM) term = static_cast<float>(static_cast<T>(term));
  return static_cast<T>(static_cast<float>(target) + term);
}

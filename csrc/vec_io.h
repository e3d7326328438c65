// Vector load/store helpers shared by the fasttrdpo CPU kernels.
//
// Every kernel computes in fp32 whatever the storage dtype. These helpers move one "step" of
// kStep = 2 * Vectorized<float>::size() elements between memory (fp32, bf16 or fp16) and two fp32
// vectors; stores round to nearest even (ATen's vectorized bf16/fp16 conversions do, and so do the
// scalar c10::BFloat16 / c10::Half constructors used for tails).
//
// The vector width is fixed at compile time by the CPU_CAPABILITY macros the loader passes
// (AVX512 / AVX2 / DEFAULT, chosen from torch's own runtime CPU detection), so nothing here
// depends on -march=native.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace fasttrdpo {

using VecF = at::vec::Vectorized<float>;
constexpr int64_t kStep = 2 * VecF::size();

static inline void load_step(const float* p, VecF& a, VecF& b) {
  a = VecF::loadu(p);
  b = VecF::loadu(p + VecF::size());
}
static inline void load_step(const c10::BFloat16* p, VecF& a, VecF& b) {
  std::tie(a, b) = at::vec::convert_bfloat16_float(at::vec::Vectorized<c10::BFloat16>::loadu(p));
}
static inline void load_step(const c10::Half* p, VecF& a, VecF& b) {
  std::tie(a, b) = at::vec::convert_half_float(at::vec::Vectorized<c10::Half>::loadu(p));
}

static inline void store_step(float* p, const VecF& a, const VecF& b) {
  a.store(p);
  b.store(p + VecF::size());
}
static inline void store_step(c10::BFloat16* p, const VecF& a, const VecF& b) {
  at::vec::convert_float_bfloat16(a, b).store(p);
}
static inline void store_step(c10::Half* p, const VecF& a, const VecF& b) {
  at::vec::convert_float_half(a, b).store(p);
}

// Scalar conversions for tails (round to nearest even into the storage dtype).
template <typename T>
static inline float to_f32(T x) {
  return static_cast<float>(x);
}
template <typename T>
static inline T from_f32(float x) {
  return static_cast<T>(x);
}

// exp(x) in fp32 as the kernels use it: ATen's Vectorized exp (Sleef, 1-ulp class; the test suite
// measures its error against float64). An inlined Cephes-style polynomial was tried and was slower
// here: the generic NaN-safe min/max/blend steps cost more than Sleef's call.
static inline VecF vec_exp(const VecF& x) {
  return x.exp();
}

}  // namespace fasttrdpo

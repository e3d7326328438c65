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

// Software prefetch of kPrefetchBytes ahead of p, kBytes of it (a multiple of the 64-byte line). The
// hardware prefetcher alone left the streaming kernels short of the read bandwidth on the 2-core
// AVX-512 CI machine (paired log-probs forward at N=4096, V=32000 fp32: 0.072 s without, 0.057 s with;
// distances of 2-64 KiB tried, 16 KiB best). prefetcht0 never faults: reading past the end of a
// tensor is harmless.
constexpr int64_t kPrefetchBytes = 16384;
template <int64_t kBytes, typename T>
static inline void prefetch_ahead(const T* p) {
  const char* c = reinterpret_cast<const char*>(p) + kPrefetchBytes;
  for (int64_t k = 0; k < kBytes; k += 64) __builtin_prefetch(c + k);
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

// max(a, b) in one instruction where the ISA has it: the result is b when either is NaN, so NaN is NOT
// guaranteed to propagate. Only for running maxima whose NaN is caught elsewhere (the log-sum-exp:
// exp(NaN − m) makes the running sum NaN whatever m is).
static inline VecF max_nan_unsafe(const VecF& a, const VecF& b) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_max_ps(a, b);
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_max_ps(a, b);
#else
  return at::vec::maximum(a, b);
#endif
}

// exp(x) in fp32 as the kernels use it, ≤ 2u relative error in the normal range (the test suite
// measures it against float64 on a dense grid).
//
// AVX512: an inlined Cody-Waite exp in 13 vector instructions: n = round(x·log2 e), r = x − n·ln2
// (ln2 split in two so that r is exact to fp32), e^r = 1 + r + r²·q(r) with q a degree-4 fit of
// relative error 6e-9 on |r| ≤ ln2/2, and the result p·2^n by vscalefps, which rounds correctly into
// the subnormal range and gives +inf on overflow. x is clamped to [-110, 89] first (exp is 0 / +inf
// there in fp32 either way); the operand order of max/min returns x itself when x is NaN, so NaN
// propagates. The kernels are exp-bound (the paired forward does 2 exps per logit): against Sleef's
// expf16_u10 call this took the paired forward at N=4096, V=32000 fp32 from 0.099 s to 0.075 s on the
// 2-core CI machine. Other ISAs use ATen's Vectorized exp (Sleef, 1-ulp class).
#if defined(CPU_CAPABILITY_AVX512)
static inline VecF vec_exp(const VecF& v) {
  const __m512 lo = _mm512_set1_ps(-110.f), hi = _mm512_set1_ps(89.f);
  const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
  const __m512 ln2_hi = _mm512_set1_ps(0.693145751953125f);       // 15 significant bits: n·ln2_hi exact for |n| < 2^9
  const __m512 ln2_lo = _mm512_set1_ps(1.4286068202862268e-06f);  // ln2 − ln2_hi
  const __m512 one = _mm512_set1_ps(1.f);
  __m512 x = _mm512_min_ps(hi, _mm512_max_ps(lo, static_cast<__m512>(v)));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, ln2_hi, x);
  r = _mm512_fnmadd_ps(n, ln2_lo, r);
  __m512 q = _mm512_set1_ps(0.0013754823012277484f);
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(0.008366496302187443f));
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(0.041669219732284546f));
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(0.16666540503501892f));
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(0.49999991059303284f));
  const __m512 p = _mm512_fmadd_ps(_mm512_fmadd_ps(q, r, one), r, one);  // 1 + r + r²·q
  return _mm512_scalef_ps(p, n);
}
#else
static inline VecF vec_exp(const VecF& x) {
  return x.exp();
}
#endif

}  // namespace fasttrdpo

// The element loops of the CPU kernels: add two rows, add a row into a float accumulator, round
// an accumulator into a row. Every element is widened to opmath (float32 for 16-bit tables),
// added there and rounded once (to nearest, ties to even), as eager PyTorch does.
//
// float16 rows take most of their elements through F16C, 8 per instruction, where the CPU has
// it (checked at run time, row_ops.cpp). This extension is built for any x86-64 CPU, where
// c10::Half's scalar conversions are bit manipulations the compiler does not vectorise: on the
// project's earlier VM (a 2-core AMD EPYC), at gpt2-124M B 8, the scalar float16 forward took
// 55 ms, twice eager's 25 ms (whose kernels ATen compiles per CPU capability). bfloat16's
// conversions are shifts: the same treatment left its forward as it was (16.1-16.5 ms either
// way).
#pragma once

#include <ATen/OpMathType.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

namespace fusedemb {

// Whether row_ops.cpp has a hand-written F16C path for scalar_t (float16 only).
template <typename scalar_t>
constexpr bool kHasF16cPath = std::is_same_v<scalar_t, c10::Half>;

// The vectorised part of the loops below, for c10::Half (row_ops.cpp): each does the leading
// whole groups of 8 elements where the CPU has F16C and returns how many elements it did
// (none elsewhere); the scalar loop does the rest.
int64_t add_rows_vectorised(const c10::Half* a, const c10::Half* b, c10::Half* out, int64_t n);
int64_t accumulate_row_vectorised(float* acc, const c10::Half* src, int64_t n);
int64_t round_row_vectorised(const float* acc, c10::Half* dst, int64_t n);

// out[d] = a[d] + b[d], in opmath, rounded once.
template <typename scalar_t>
inline void add_rows(const scalar_t* a, const scalar_t* b, scalar_t* out, int64_t n) {
  using opmath_t = at::opmath_type<scalar_t>;
  int64_t d = 0;
  if constexpr (kHasF16cPath<scalar_t>) {
    d = add_rows_vectorised(a, b, out, n);
  }
  for (; d < n; ++d) {
    out[d] = static_cast<scalar_t>(static_cast<opmath_t>(a[d]) + static_cast<opmath_t>(b[d]));
  }
}

// acc[d] += src[d], in opmath.
template <typename scalar_t>
inline void accumulate_row(at::opmath_type<scalar_t>* acc, const scalar_t* src, int64_t n) {
  using opmath_t = at::opmath_type<scalar_t>;
  int64_t d = 0;
  if constexpr (kHasF16cPath<scalar_t>) {
    d = accumulate_row_vectorised(acc, src, n);
  }
  for (; d < n; ++d) {
    acc[d] += static_cast<opmath_t>(src[d]);
  }
}

// dst[d] = acc[d], rounded to the row's dtype.
template <typename scalar_t>
inline void round_row(const at::opmath_type<scalar_t>* acc, scalar_t* dst, int64_t n) {
  int64_t d = 0;
  if constexpr (kHasF16cPath<scalar_t>) {
    d = round_row_vectorised(acc, dst, n);
  }
  for (; d < n; ++d) {
    dst[d] = static_cast<scalar_t>(acc[d]);
  }
}

}  // namespace fusedemb

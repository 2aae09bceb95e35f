// The element loops of the CPU kernels: add two rows, add a row into a float accumulator, round
// an accumulator into a row. Every element is widened to opmath (float32 for 16-bit tables),
// added there and rounded once, as eager PyTorch does.
//
// float16 has a version of its own. This extension is built for any x86-64 CPU, so c10::Half's
// scalar conversions are bit manipulations the compiler does not vectorise: on this project's
// 2-core AMD EPYC VM the float16 forward at gpt2-124M B 8 took 58 ms, four times eager's 15 ms
// (whose kernels ATen compiles per CPU capability). The float16 rows use the F16C conversion
// instructions (8 elements per instruction) where the CPU has them, checked at run time.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace fusedemb {

// float16 rows (row_ops.cpp): F16C where the CPU has it (x86-64, GCC or Clang), else scalar.
void add_rows(const c10::Half* a, const c10::Half* b, c10::Half* out, int64_t n);
void accumulate_row(float* acc, const c10::Half* src, int64_t n);
void round_row(const float* acc, c10::Half* dst, int64_t n);

// out[d] = a[d] + b[d], in opmath, rounded once.
template <typename scalar_t>
inline void add_rows(const scalar_t* a, const scalar_t* b, scalar_t* out, int64_t n) {
  using opmath_t = at::opmath_type<scalar_t>;
  for (int64_t d = 0; d < n; ++d) {
    out[d] = static_cast<scalar_t>(static_cast<opmath_t>(a[d]) + static_cast<opmath_t>(b[d]));
  }
}

// acc[d] += src[d], in opmath.
template <typename scalar_t>
inline void accumulate_row(at::opmath_type<scalar_t>* acc, const scalar_t* src, int64_t n) {
  using opmath_t = at::opmath_type<scalar_t>;
  for (int64_t d = 0; d < n; ++d) {
    acc[d] += static_cast<opmath_t>(src[d]);
  }
}

// dst[d] = acc[d], rounded to the row's dtype.
template <typename scalar_t>
inline void round_row(const at::opmath_type<scalar_t>* acc, scalar_t* dst, int64_t n) {
  for (int64_t d = 0; d < n; ++d) {
    dst[d] = static_cast<scalar_t>(acc[d]);
  }
}

}  // namespace fusedemb

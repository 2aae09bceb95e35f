#include "huge_page_tensor.h"

#include <ATen/ops/empty.h>

#include <cstdint>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace fusedemb {
namespace {
constexpr uintptr_t kHugePageBytes = uintptr_t{2} << 20;
constexpr size_t kMinHugePageBytes = size_t{32} << 20;  // glibc's largest mmap threshold
}  // namespace

at::Tensor empty_on_huge_pages(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor tensor = at::empty(sizes, options);
#ifdef __linux__
  const size_t bytes = tensor.nbytes();
  if (bytes >= kMinHugePageBytes) {
    // Only whole, aligned huge pages inside the buffer can be huge; the ends stay small pages.
    const auto begin = reinterpret_cast<uintptr_t>(tensor.data_ptr());
    const uintptr_t first = (begin + kHugePageBytes - 1) & ~(kHugePageBytes - 1);
    const uintptr_t last = (begin + bytes) & ~(kHugePageBytes - 1);
    if (last > first) {
      madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
    }
  }
#endif
  return tensor;
}

}  // namespace fusedemb

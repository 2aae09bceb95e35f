// Large CPU tensors backed by transparent huge pages.
//
// A freshly allocated buffer costs a page fault per page on its first write, and the kernel
// zero-fills each page inside the fault: with 4 KiB pages, filling a new 154 MB gradient of the
// GPT-2 token table this way takes longer than computing it. Huge pages (2 MiB) cut the number
// of faults 512-fold. PyTorch's CPU allocator asks for them only when THP_MEM_ALLOC_ENABLE=1 is
// set, and Linux's default THP mode ("madvise") grants them only on request, so the kernels
// request them for their own large outputs.
#pragma once

#include <ATen/core/Tensor.h>

namespace fusedemb {

// Like at::empty, but buffers of at least kMinHugePageBytes are 2 MiB aligned and marked
// MADV_HUGEPAGE (Linux; elsewhere, and below that size, plain at::empty).
at::Tensor empty_on_huge_pages(at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace fusedemb

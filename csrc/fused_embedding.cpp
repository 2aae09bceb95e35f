// CPU kernels of fusedemb: the fused token + position embedding and its backward.
//
//   forward:  out[n, :] = tok_weight[ids[n], :] + pos_weight[pos(n), :]
//   backward: grad_tok[v, :] = sum over n with ids[n] == v of grad_out[n, :]   (row padding_idx stays 0)
//             grad_pos[p, :] = sum over n with pos(n) == p of grad_out[n, :]
//
// where n runs over the N = ids.numel() tokens in row-major order, T = ids.size(-1), and
// pos(n) = position_ids[n] when position_ids is given, else n % T + position_offset.
//
// fusedemb/validation.py checks shapes, dtypes and devices with readable messages before
// inputs get here (the id values are checked here: check_rows_in_range, below), and
// fusedemb/cpp_extension.py gives these operators their fake kernels; autograd belongs to the
// fusedemb::fused_embedding operator that calls them (fusedemb/ops.py). The checks here are
// the last line of defence, so that a direct call can never read or write out of bounds.
//
// Determinism: the backward never lets two threads add into the same element. It groups tokens
// by row with a stable counting sort, then every (row, column slice) of the output is summed by
// exactly one task, in token order, so the result is bitwise identical across runs and thread
// counts (which thread runs a task changes nothing).

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/StringUtil.h>
#include <torch/library.h>

#include "huge_page_tensor.h"
#include "row_ops.h"

#include <algorithm>
#include <string>
#include <vector>

namespace fusedemb {
namespace {

// Work items smaller than this many elements are not worth waking another thread for.
constexpr int64_t kGrainElements = 32768;
// Column slice used to split the backward's rows into independent tasks: a hot row (one id
// repeated over the whole batch) is then one task per slice, which can go to different threads.
constexpr int64_t kColumnSlice = 256;

// Position of token n: explicit position_ids, or its index along the last dim plus the offset.
template <typename index_t>
inline int64_t position_of(const index_t* position_ids, int64_t n, int64_t seq_len, int64_t offset) {
  return position_ids != nullptr ? static_cast<int64_t>(position_ids[n]) : n % seq_len + offset;
}

// Token n's index in ids' shape, as "[i, j]": where a bad index sits, in the caller's terms
// (broadcast position_ids, expanded to ids' shape before they get here, share it).
std::string token_index(int64_t n, c10::IntArrayRef ids_shape) {
  std::vector<int64_t> index(ids_shape.size());
  for (int64_t d = static_cast<int64_t>(ids_shape.size()) - 1; d >= 0; --d) {
    index[d] = n % ids_shape[d];
    n /= ids_shape[d];
  }
  return "[" + c10::Join(", ", index) + "]";
}

// One serial pass over the indices (one per token, in ids' shape): cheap next to the N * D
// bytes the kernels move, and it turns a would-be out-of-bounds access into an IndexError in
// Python, the same one (plus the token's index) as fusedemb.validation's range check, which
// fused_embedding therefore skips for these kernels. It runs whether or not that check is
// switched off.
template <typename index_t>
void check_rows_in_range(const index_t* rows, c10::IntArrayRef ids_shape, int64_t num_rows, const char* what,
                         const char* table) {
  const int64_t count = c10::multiply_integers(ids_shape);
  for (int64_t n = 0; n < count; ++n) {
    const int64_t row = static_cast<int64_t>(rows[n]);
    TORCH_CHECK_INDEX(row >= 0 && row < num_rows, what, " contains ", row, ", outside [0, ", num_rows, ") of ", table,
                      " (", num_rows, " rows), at token ", token_index(n, ids_shape));
  }
}

// The error types are Python's, as fusedemb.validation raises them: TypeError for a dtype,
// ValueError for a shape or layout, IndexError for an index value.
void check_float_dtype(const at::Tensor& rows, const char* name) {
  const auto dtype = rows.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf, name,
                   " has dtype ", dtype, "; supported: float32, float64, bfloat16, float16");
}

void check_table(const at::Tensor& table, const char* name) {
  TORCH_CHECK_VALUE(table.dim() == 2, name, " must be 2-D (rows, dim), got shape ", table.sizes());
  check_float_dtype(table, name);
  TORCH_CHECK_VALUE(table.size(1) > 0, name, " must have an embedding dim of at least 1, got 0");
  // A dim of size 1, or a table of no rows, has no stride to respect (PyTorch leaves it arbitrary,
  // and .contiguous() keeps it).
  TORCH_CHECK_VALUE(table.size(1) == 1 || table.size(0) == 0 || table.stride(1) == 1, name,
                    " must have unit stride along dim; call .contiguous()");
}

// Either every explicit position is a row of the position table, or the default positions
// [offset, offset + seq_len) all are (written so that a huge offset cannot overflow).
template <typename index_t>
void check_positions(const index_t* position_ids, c10::IntArrayRef ids_shape, int64_t position_offset,
                     int64_t context_length) {
  const int64_t seq_len = ids_shape.back();
  if (position_ids != nullptr) {
    check_rows_in_range(position_ids, ids_shape, context_length, "position_ids", "the position table");
  } else if (c10::multiply_integers(ids_shape) > 0) {
    TORCH_CHECK_INDEX(position_offset >= 0 && seq_len <= context_length && position_offset <= context_length - seq_len,
                      "positions [", position_offset, ", ", position_offset, " + ", seq_len,
                      ") do not fit the position table of ", context_length, " rows");
  }
}

void check_ids(const at::Tensor& ids, const c10::optional<at::Tensor>& position_ids) {
  TORCH_CHECK_TYPE(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt,
                   "ids must be int32 or int64, got ", ids.scalar_type());
  TORCH_CHECK_VALUE(ids.dim() >= 1, "ids must have shape (..., T) with at least one dimension, got a 0-d tensor");
  TORCH_CHECK_VALUE(ids.is_contiguous(), "ids must be contiguous");
  if (position_ids.has_value()) {
    TORCH_CHECK_TYPE(position_ids->scalar_type() == ids.scalar_type(),
                     "position_ids must have the dtype of ids (", ids.scalar_type(), "), got ",
                     position_ids->scalar_type());
    TORCH_CHECK_VALUE(position_ids->sizes() == ids.sizes(), "position_ids must have the shape of ids ",
                      ids.sizes(), ", got ", position_ids->sizes());
    TORCH_CHECK_VALUE(position_ids->is_contiguous(), "position_ids must be contiguous");
  }
}

at::Tensor forward_cpu(const at::Tensor& ids, const at::Tensor& tok_weight, const at::Tensor& pos_weight,
                       const c10::optional<at::Tensor>& position_ids, int64_t position_offset) {
  check_ids(ids, position_ids);
  check_table(tok_weight, "tok_weight");
  check_table(pos_weight, "pos_weight");
  TORCH_CHECK_VALUE(tok_weight.size(1) == pos_weight.size(1),
                    "tok_weight and pos_weight must have the same embedding dim, got ", tok_weight.size(1), " and ",
                    pos_weight.size(1));
  TORCH_CHECK_TYPE(tok_weight.scalar_type() == pos_weight.scalar_type(), "tok_weight (", tok_weight.scalar_type(),
                   ") and pos_weight (", pos_weight.scalar_type(), ") must have the same dtype");

  const int64_t dim = tok_weight.size(1);
  const int64_t num_tokens = ids.numel();
  const int64_t seq_len = ids.size(-1);
  auto out_sizes = ids.sizes().vec();
  out_sizes.push_back(dim);
  at::Tensor out = empty_on_huge_pages(out_sizes, tok_weight.options());
  if (num_tokens == 0) {
    return out;
  }

  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "fusedemb_forward_cpu", [&] {
    const index_t* id_ptr = ids.const_data_ptr<index_t>();
    const index_t* pos_id_ptr = position_ids.has_value() ? position_ids->const_data_ptr<index_t>() : nullptr;
    check_rows_in_range(id_ptr, ids.sizes(), tok_weight.size(0), "ids", "the token table");
    check_positions(pos_id_ptr, ids.sizes(), position_offset, pos_weight.size(0));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, tok_weight.scalar_type(), "fusedemb_forward_cpu", [&] {
      const scalar_t* tok = tok_weight.const_data_ptr<scalar_t>();
      const scalar_t* pos = pos_weight.const_data_ptr<scalar_t>();
      scalar_t* dst = out.mutable_data_ptr<scalar_t>();
      const int64_t tok_stride = tok_weight.stride(0);
      const int64_t pos_stride = pos_weight.stride(0);
      const int64_t grain = std::max<int64_t>(1, kGrainElements / dim);
      at::parallel_for(0, num_tokens, grain, [&](int64_t begin, int64_t end) {
        for (int64_t n = begin; n < end; ++n) {
          const scalar_t* tok_row = tok + static_cast<int64_t>(id_ptr[n]) * tok_stride;
          const scalar_t* pos_row = pos + position_of(pos_id_ptr, n, seq_len, position_offset) * pos_stride;
          // One rounding per element, as in eager PyTorch's add of the two gathered rows.
          add_rows(tok_row, pos_row, dst + n * dim, dim);
        }
      });
    });
  });
  return out;
}

// Stable counting sort of token indices by row: tokens of row r are
// order[row_start[r] : row_start[r + 1]], in increasing token order.
struct RowGroups {
  std::vector<int64_t> row_start;
  std::vector<int64_t> order;
};

template <typename RowOf>
RowGroups group_tokens_by_row(int64_t num_tokens, int64_t num_rows, RowOf row_of) {
  RowGroups groups{std::vector<int64_t>(num_rows + 1, 0), std::vector<int64_t>(num_tokens)};
  for (int64_t n = 0; n < num_tokens; ++n) {
    ++groups.row_start[row_of(n) + 1];
  }
  for (int64_t r = 0; r < num_rows; ++r) {
    groups.row_start[r + 1] += groups.row_start[r];
  }
  std::vector<int64_t> cursor(groups.row_start.begin(), groups.row_start.end() - 1);
  for (int64_t n = 0; n < num_tokens; ++n) {
    groups.order[cursor[row_of(n)]++] = n;
  }
  return groups;
}

// grad_table[r, :] = sum of grad_rows[n, :] over the tokens n of row r, accumulated in
// opmath (float32 for 16-bit tables) in token order; rows with no token, and skip_row, are 0.
// This single routine serves both tables: the token table (rows = ids) and the position
// table (rows = positions).
//
// A task is one (row, column slice), numbered row-major; all tasks are independent and each
// output element is written by exactly one task. A task costs about (tokens + 1) * width
// element operations: add its tokens' slices, then write its slice (zeros for a row no token
// touched, most rows of a large vocabulary). Real text puts most tokens on a few frequent ids,
// which are low ids in GPT-2's vocabulary and so neighbours in this order: an even split of the
// task count gave one thread 96% of the additions for the-verdict's ids with two threads, 84%
// with eight. Each thread gets a contiguous range of tasks of equal cost instead.
// On this project's 2-core VM (gpt2-124M, B 8, cpu_backward alone, medians of five interleaved
// runs) that took 33.6 -> 31.3 ms with those ids, 33.3 -> 31.0 ms with one id everywhere, and
// left uniform ids as they were (28.9 / 27.2 ms, within the VM's noise): the additions are a
// small part of a backward that writes the whole 154 MB table, and the gain grows with threads.
template <typename scalar_t>
void sum_rows_by_group(const scalar_t* grad_rows, int64_t dim, const RowGroups& groups, int64_t skip_row,
                       scalar_t* grad_table) {
  using opmath_t = at::opmath_type<scalar_t>;
  const std::vector<int64_t>& row_start = groups.row_start;
  const int64_t num_rows = static_cast<int64_t>(row_start.size()) - 1;
  const int64_t num_slices = (dim + kColumnSlice - 1) / kColumnSlice;
  const int64_t num_tasks = num_rows * num_slices;
  // The cost of tasks [0, task): the rows before its row whole, then the slices before it of its
  // row (counted as full slices). It grows with every task, since every task costs at least 1.
  auto cost_before = [&](int64_t task) -> int64_t {
    const int64_t row = task / num_slices;
    const int64_t row_cost = row < num_rows ? row_start[row + 1] - row_start[row] + 1 : 0;
    return (row_start[row] + row) * dim + row_cost * (task % num_slices) * kColumnSlice;
  };
  auto first_task_costing = [&](int64_t target) {  // the first task with cost_before >= target
    int64_t low = 0, high = num_tasks;
    while (low < high) {
      const int64_t middle = low + (high - low) / 2;
      if (cost_before(middle) < target) {
        low = middle + 1;
      } else {
        high = middle;
      }
    }
    return low;
  };
  const int64_t total_cost = cost_before(num_tasks);  // (N + rows) * dim
  const int64_t parts = std::clamp<int64_t>(total_cost / kGrainElements, 1, at::get_num_threads());
  at::parallel_for(0, parts, 1, [&](int64_t part_begin, int64_t part_end) {
    std::vector<opmath_t> acc(kColumnSlice);
    const int64_t task_end = first_task_costing(total_cost * part_end / parts);
    for (int64_t task = first_task_costing(total_cost * part_begin / parts); task < task_end; ++task) {
      const int64_t row = task / num_slices;
      const int64_t col0 = (task % num_slices) * kColumnSlice;
      const int64_t width = std::min(kColumnSlice, dim - col0);
      scalar_t* dst = grad_table + row * dim + col0;
      const int64_t first = row_start[row];
      const int64_t last = row_start[row + 1];
      if (row == skip_row || first == last) {
        std::fill(dst, dst + width, scalar_t(0));  // most rows of a large vocabulary
        continue;
      }
      std::fill(acc.begin(), acc.begin() + width, opmath_t(0));
      for (int64_t k = first; k < last; ++k) {
        accumulate_row(acc.data(), grad_rows + groups.order[k] * dim + col0, width);
      }
      round_row(acc.data(), dst, width);
    }
  });
}

// A table whose gradient is not needed (tok_needs_grad / pos_needs_grad false: a frozen table)
// gets an empty [0, dim] tensor and none of the work.
std::tuple<at::Tensor, at::Tensor> backward_cpu(const at::Tensor& grad_out, const at::Tensor& ids,
                                                const c10::optional<at::Tensor>& position_ids,
                                                int64_t position_offset, int64_t num_embeddings,
                                                int64_t context_length, int64_t padding_idx, bool tok_needs_grad,
                                                bool pos_needs_grad) {
  check_ids(ids, position_ids);
  check_float_dtype(grad_out, "grad_out");
  TORCH_CHECK_VALUE(grad_out.is_contiguous(), "grad_out must be contiguous");
  TORCH_CHECK_VALUE(grad_out.dim() == ids.dim() + 1 && grad_out.sizes().slice(0, ids.dim()) == ids.sizes(),
                    "grad_out must have shape ids.shape + (dim,), got ", grad_out.sizes(), " for ids of shape ",
                    ids.sizes());
  TORCH_CHECK_VALUE(grad_out.size(-1) > 0, "grad_out must have an embedding dim of at least 1, got 0");
  const int64_t dim = grad_out.size(-1);
  const int64_t num_tokens = ids.numel();
  const int64_t seq_len = ids.size(-1);
  TORCH_CHECK_VALUE(num_embeddings >= 0 && context_length >= 0,
                    "the tables cannot have a negative number of rows, got ", num_embeddings, " and ", context_length);
  // No row index -1 exists, so skip_row == -1 skips nothing.
  TORCH_CHECK_VALUE(padding_idx >= -1 && padding_idx < num_embeddings, "padding_idx must be -1 (none) or in [0, ",
                    num_embeddings, "), got ", padding_idx);
  at::Tensor grad_tok = empty_on_huge_pages({tok_needs_grad ? num_embeddings : 0, dim}, grad_out.options());
  at::Tensor grad_pos = empty_on_huge_pages({pos_needs_grad ? context_length : 0, dim}, grad_out.options());

  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "fusedemb_backward_cpu", [&] {
    const index_t* id_ptr = ids.const_data_ptr<index_t>();
    const index_t* pos_id_ptr = position_ids.has_value() ? position_ids->const_data_ptr<index_t>() : nullptr;
    check_rows_in_range(id_ptr, ids.sizes(), num_embeddings, "ids", "the token table");
    check_positions(pos_id_ptr, ids.sizes(), position_offset, context_length);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad_out.scalar_type(), "fusedemb_backward_cpu", [&] {
      const scalar_t* grad_rows = grad_out.const_data_ptr<scalar_t>();
      if (tok_needs_grad) {
        const RowGroups by_id = group_tokens_by_row(num_tokens, num_embeddings, [&](int64_t n) {
          return static_cast<int64_t>(id_ptr[n]);
        });
        sum_rows_by_group(grad_rows, dim, by_id, padding_idx, grad_tok.mutable_data_ptr<scalar_t>());
      }
      if (pos_needs_grad) {
        const RowGroups by_position = group_tokens_by_row(num_tokens, context_length, [&](int64_t n) {
          return position_of(pos_id_ptr, n, seq_len, position_offset);
        });
        sum_rows_by_group(grad_rows, dim, by_position, /*skip_row=*/-1, grad_pos.mutable_data_ptr<scalar_t>());
      }
    });
  });
  return {grad_tok, grad_pos};
}

}  // namespace

TORCH_LIBRARY(fusedemb, m) {
  m.def("cpu_forward(Tensor ids, Tensor tok_weight, Tensor pos_weight, Tensor? position_ids, "
        "SymInt position_offset) -> Tensor");
  m.def("cpu_backward(Tensor grad_out, Tensor ids, Tensor? position_ids, SymInt position_offset, "
        "SymInt num_embeddings, SymInt context_length, int padding_idx, *, bool tok_needs_grad=True, "
        "bool pos_needs_grad=True) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fusedemb, CPU, m) {
  m.impl("cpu_forward", &forward_cpu);
  m.impl("cpu_backward", &backward_cpu);
}

}  // namespace fusedemb

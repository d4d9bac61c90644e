#pragma once
/// @file
/// The tiled attention kernel: softmax(scale·Q·Kᵀ + bias, masked)·V computed one query
/// block × key block tile at a time with an online softmax (a running row maximum and
/// row sum, rescaling the partial output as the maximum grows), so the n_q×n_k score
/// matrix never exists. This is FlashAttention's algorithm (Dao et al. 2022, "FlashAttention:
/// Fast and Memory-Efficient Exact Attention with IO-Awareness"; the online softmax is
/// Milakov & Gimelshein 2018) on Eigen, for the CPU.
///
/// Same options, semantics and results as the reference path in attention.hpp (scale,
/// bottom-right causal, keep-mask, bias, key padding, sliding window, fully masked rows →
/// zeros), plus: several heads side by side as column blocks, grouped-query attention,
/// per-row log-sum-exp, threads, and compile-time score and mask modifiers.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include <Eigen/Core>

#include "detail/eigen_types.hpp"
#include "detail/parallel.hpp"
#include "error.hpp"
#include "mask.hpp"
#include "merge.hpp"
#include "options.hpp"
#include "scores.hpp"
#include "softmax.hpp"

namespace attn {

/// How many heads sit side by side in the columns of q, k and v: q is n_q×(H·d_k), k is
/// n_k×(H_kv·d_k), v is n_k×(H_kv·d_v), head h in columns [h·d, (h+1)·d), the layout a
/// projection produces (and PyTorch's (N, E) before its reshape). Query head h reads K/V
/// head h / (H / H_kv): H_kv = H is multi-head, 1 < H_kv < H grouped-query, H_kv = 1
/// multi-query attention.
struct Heads {
  Eigen::Index num_heads = 1;
  Eigen::Index num_kv_heads = 1;
};

/// The identity score modifier: leaves each scaled score as it is.
struct NoScoreMod {
  static constexpr bool is_identity = true;
  template <typename Scalar>
  Scalar operator()(Scalar score, Eigen::Index /*query*/, Eigen::Index /*key*/, Eigen::Index /*head*/) const noexcept {
    return score;
  }
};

/// The identity mask modifier: keeps every key.
struct NoMaskMod {
  static constexpr bool is_identity = true;
  bool operator()(Eigen::Index /*query*/, Eigen::Index /*key*/, Eigen::Index /*head*/) const noexcept { return true; }
};

/// Compile-time hooks into the tile loop, in the spirit of PyTorch's FlexAttention:
/// `score_mod(score, query, key, head)` returns the score to use in place of
/// scale·q·k + bias (ALiBi, soft-capping, relative biases), and `mask_mod(query, key, head)`
/// returns false to mask a key. Both are inlined; neither needs an n_q×n_k matrix. Indices
/// are global: query in [0, n_q), key in [0, n_k), head in [0, H).
template <typename ScoreMod = NoScoreMod, typename MaskMod = NoMaskMod>
struct Mods {
  ScoreMod score_mod{};
  MaskMod mask_mod{};
};
template <typename ScoreMod, typename MaskMod>
Mods(ScoreMod, MaskMod) -> Mods<ScoreMod, MaskMod>;

/// Default tile sizes. Eigen packs each product's operands into buffers it keeps on the
/// stack up to EIGEN_STACK_ALLOCATION_LIMIT (128 KiB) and on the heap beyond, so the tiles
/// are sized to keep every packed operand within it: then no tile product allocates, and a
/// loop that reuses its workspace allocates nothing (tests/test_no_malloc.cpp). Within that
/// bound, larger tiles won on Zen 4 (benchmarks/): a key block re-packs the query block it
/// meets, and each product pays Eigen's fixed overhead. Hence 128 queries (64 in double)
/// against 512 keys for d ≤ 64, fewer for wider heads; the weights · values product runs
/// in slices of `pack_limit / block_q` keys. Explicit sizes are the template arguments of
/// `flash_attention_into<BlockQ, BlockK>(…)`.
template <typename Scalar>
inline constexpr Eigen::Index pack_limit = EIGEN_STACK_ALLOCATION_LIMIT / sizeof(Scalar);

template <typename Scalar>
inline constexpr Eigen::Index default_block_q = pack_limit<Scalar> / 256;

template <typename Scalar>
constexpr Eigen::Index default_block_k(Eigen::Index head_width) noexcept {
  return std::clamp<Eigen::Index>(pack_limit<Scalar> / std::max<Eigen::Index>(head_width, 1), 16, 512);
}

/// With a single query block (decoding: few queries over a long cache) the keys are split
/// into chunks of this many, computed independently and merged in order. The split
/// depends only on the problem, never on the thread count, so results stay bitwise
/// identical however many threads run.
inline constexpr Eigen::Index split_key_chunk = 1024;

namespace detail {

template <typename Mod, typename = void>
struct is_identity_mod : std::false_type {};
template <typename Mod>
struct is_identity_mod<Mod, std::void_t<decltype(Mod::is_identity)>> : std::bool_constant<Mod::is_identity> {};

template <typename Scalar>
using RowMajorDynamic = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// One thread's scratch for one query block: everything a tile pass writes.
template <typename Scalar>
struct FlashSlot {
  Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic> queries;  // (block_q × d_k), scaled
  // The score tile, (block_q × block_k) with a row stride fixed per call (see
  // `score_stride`): flat storage, so that a slot grown by an earlier, wider call does not
  // change where rows start, and with it which entries Eigen computes with SIMD.
  Eigen::Matrix<Scalar, Eigen::Dynamic, 1> score_storage;
  RowMajorDynamic<Scalar> accumulator;  // (block_q × d_v), unnormalised output
  Eigen::Matrix<Scalar, Eigen::Dynamic, 1> row_max;
  Eigen::Matrix<Scalar, Eigen::Dynamic, 1> row_sum;
  std::size_t tiles = 0;  // tiles computed in the last call
};

/// Grows `matrix` to at least rows×cols; never shrinks, so reuse never reallocates.
template <typename Matrix>
void grow_to(Matrix& matrix, Eigen::Index rows, Eigen::Index cols) {
  if (matrix.rows() < rows || matrix.cols() < cols) {
    matrix.resize(std::max(rows, matrix.rows()), std::max(cols, matrix.cols()));
  }
}

}  // namespace detail

/// Scratch for the tiled kernel, reusable across calls: per-thread tiles, and the partial
/// results of a key split. It grows to the largest problem it has seen and never shrinks,
/// so a loop of calls allocates on the first call only. Nothing in it is proportional to
/// n_q×n_k. Not safe to share between calls running at the same time.
template <typename Scalar>
class Workspace {
 public:
  /// Bytes of scratch held now.
  std::size_t bytes() const noexcept {
    std::size_t scalars = static_cast<std::size_t>(partial_out.size() + partial_lse.size() + lse.size());
    for (const auto& slot : slots) {
      scalars += static_cast<std::size_t>(slot.queries.size() + slot.score_storage.size() +
                                          slot.accumulator.size() + slot.row_max.size() + slot.row_sum.size());
    }
    return scalars * sizeof(Scalar);
  }

  /// Score tiles computed by the last call, summed over threads: a deterministic count of
  /// the work done, which shows masked tiles being skipped.
  std::size_t tiles_computed() const noexcept {
    std::size_t tiles = 0;
    for (const auto& slot : slots) tiles += slot.tiles;
    return tiles;
  }

  // The kernel's scratch (an implementation detail; do not rely on its layout).
  std::vector<detail::FlashSlot<Scalar>> slots;
  detail::RowMajorDynamic<Scalar> partial_out;  // (chunks·H·n_q × d_v) for a key split
  Eigen::Matrix<Scalar, Eigen::Dynamic, 1> partial_lse;
  detail::RowMajorDynamic<Scalar> lse;          // (n_q × H) when the caller wants none
};

using Workspacef = Workspace<float>;
using Workspaced = Workspace<double>;

namespace detail {

/// Everything one call's tile passes read.
template <typename Scalar, typename DerivedQ, typename DerivedK, typename DerivedV, typename ScoreMod,
          typename MaskMod>
struct FlashProblem {
  const Eigen::MatrixBase<DerivedQ>& q;
  const Eigen::MatrixBase<DerivedK>& k;
  const Eigen::MatrixBase<DerivedV>& v;
  const AttentionOptions<Scalar>& options;
  const ScoreMod& score_mod;
  const MaskMod& mask_mod;
  KeyBand band;
  Scalar scale;
  Eigen::Index d_k;
  Eigen::Index d_v;
  Eigen::Index heads_per_kv_head;
  Eigen::Index block_k;
  Eigen::Index score_stride;
};

/// The score tile's row stride: block_k rounded up to 64 bytes, so that every row starts
/// equally aligned in every slot and every call. Eigen handles a row's unaligned head and
/// tail one scalar at a time, with std::exp and in another summation order than its SIMD
/// body; with rows placed alike, each row is computed alike, and results stay bitwise
/// identical whatever the thread count or the workspace's history.
template <typename Scalar>
constexpr Eigen::Index score_stride(Eigen::Index block_k) noexcept {
  constexpr Eigen::Index per_line = std::max<Eigen::Index>(1, 64 / static_cast<Eigen::Index>(sizeof(Scalar)));
  return (block_k + per_line - 1) / per_line * per_line;
}

/// The rows of one query block: `heads` consecutive query heads from `first_head`, all of
/// one KV head, each with queries [first_query, first_query + queries). Row r of the block
/// is query first_query + r % queries of head first_head + r / queries. Several heads share
/// a block when grouped-query attention has few queries (decoding): then each key and value
/// tile is read once for the whole group instead of once per query head.
struct QueryBlock {
  Eigen::Index first_head;
  Eigen::Index heads;
  Eigen::Index first_query;
  Eigen::Index queries;

  Eigen::Index rows() const noexcept { return heads * queries; }
  Eigen::Index head_of(Eigen::Index row) const noexcept { return first_head + row / queries; }
  Eigen::Index query_of(Eigen::Index row) const noexcept { return first_query + row % queries; }
};

/// Attends the rows of `block` to keys [key_begin, key_end), leaving the unnormalised
/// output, row maxima and row sums in `slot`.
template <typename Problem, typename Scalar>
void attend_query_block(const Problem& problem, FlashSlot<Scalar>& slot, const QueryBlock& block,
                        Eigen::Index key_begin, Eigen::Index key_end) {
  using ScoreMod = std::decay_t<decltype(problem.score_mod)>;
  using MaskMod = std::decay_t<decltype(problem.mask_mod)>;
  constexpr Scalar minus_infinity = -std::numeric_limits<Scalar>::infinity();
  const Eigen::Index d_k = problem.d_k;
  const Eigen::Index d_v = problem.d_v;
  const Eigen::Index kv_head = block.first_head / problem.heads_per_kv_head;
  const KeyBand& band = problem.band;
  const Eigen::Index rows = block.rows();
  const Eigen::Index first_query = block.first_query;
  const Eigen::Index last_query = first_query + block.queries - 1;

  // queries: (rows × d_k), scaled once per block rather than once per score. A copy,
  // because a scaled view would make Eigen evaluate a temporary (an allocation) when a
  // single query row turns the tile product into a matrix-vector product; column-major like
  // Eigen's default, so that copying from a column-major q is a vectorised copy.
  auto queries = slot.queries.topLeftCorner(rows, d_k);
  for (Eigen::Index h = 0; h < block.heads; ++h) {
    queries.middleRows(h * block.queries, block.queries).noalias() =
        problem.scale * problem.q.block(first_query, (block.first_head + h) * d_k, block.queries, d_k);
  }
  // accumulator: (rows × d_v)
  auto accumulator = slot.accumulator.topLeftCorner(rows, d_v);
  accumulator.setZero();
  auto row_max = slot.row_max.head(rows);
  auto row_sum = slot.row_sum.head(rows);
  row_max.setConstant(minus_infinity);
  row_sum.setZero();

  // Only keys some row of the block may attend: the tiles outside the causal diagonal,
  // the window or the key padding are never computed.
  const Eigen::Index keys_from = std::max(key_begin, band.key_first(first_query));
  const Eigen::Index keys_to = std::min(key_end, band.key_end(last_query));
  const Eigen::Index block_k = problem.block_k;
  for (Eigen::Index first_key = keys_from; first_key < keys_to; first_key += block_k) {
    const Eigen::Index cols = std::min(block_k, keys_to - first_key);
    ++slot.tiles;
    // Whether every row of the tile may attend every key of it, band-wise.
    const bool inside_band = band.key_first(last_query) <= first_key && band.key_end(first_query) >= first_key + cols;
    // scores: (rows × cols)
    Eigen::Map<RowMajorDynamic<Scalar>, Eigen::Unaligned, Eigen::OuterStride<>> scores(
        slot.score_storage.data(), rows, cols, Eigen::OuterStride<>(problem.score_stride));
    scores.noalias() = queries * problem.k.block(first_key, kv_head * d_k, cols, d_k).transpose();

    for (Eigen::Index r = 0; r < rows; ++r) {
      const Eigen::Index query = block.query_of(r);
      const Eigen::Index head = block.head_of(r);
      auto score_row = scores.row(r);
      if (!problem.options.bias.empty()) score_row += problem.options.bias.map().block(query, first_key, 1, cols);
      if constexpr (!is_identity_mod<ScoreMod>::value) {
        for (Eigen::Index c = 0; c < cols; ++c) {
          score_row(c) = problem.score_mod(score_row(c), query, first_key + c, head);
        }
      }
      if (!inside_band) {
        const Eigen::Index keep_from = std::clamp<Eigen::Index>(band.key_first(query) - first_key, 0, cols);
        const Eigen::Index keep_to = std::clamp<Eigen::Index>(band.key_end(query) - first_key, keep_from, cols);
        score_row.head(keep_from).setConstant(minus_infinity);
        score_row.tail(cols - keep_to).setConstant(minus_infinity);
      }
      if (!problem.options.mask.empty()) {
        for (Eigen::Index c = 0; c < cols; ++c) {
          if (!problem.options.mask(query, first_key + c)) score_row(c) = minus_infinity;
        }
      }
      if constexpr (!is_identity_mod<MaskMod>::value) {
        for (Eigen::Index c = 0; c < cols; ++c) {
          if (!problem.mask_mod(query, first_key + c, head)) score_row(c) = minus_infinity;
        }
      }

      // The online softmax: a new maximum rescales what was summed so far, once per row
      // per tile.
      const Scalar new_max = std::max(row_max(r), score_row.maxCoeff());
      if (new_max == minus_infinity) {
        score_row.setZero();  // nothing attended yet: this tile adds nothing
        continue;
      }
      const Scalar correction = row_max(r) == minus_infinity ? Scalar(0) : std::exp(row_max(r) - new_max);
      score_row.array() = exp_of_shifted(score_row.array() - new_max);
      row_sum(r) = row_sum(r) * correction + score_row.sum();
      if (correction != Scalar(1)) accumulator.row(r) *= correction;
      row_max(r) = new_max;
    }
    // accumulator += weights · values: (rows × cols)·(cols × d_v), in slices of keys that
    // keep Eigen's packed copy of the weights within its stack limit
    const Eigen::Index slice = std::max<Eigen::Index>(16, pack_limit<Scalar> / rows);
    for (Eigen::Index first = 0; first < cols; first += slice) {
      const Eigen::Index count = std::min(slice, cols - first);
      accumulator.noalias() +=
          scores.middleCols(first, count) * problem.v.block(first_key + first, kv_head * d_v, count, d_v);
    }
  }
}

/// Normalises the accumulated rows into `out` (rows × d_v) and their log-sum-exp into
/// `lse` (rows): a row that attended nothing gets zeros and −∞.
template <typename Scalar, typename Out, typename Lse>
void finish_query_block(FlashSlot<Scalar>& slot, Eigen::Index first_row, Eigen::Index rows, Eigen::Index d_v, Out&& out,
                        Lse&& lse) {
  auto row_sum = slot.row_sum.segment(first_row, rows);
  for (Eigen::Index r = 0; r < rows; ++r) {
    const Scalar sum = row_sum(r);
    lse(r) = sum > Scalar(0) ? slot.row_max(first_row + r) + std::log(sum) : -std::numeric_limits<Scalar>::infinity();
    // A row that attended nothing has a zero accumulator: dividing by 1 keeps it zero.
    row_sum(r) = sum > Scalar(0) ? Scalar(1) / sum : Scalar(1);
  }
  // One assignment, so Eigen walks `out` in its own storage order: row by row, a
  // column-major output is written with a stride of n_q and thrashes the cache.
  out.noalias() = row_sum.asDiagonal() * slot.accumulator.block(first_row, 0, rows, d_v);
}

inline std::string count_string(const char* what, Eigen::Index value) {
  return std::string(what) + " = " + std::to_string(value);
}

template <typename DerivedQ, typename DerivedK, typename DerivedV, typename Scalar>
void check_flash(const char* operation, const Eigen::MatrixBase<DerivedQ>& q, const Eigen::MatrixBase<DerivedK>& k,
                 const Eigen::MatrixBase<DerivedV>& v, Heads heads, const AttentionOptions<Scalar>& options) {
  require_floating_point<Scalar>();
  require_same_scalar<DerivedQ, DerivedK, DerivedV>();
  static_assert(std::is_same_v<typename DerivedQ::Scalar, Scalar>,
                "attn::flash_attention: the options must have the operands' scalar type");
  static_assert(extents_compatible(DerivedK::RowsAtCompileTime, DerivedV::RowsAtCompileTime),
                "attn::flash_attention: k and v must have the same number of rows (one per key)");
  if (heads.num_heads < 1 || heads.num_kv_heads < 1 || heads.num_heads % heads.num_kv_heads != 0) {
    throw_invalid_argument(std::string(operation) + ": num_heads must be a positive multiple of num_kv_heads, got " +
                           count_string("num_heads", heads.num_heads) + ", " +
                           count_string("num_kv_heads", heads.num_kv_heads));
  }
  if (q.cols() % heads.num_heads != 0) {
    throw_dimension_error(std::string(operation) + ": q has " + std::to_string(q.cols()) +
                          " columns, not a multiple of num_heads = " + std::to_string(heads.num_heads) + " (q is " +
                          shape_string(q.rows(), q.cols()) + ")");
  }
  const Eigen::Index d_k = q.cols() / heads.num_heads;
  if (k.cols() != heads.num_kv_heads * d_k) {
    throw_dimension_error(std::string(operation) + ": k has " + std::to_string(k.cols()) + " columns but must have " +
                          "num_kv_heads x d_k = " + std::to_string(heads.num_kv_heads) + " x " + std::to_string(d_k) +
                          " (q is " + shape_string(q.rows(), q.cols()) + ", k is " + shape_string(k.rows(), k.cols()) +
                          ")");
  }
  if (v.cols() % heads.num_kv_heads != 0) {
    throw_dimension_error(std::string(operation) + ": v has " + std::to_string(v.cols()) +
                          " columns, not a multiple of num_kv_heads = " + std::to_string(heads.num_kv_heads) +
                          " (v is " + shape_string(v.rows(), v.cols()) + ")");
  }
  require_extents_match(operation, operand("k", k), Extent::rows, operand("v", v), Extent::rows);
  validate_options(operation, options, q.rows(), k.rows());
  require_defined_scale(operation, options, d_k);
}

/// Gives `workspace` at least `threads` slots, each sized for block_q × block_k tiles of
/// heads d_k wide (queries) and d_v wide (values).
template <typename Scalar>
void reserve_slots(Workspace<Scalar>& workspace, int threads, Eigen::Index block_q, Eigen::Index block_k,
                   Eigen::Index d_k, Eigen::Index d_v) {
  if (workspace.slots.size() < static_cast<std::size_t>(threads)) workspace.slots.resize(static_cast<std::size_t>(threads));
  for (auto& slot : workspace.slots) {
    grow_to(slot.queries, block_q, d_k);
    grow_to(slot.score_storage, block_q * score_stride<Scalar>(block_k), 1);
    grow_to(slot.accumulator, block_q, d_v);
    grow_to(slot.row_max, block_q, 1);
    grow_to(slot.row_sum, block_q, 1);
  }
}

/// The driver: splits the problem into independent work items (head × query block, or
/// head × key chunk when there is a single query block), runs them over the threads, and
/// merges key chunks in a fixed order.
template <int BlockQ, int BlockK, typename DerivedQ, typename DerivedK, typename DerivedV, typename Scalar,
          typename ScoreMod, typename MaskMod, typename Out, typename Lse>
void flash_attention_unchecked(const Eigen::MatrixBase<DerivedQ>& q, const Eigen::MatrixBase<DerivedK>& k,
                               const Eigen::MatrixBase<DerivedV>& v, Heads heads,
                               const AttentionOptions<Scalar>& options, const Mods<ScoreMod, MaskMod>& mods, Out& out,
                               Lse& lse, Workspace<Scalar>& workspace) {
  static_assert(BlockQ >= 0 && BlockK >= 0, "attn::flash_attention: tile sizes must be positive (or 0 for the default)");
  constexpr Eigen::Index block_q = BlockQ > 0 ? BlockQ : default_block_q<Scalar>;
  const Eigen::Index n_q = q.rows();
  const Eigen::Index n_k = k.rows();
  const Eigen::Index num_heads = heads.num_heads;
  const Eigen::Index d_k = q.cols() / num_heads;
  const Eigen::Index d_v = v.cols() / heads.num_kv_heads;
  const Scalar scale = options.scale ? *options.scale : default_scale<Scalar>(d_k);
  const Eigen::Index block_k = BlockK > 0 ? BlockK : default_block_k<Scalar>(std::max(d_k, d_v));
  const FlashProblem<Scalar, DerivedQ, DerivedK, DerivedV, ScoreMod, MaskMod> problem{
      q, k, v, options, mods.score_mod, mods.mask_mod, KeyBand(options, n_q, n_k), scale, d_k, d_v,
      num_heads / heads.num_kv_heads, block_k, score_stride<Scalar>(block_k)};

  for (auto& slot : workspace.slots) slot.tiles = 0;
  if (n_q == 0) return;

  const Eigen::Index query_blocks = (n_q + block_q - 1) / block_q;
  const Eigen::Index key_from = problem.band.key_first(0);
  const Eigen::Index key_span = std::max<Eigen::Index>(0, problem.band.key_end(n_q - 1) - key_from);
  const Eigen::Index key_chunks =
      query_blocks == 1 ? std::max<Eigen::Index>(1, (key_span + split_key_chunk - 1) / split_key_chunk) : 1;

  // With a single query block, the query heads of a group share their block when they fit:
  // one pass over their KV head's keys and values serves them all.
  const Eigen::Index group = num_heads / heads.num_kv_heads;
  const Eigen::Index heads_per_block = query_blocks == 1 && group * n_q <= block_q ? group : 1;
  const Eigen::Index head_blocks = num_heads / heads_per_block;
  const auto query_block = [&](Eigen::Index head_block, Eigen::Index first_query, Eigen::Index queries) {
    return QueryBlock{head_block * heads_per_block, heads_per_block, first_query, queries};
  };

  // No more threads (and scratch slots) than there are work items.
  const Eigen::Index items = head_blocks * (key_chunks == 1 ? query_blocks : key_chunks);
  const int threads = static_cast<int>(std::min<Eigen::Index>(resolve_thread_count(options.num_threads), items));
  reserve_slots(workspace, threads, block_q, block_k, d_k, d_v);

  if (key_chunks == 1) {
    parallel_for(items, threads, [&](Eigen::Index item, int thread) {
      auto& slot = workspace.slots[static_cast<std::size_t>(thread)];
      const Eigen::Index first_query = (item % query_blocks) * block_q;
      const QueryBlock block =
          query_block(item / query_blocks, first_query, std::min<Eigen::Index>(block_q, n_q - first_query));
      attend_query_block(problem, slot, block, 0, n_k);
      for (Eigen::Index h = 0; h < block.heads; ++h) {
        const Eigen::Index head = block.first_head + h;
        finish_query_block(slot, h * block.queries, block.queries, d_v,
                           out.block(first_query, head * d_v, block.queries, d_v),
                           lse.col(head).segment(first_query, block.queries));
      }
    });
    return;
  }

  // A key split: chunk c of head h lands in rows [(h·chunks + c)·n_q, …) of the partials.
  grow_to(workspace.partial_out, num_heads * key_chunks * n_q, d_v);
  grow_to(workspace.partial_lse, num_heads * key_chunks * n_q, 1);
  parallel_for(items, threads, [&](Eigen::Index item, int thread) {
    auto& slot = workspace.slots[static_cast<std::size_t>(thread)];
    const Eigen::Index chunk = item % key_chunks;
    const Eigen::Index chunk_begin = key_from + chunk * split_key_chunk;
    const Eigen::Index chunk_end = std::min(chunk_begin + split_key_chunk, key_from + key_span);
    const QueryBlock block = query_block(item / key_chunks, 0, n_q);
    attend_query_block(problem, slot, block, chunk_begin, chunk_end);
    for (Eigen::Index h = 0; h < block.heads; ++h) {
      const Eigen::Index first_row = ((block.first_head + h) * key_chunks + chunk) * n_q;
      finish_query_block(slot, h * n_q, n_q, d_v, workspace.partial_out.block(first_row, 0, n_q, d_v),
                         workspace.partial_lse.segment(first_row, n_q));
    }
  });
  parallel_for(num_heads, threads, [&](Eigen::Index head, int /*thread*/) {
    auto head_out = out.block(0, head * d_v, n_q, d_v);
    auto head_lse = lse.col(head).head(n_q);
    const Eigen::Index first_row = head * key_chunks * n_q;
    head_out = workspace.partial_out.block(first_row, 0, n_q, d_v);
    head_lse = workspace.partial_lse.segment(first_row, n_q);
    for (Eigen::Index chunk = 1; chunk < key_chunks; ++chunk) {
      merge_into(head_out, head_lse, workspace.partial_out.block(first_row + chunk * n_q, 0, n_q, d_v),
                 workspace.partial_lse.segment(first_row + chunk * n_q, n_q));
    }
  });
}

}  // namespace detail

/// Tiled attention written into caller storage, heads side by side (see `Heads`):
/// `out` is n_q×(H·d_v); `lse`, n_q×H, receives each row's natural log-sum-exp of its
/// (scaled, biased, modified, masked) scores, −∞ for a row that attends nothing. The
/// workspace is reused across calls; with it and `out`/`lse` already sized, the call
/// allocates nothing (with the default tiles, for heads up to d = 256). `out` and `lse`
/// must not alias an input. An exception thrown by a modifier propagates from the call
/// once all threads have stopped; `out` is then unspecified.
template <int BlockQ = 0, int BlockK = 0, typename DerivedQ, typename DerivedK,
          typename DerivedV, typename Out, typename Lse, typename ScoreMod = NoScoreMod, typename MaskMod = NoMaskMod>
void flash_attention_into(const Eigen::MatrixBase<DerivedQ>& q, const Eigen::MatrixBase<DerivedK>& k,
                          const Eigen::MatrixBase<DerivedV>& v, Heads heads,
                          const AttentionOptions<typename DerivedQ::Scalar>& options, Out&& out, Lse&& lse,
                          Workspace<typename DerivedQ::Scalar>& workspace, const Mods<ScoreMod, MaskMod>& mods = {}) {
  constexpr const char* operation = "attn::flash_attention_into";
  detail::require_writable<Out>();
  detail::require_writable<Lse>();
  detail::check_flash(operation, q, k, v, heads, options);
  detail::fit_output(operation, "out", out, q.rows(), v.cols() / heads.num_kv_heads * heads.num_heads);
  detail::fit_output(operation, "lse", lse, q.rows(), heads.num_heads);
  detail::flash_attention_unchecked<BlockQ, BlockK>(q, k, v, heads, options, mods, out, lse, workspace);
}

/// Tiled attention into caller storage, without the log-sum-exp.
template <int BlockQ = 0, int BlockK = 0, typename DerivedQ, typename DerivedK,
          typename DerivedV, typename Out, typename ScoreMod = NoScoreMod, typename MaskMod = NoMaskMod>
void flash_attention_into(const Eigen::MatrixBase<DerivedQ>& q, const Eigen::MatrixBase<DerivedK>& k,
                          const Eigen::MatrixBase<DerivedV>& v, Heads heads,
                          const AttentionOptions<typename DerivedQ::Scalar>& options, Out&& out,
                          Workspace<typename DerivedQ::Scalar>& workspace, const Mods<ScoreMod, MaskMod>& mods = {}) {
  constexpr const char* operation = "attn::flash_attention_into";
  detail::require_writable<Out>();
  detail::check_flash(operation, q, k, v, heads, options);
  detail::fit_output(operation, "out", out, q.rows(), v.cols() / heads.num_kv_heads * heads.num_heads);
  detail::grow_to(workspace.lse, q.rows(), heads.num_heads);
  auto lse = workspace.lse.topLeftCorner(q.rows(), heads.num_heads);
  detail::flash_attention_unchecked<BlockQ, BlockK>(q, k, v, heads, options, mods, out, lse, workspace);
}

/// Tiled attention of several heads as a new n_q×(H·d_v) matrix (allocates its output
/// and a workspace; loops should keep both and call `flash_attention_into`).
template <int BlockQ = 0, int BlockK = 0, typename DerivedQ, typename DerivedK,
          typename DerivedV, typename ScoreMod = NoScoreMod, typename MaskMod = NoMaskMod>
auto flash_attention(const Eigen::MatrixBase<DerivedQ>& q, const Eigen::MatrixBase<DerivedK>& k,
                     const Eigen::MatrixBase<DerivedV>& v, Heads heads,
                     const AttentionOptions<typename DerivedQ::Scalar>& options = {},
                     const Mods<ScoreMod, MaskMod>& mods = {}) {
  using Scalar = typename DerivedQ::Scalar;
  detail::plain_matrix<Scalar, DerivedQ::RowsAtCompileTime, Eigen::Dynamic> out;
  Workspace<Scalar> workspace;
  flash_attention_into<BlockQ, BlockK>(q, k, v, heads, options, out, workspace, mods);
  return out;
}

/// Tiled attention of one head as a new n_q×d_v matrix: the same result as
/// `attention(q, k, v, options)`'s reference path, without the n_q×n_k matrix.
template <int BlockQ = 0, int BlockK = 0, typename DerivedQ, typename DerivedK,
          typename DerivedV>
auto flash_attention(const Eigen::MatrixBase<DerivedQ>& q, const Eigen::MatrixBase<DerivedK>& k,
                     const Eigen::MatrixBase<DerivedV>& v,
                     const AttentionOptions<typename DerivedQ::Scalar>& options = {}) {
  using Scalar = typename DerivedQ::Scalar;
  detail::plain_matrix<Scalar, DerivedQ::RowsAtCompileTime, DerivedV::ColsAtCompileTime> out(q.rows(), v.cols());
  Workspace<Scalar> workspace;
  flash_attention_into<BlockQ, BlockK>(q, k, v, Heads{}, options, out, workspace);
  return out;
}

}  // namespace attn

#pragma once
/// @file
/// The tiled kernel's decisions as a value: from the shape of a problem (queries, keys,
/// heads, the band of keys the masks leave, threads, tile sizes) to a `TilePlan` of query
/// blocks, key chunks, work items, threads and scratch sizes. Every decision about tiles
/// and their split over threads is made here, once, by `plan_tiles`; the forward kernel
/// executes a plan, and a caller sizing a workspace ahead of time (a decode loop) reserves
/// one (`Workspace::reserve`).

#include <algorithm>
#include <cstddef>

#include <Eigen/Core>

#include "../mods.hpp"

namespace attn {

/// Default tile sizes. A key tile is packed (tile_products.hpp) or, for a q8_0 store,
/// dequantised for Eigen's products once per query block that meets it, so a taller query
/// block packs each key less often: 256 query rows (128 in double) measured 1.05-1.09×
/// the GFLOP/s of 128 without a mask on Zen 4 (d = 64 and 128, N = 1024-4096, best of 24
/// runs of each), 512 1.1×, but a causal mask, whose diagonal tiles are partly masked,
/// lost 3% at N = 1024 with 256 rows and 17% with 512. Key tiles hold `pack_limit` scalars
/// (128 KiB: 512 keys for d ≤ 64, fewer for wider heads), which is also the bound within
/// which Eigen packs a product's operand on the stack (EIGEN_STACK_ALLOCATION_LIMIT): a
/// q8_0 store's tiles take Eigen's products, which allocate nothing then, and their
/// weights · values product runs in slices of `pack_limit / block_q` keys for the same
/// reason (tests/test_no_malloc.cpp). Explicit sizes are the template arguments of
/// `flash_attention_into<BlockQ, BlockK>(…)`.
template <typename Scalar>
inline constexpr Eigen::Index pack_limit = EIGEN_STACK_ALLOCATION_LIMIT / sizeof(Scalar);

template <typename Scalar>
inline constexpr Eigen::Index default_block_q = pack_limit<Scalar> / 128;

template <typename Scalar>
constexpr Eigen::Index default_block_k(Eigen::Index head_width) noexcept {
  return std::clamp<Eigen::Index>(pack_limit<Scalar> / std::max<Eigen::Index>(head_width, 1), 16, 512);
}

/// With a single query block (decoding: few queries over a long cache) the keys are split
/// into chunks of this many, computed independently and merged in order. The split
/// depends only on the problem, never on the thread count, so results stay bitwise
/// identical however many threads run.
inline constexpr Eigen::Index split_key_chunk = 1024;

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

/// One independent piece of work: a query block against keys [key_begin, key_end), which
/// is chunk `chunk` of the key split (0 without one).
struct WorkItem {
  QueryBlock block;
  Eigen::Index key_begin;
  Eigen::Index key_end;
  Eigen::Index chunk;
};

/// What the plan is made from. `key_first` and `key_end` bound the keys any query may
/// attend (the masks' band: `detail::KeyBand`); `threads` is what the caller asked for
/// after resolving 0 to OpenMP's count; tile sizes of 0 take the defaults.
struct TileShape {
  Eigen::Index n_q = 0;
  Eigen::Index n_k = 0;
  Heads heads{};
  Eigen::Index d_k = 0;
  Eigen::Index d_v = 0;
  Eigen::Index key_first = 0;
  Eigen::Index key_end = 0;
  int threads = 1;
  Eigen::Index block_q = 0;
  Eigen::Index block_k = 0;
};

/// How one call is tiled. Work items are numbered [0, items): without a key split, item i
/// is query block i % query_blocks of head block i / query_blocks, over every key; with
/// one (a single query block and more than `split_key_chunk` keys in the band), item i is
/// key chunk i % key_chunks of head block i / key_chunks, the chunks merged in order
/// afterwards.
struct TilePlan {
  Eigen::Index n_q = 0;
  Eigen::Index n_k = 0;
  Eigen::Index num_heads = 1;
  Eigen::Index d_k = 0;
  Eigen::Index d_v = 0;
  Eigen::Index block_q = 0;
  Eigen::Index block_k = 0;
  /// The score tile's row stride: block_k rounded up to 64 bytes (see `plan_tiles`).
  Eigen::Index score_stride = 0;
  /// `pack_limit` of the plan's scalar, which bounds the weights · values slices.
  Eigen::Index pack_scalars = 0;
  Eigen::Index query_blocks = 0;
  Eigen::Index key_chunks = 1;
  /// The keys the split divides: [key_from, key_from + key_span).
  Eigen::Index key_from = 0;
  Eigen::Index key_span = 0;
  /// Query heads per block: the whole group (H / H_kv) with a single query block that
  /// fits them, else 1.
  Eigen::Index heads_per_block = 1;
  Eigen::Index items = 0;
  /// Threads, and so scratch slots: no more than there are work items (none without any).
  int threads = 0;

  bool splits_keys() const noexcept { return key_chunks > 1; }
  /// Keys per slice of the weights · values product of a block of `rows` rows: slices keep
  /// Eigen's packed copy of the weights within its stack limit.
  Eigen::Index value_slice(Eigen::Index rows) const noexcept {
    return std::max<Eigen::Index>(16, pack_scalars / std::max<Eigen::Index>(rows, 1));
  }
  /// Rows of the key split's partial outputs: chunk c of head h at [(h·chunks + c)·n_q, …).
  Eigen::Index partial_rows() const noexcept { return splits_keys() ? num_heads * key_chunks * n_q : 0; }
  Eigen::Index partial_row(Eigen::Index head, Eigen::Index chunk) const noexcept {
    return (head * key_chunks + chunk) * n_q;
  }

  WorkItem item(Eigen::Index index) const noexcept {
    if (!splits_keys()) {
      const Eigen::Index first_query = (index % query_blocks) * block_q;
      return {{(index / query_blocks) * heads_per_block, heads_per_block, first_query,
               std::min(block_q, n_q - first_query)},
              0, n_k, 0};
    }
    const Eigen::Index chunk = index % key_chunks;
    const Eigen::Index key_begin = key_from + chunk * split_key_chunk;
    return {{(index / key_chunks) * heads_per_block, heads_per_block, 0, n_q},
            key_begin,
            std::min(key_begin + split_key_chunk, key_from + key_span),
            chunk};
  }
};

/// Plans a call of the tiled kernel in `Scalar`. Pure: the same shape gives the same plan.
template <typename Scalar>
TilePlan plan_tiles(const TileShape& shape) noexcept {
  TilePlan plan;
  plan.n_q = shape.n_q;
  plan.n_k = shape.n_k;
  plan.num_heads = shape.heads.num_heads;
  plan.d_k = shape.d_k;
  plan.d_v = shape.d_v;
  plan.block_q = shape.block_q > 0 ? shape.block_q : default_block_q<Scalar>;
  plan.block_k = shape.block_k > 0 ? shape.block_k : default_block_k<Scalar>(std::max(shape.d_k, shape.d_v));
  // Eigen handles a score row's unaligned head and tail one scalar at a time, with
  // std::exp and in another summation order than its SIMD body; with every row starting
  // equally aligned in every slot and every call, each row is computed alike, and results
  // stay bitwise identical whatever the thread count or the workspace's history.
  constexpr Eigen::Index per_line = std::max<Eigen::Index>(1, 64 / static_cast<Eigen::Index>(sizeof(Scalar)));
  plan.score_stride = (plan.block_k + per_line - 1) / per_line * per_line;
  plan.pack_scalars = pack_limit<Scalar>;
  if (shape.n_q == 0) return plan;

  plan.query_blocks = (shape.n_q + plan.block_q - 1) / plan.block_q;
  plan.key_from = shape.key_first;
  plan.key_span = std::max<Eigen::Index>(0, shape.key_end - shape.key_first);
  if (plan.query_blocks == 1) {
    plan.key_chunks = std::max<Eigen::Index>(1, (plan.key_span + split_key_chunk - 1) / split_key_chunk);
  }
  // With a single query block, the query heads of a group share their block when they fit:
  // one pass over their KV head's keys and values serves them all.
  const Eigen::Index group = shape.heads.num_heads / shape.heads.num_kv_heads;
  plan.heads_per_block = plan.query_blocks == 1 && group * shape.n_q <= plan.block_q ? group : 1;
  const Eigen::Index head_blocks = shape.heads.num_heads / plan.heads_per_block;
  plan.items = head_blocks * (plan.splits_keys() ? plan.key_chunks : plan.query_blocks);
  plan.threads = static_cast<int>(std::clamp<Eigen::Index>(plan.items, 1, std::max(shape.threads, 1)));
  return plan;
}

}  // namespace attn

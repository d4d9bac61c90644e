#pragma once
/// @file
/// `attn::KVCache`: the keys and values a decoder has computed so far, per layer, so that
/// generating one more token projects only that token and attends over what is stored
/// (incremental decoding, as in every autoregressive transformer since Vaswani et al. 2017).

#include <algorithm>
#include <cstddef>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include <Eigen/Core>

#include "detail/operands.hpp"
#include "error.hpp"
#include "precision.hpp"
#include "quantize.hpp"

namespace attn {

/// What appending past the capacity does.
enum class CacheOverflow {
  throw_error,  ///< throw `attn::capacity_error` and leave the cache as it was (the default)
  grow,         ///< reallocate to at least twice the capacity, keeping the contents
};

namespace detail {

/// Entry (row, col) of the token-major view of a head-major store (`KVCache::keys`).
template <typename Stored>
struct HeadMajorGather {
  HeadMajorRows<Stored> rows;
  Stored operator()(Eigen::Index row, Eigen::Index col) const noexcept {
    return rows.row(col / rows.width, row)[col % rows.width];
  }
};

/// The same for a q8_0 store, dequantised.
struct QuantizedGather {
  QuantizedRows rows;
  float operator()(Eigen::Index row, Eigen::Index col) const noexcept {
    const Eigen::Index width = rows.quants.width;
    const Eigen::Index head = col / width;
    const Eigen::Index c = col % width;
    return static_cast<float>(rows.scales.row(head, row)[c / q8_0::block_size]) *
           static_cast<float>(rows.quants.row(head, row)[c]);
  }
};

/// One layer's keys (or values) of a `KVCache<Scalar>`: `rows` rows of one head's `width`
/// (head h's tokens in rows [h·capacity, (h + 1)·capacity)), stored as `Scalar`.
template <typename Scalar>
class CacheStore {
 public:
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using Gather = HeadMajorGather<Scalar>;

  CacheStore(Eigen::Index rows, Eigen::Index width) : rows_(rows, width) {}

  Eigen::Index width() const noexcept { return rows_.cols(); }
  /// Rows [first, first + count), to write.
  Eigen::Block<Matrix> block(Eigen::Index first, Eigen::Index count) { return rows_.middleRows(first, count); }
  /// Writes `values` (count × width) from row `first`, rounded to `Scalar`.
  template <typename Derived>
  void write(Eigen::Index first, const Eigen::MatrixBase<Derived>& values) {
    rows_.middleRows(first, values.rows()) = values.template cast<Scalar>();
  }
  /// Copies `count` rows of `from` (from row `from_first`) to row `first`.
  void copy(Eigen::Index first, const CacheStore& from, Eigen::Index from_first, Eigen::Index count) {
    rows_.middleRows(first, count) = from.rows_.middleRows(from_first, count);
  }
  /// The first `tokens` of each of `heads` heads of `capacity` rows, as the kernel reads them.
  HeadMajorRows<Scalar> operand(Eigen::Index tokens, Eigen::Index heads, Eigen::Index capacity) const noexcept {
    return {rows_.data(), tokens, width(), heads, capacity * width()};
  }
  Gather gather(Eigen::Index tokens, Eigen::Index heads, Eigen::Index capacity) const noexcept {
    return {operand(tokens, heads, capacity)};
  }
  /// Bytes a row of `width` values takes.
  static std::size_t row_bytes(Eigen::Index width) noexcept { return static_cast<std::size_t>(width) * sizeof(Scalar); }

 private:
  Matrix rows_;
};

/// A q8_0 store: each row's quants, and its blocks' scales.
template <>
class CacheStore<q8_0> {
 public:
  using Gather = QuantizedGather;

  CacheStore(Eigen::Index rows, Eigen::Index width) : quants_(rows, width), scales_(rows, q8_0::blocks(width)) {}

  Eigen::Index width() const noexcept { return quants_.cols(); }
  template <typename Derived>
  void write(Eigen::Index first, const Eigen::MatrixBase<Derived>& values) {
    for (Eigen::Index i = 0; i < values.rows(); ++i) {
      quantize_q8_0(values.row(i), &quants_(first + i, 0), &scales_(first + i, 0));
    }
  }
  void copy(Eigen::Index first, const CacheStore& from, Eigen::Index from_first, Eigen::Index count) {
    quants_.middleRows(first, count) = from.quants_.middleRows(from_first, count);
    scales_.middleRows(first, count) = from.scales_.middleRows(from_first, count);
  }
  QuantizedRows operand(Eigen::Index tokens, Eigen::Index heads, Eigen::Index capacity) const noexcept {
    return {{quants_.data(), tokens, width(), heads, capacity * width()},
            {scales_.data(), tokens, scales_.cols(), heads, capacity * scales_.cols()}};
  }
  Gather gather(Eigen::Index tokens, Eigen::Index heads, Eigen::Index capacity) const noexcept {
    return {operand(tokens, heads, capacity)};
  }
  static std::size_t row_bytes(Eigen::Index width) noexcept {
    return static_cast<std::size_t>(width) * sizeof(std::int8_t) +
           static_cast<std::size_t>(q8_0::blocks(width)) * sizeof(Eigen::half);
  }

 private:
  Eigen::Matrix<std::int8_t, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> quants_;
  Eigen::Matrix<Eigen::half, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> scales_;
};

struct KVCacheAccess;

}  // namespace detail

/// Keys and values of the tokens seen so far, for each layer of a decoder, stored as
/// `Scalar`: float or double; bfloat16 or half (2 bytes a value, see precision.hpp); or
/// `q8_0` (34 bytes for 32 values, see quantize.hpp). The tiled kernel reads every storage
/// back into float as it goes (in registers for a decode step, a tile at a time into
/// scratch otherwise). Layer l holds `size(l)` tokens (oldest first) of `key_width` key
/// and `value_width` value columns, heads side by side as `flash_attention` takes them
/// (key width = H_kv·d_k).
///
/// Storage for `capacity` tokens per layer is allocated up front, so appending within the
/// capacity never allocates: a decode step costs O(tokens·width) to store its keys and
/// values, whatever the cache holds. The storage is head-major: each of the
/// `num_kv_heads` heads keeps its tokens' keys (and values) in one contiguous run, so a
/// decode step streams every head's cache as one stretch of memory (stored token by
/// token, a step read 256-byte pieces of 2 KiB rows, one head at a time, and got a third
/// of the machine's streaming rate). `MultiHeadAttention::make_cache` passes its heads;
/// a cache built with one head is stored token by token.
template <typename Scalar>
class KVCache {
  using Store = detail::CacheStore<Scalar>;

 public:
  /// The scalar the cache's entries read back as: `Scalar`, or float for q8_0.
  using Entry = std::conditional_t<std::is_same_v<Scalar, q8_0>, float, Scalar>;
  /// The stored tokens as a size × width expression (heads side by side), read entry by
  /// entry: for inspecting, comparing and copying, not for a kernel's inner loop.
  using ConstRows = Eigen::CwiseNullaryOp<typename Store::Gather,
                                          Eigen::Matrix<Entry, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>;

  /// The rows `extend` made room for, to be written by the caller: `assign` them whole, or
  /// (stored as float, double, bfloat16 or half) head by head.
  class NewRows {
   public:
    /// Head `head`'s keys of the new tokens: count × (key_width / num_kv_heads).
    auto key_head(Eigen::Index head) const {
      static_assert(!std::is_same_v<Scalar, q8_0>,
                    "attn::KVCache<q8_0>: rows are quantised as they are written; write them with assign");
      return keys_->block(head * capacity_ + first_, count_);
    }
    /// Head `head`'s values of the new tokens: count × (value_width / num_kv_heads).
    auto value_head(Eigen::Index head) const {
      static_assert(!std::is_same_v<Scalar, q8_0>,
                    "attn::KVCache<q8_0>: rows are quantised as they are written; write them with assign");
      return values_->block(head * capacity_ + first_, count_);
    }
    /// Writes the new tokens' keys (count × key_width) and values (count × value_width),
    /// heads side by side, rounded to the cache's storage.
    template <typename DerivedK, typename DerivedV>
    void assign(const Eigen::MatrixBase<DerivedK>& keys, const Eigen::MatrixBase<DerivedV>& values) const {
      const Eigen::Index key_head_width = keys_->width();
      const Eigen::Index value_head_width = values_->width();
      for (Eigen::Index head = 0; head < heads_; ++head) {
        keys_->write(head * capacity_ + first_, keys.middleCols(head * key_head_width, key_head_width));
        values_->write(head * capacity_ + first_, values.middleCols(head * value_head_width, value_head_width));
      }
    }
    Eigen::Index count() const noexcept { return count_; }

   private:
    friend class KVCache;
    NewRows(Store& keys, Store& values, Eigen::Index first, Eigen::Index count, Eigen::Index heads,
            Eigen::Index capacity) noexcept
        : keys_(&keys), values_(&values), first_(first), count_(count), heads_(heads), capacity_(capacity) {}

    Store* keys_;
    Store* values_;
    Eigen::Index first_;
    Eigen::Index count_;
    Eigen::Index heads_;
    Eigen::Index capacity_;
  };

  /// `num_kv_heads` must divide both widths; it only decides the storage order (see above).
  KVCache(Eigen::Index num_layers, Eigen::Index key_width, Eigen::Index value_width, Eigen::Index capacity,
          CacheOverflow on_overflow = CacheOverflow::throw_error, Eigen::Index num_kv_heads = 1)
      : key_width_(key_width),
        value_width_(value_width),
        capacity_(capacity),
        heads_(num_kv_heads),
        on_overflow_(on_overflow) {
    static_assert(std::is_same_v<Scalar, q8_0> || std::is_same_v<Scalar, float> || std::is_same_v<Scalar, double> ||
                      std::is_same_v<Scalar, Eigen::bfloat16> || std::is_same_v<Scalar, Eigen::half>,
                  "attn::KVCache stores float, double, attn::bfloat16, attn::half or attn::q8_0");
    if (num_layers < 1 || key_width < 0 || value_width < 0 || capacity < 0) {
      detail::raise<std::invalid_argument>(
          "attn::KVCache: need num_layers >= 1 and non-negative widths and capacity, got num_layers = ", num_layers,
          ", key_width = ", key_width, ", value_width = ", value_width, ", capacity = ", capacity);
    }
    if (num_kv_heads < 1 || key_width % num_kv_heads != 0 || value_width % num_kv_heads != 0) {
      detail::raise<std::invalid_argument>("attn::KVCache: num_kv_heads must be positive and divide both widths, got ",
                                           "num_kv_heads = ", num_kv_heads, ", key_width = ", key_width,
                                           ", value_width = ", value_width);
    }
    keys_.assign(static_cast<std::size_t>(num_layers), Store(heads_ * capacity, key_width / heads_));
    values_.assign(static_cast<std::size_t>(num_layers), Store(heads_ * capacity, value_width / heads_));
    sizes_.assign(static_cast<std::size_t>(num_layers), 0);
  }

  Eigen::Index num_layers() const noexcept { return static_cast<Eigen::Index>(sizes_.size()); }
  Eigen::Index key_width() const noexcept { return key_width_; }
  Eigen::Index value_width() const noexcept { return value_width_; }
  Eigen::Index num_kv_heads() const noexcept { return heads_; }
  /// Tokens each layer can hold before overflowing.
  Eigen::Index capacity() const noexcept { return capacity_; }
  CacheOverflow on_overflow() const noexcept { return on_overflow_; }

  /// Tokens stored in `layer`.
  Eigen::Index size(Eigen::Index layer) const { return sizes_[index(layer)]; }

  /// The stored keys of `layer`: size(layer) × key_width, oldest token first, heads side by
  /// side (a q8_0 cache's dequantised). A view: it stays valid until the cache reallocates
  /// (`reserve`, or growing on overflow) or is moved.
  ConstRows keys(Eigen::Index layer) const {
    const std::size_t l = index(layer);
    return ConstRows(sizes_[l], key_width_, keys_[l].gather(sizes_[l], heads_, capacity_));
  }

  /// The stored values of `layer`: size(layer) × value_width.
  ConstRows values(Eigen::Index layer) const {
    const std::size_t l = index(layer);
    return ConstRows(sizes_[l], value_width_, values_[l].gather(sizes_[l], heads_, capacity_));
  }

  /// Makes room for `count` more tokens in `layer` and returns their rows, uninitialised,
  /// for the caller to write. Past the capacity it throws `capacity_error` (the cache
  /// unchanged) or grows, per `on_overflow()`.
  NewRows extend(Eigen::Index layer, Eigen::Index count) {
    const std::size_t l = index(layer);
    if (count < 0) detail::raise<std::invalid_argument>("attn::KVCache::extend: count must be >= 0, got ", count);
    const Eigen::Index first = sizes_[l];
    if (count > capacity_ - first) {
      if (on_overflow_ == CacheOverflow::throw_error) {
        detail::raise<capacity_error>("attn::KVCache: layer ", layer, " holds ", first, " of ", capacity_,
                                      " tokens and cannot take ", count,
                                      " more (reserve a larger capacity, or construct with CacheOverflow::grow)");
      }
      if (count > std::numeric_limits<Eigen::Index>::max() / 2 - first) {
        detail::raise<std::invalid_argument>("attn::KVCache::extend: cannot grow layer ", layer, " by ", count,
                                             " tokens (size overflow)");
      }
      reserve(std::max(first + count, 2 * capacity_));
    }
    sizes_[l] = first + count;
    return NewRows(keys_[l], values_[l], first, count, heads_, capacity_);
  }

  /// Appends `count` tokens' keys (count × key_width) and values (count × value_width) to
  /// `layer`.
  template <typename DerivedK, typename DerivedV>
  void append(Eigen::Index layer, const Eigen::MatrixBase<DerivedK>& keys, const Eigen::MatrixBase<DerivedV>& values) {
    constexpr const char* operation = "attn::KVCache::append";
    using Computed = detail::compute_scalar_t<Scalar>;
    using KeyScalar = typename DerivedK::Scalar;
    using ValueScalar = typename DerivedV::Scalar;
    static_assert((std::is_same_v<KeyScalar, Scalar> || std::is_same_v<KeyScalar, Computed>) &&
                      (std::is_same_v<ValueScalar, Scalar> || std::is_same_v<ValueScalar, Computed>),
                  "attn::KVCache::append: keys and values must have the cache's scalar type, or float for a "
                  "bfloat16, half or q8_0 cache (rounded as they are stored)");
    detail::require_shape(operation, detail::operand("keys", keys), keys.rows(), key_width_, "count x key_width");
    detail::require_shape(operation, detail::operand("values", values), keys.rows(), value_width_,
                          "keys.rows() x value_width");
    const Eigen::Index count = keys.rows();
    if (count > capacity_ - size(layer) && on_overflow_ == CacheOverflow::grow) {
      // Growing frees the old storage, which the inputs may be views of (copying a layer,
      // or a shared prefix): copy them out first.
      const Eigen::Matrix<typename DerivedK::Scalar, Eigen::Dynamic, Eigen::Dynamic> new_keys = keys;
      const Eigen::Matrix<typename DerivedV::Scalar, Eigen::Dynamic, Eigen::Dynamic> new_values = values;
      extend(layer, count).assign(new_keys, new_values);
      return;
    }
    extend(layer, count).assign(keys, values);
  }

  /// Grows every layer's storage to hold `capacity` tokens, keeping what is stored; never
  /// shrinks. Views from `keys`/`values` are invalidated when it reallocates.
  void reserve(Eigen::Index capacity) {
    if (capacity <= capacity_) return;
    for (std::size_t l = 0; l < sizes_.size(); ++l) {
      keys_[l] = regrown(keys_[l], capacity, sizes_[l]);
      values_[l] = regrown(values_[l], capacity, sizes_[l]);
    }
    capacity_ = capacity;
  }

  /// Forgets every layer's tokens (a new sequence), keeping the storage.
  void clear() noexcept { std::fill(sizes_.begin(), sizes_.end(), Eigen::Index(0)); }

  /// Forgets all but the first `size` tokens of every layer (rolling back a speculative or
  /// rejected continuation). A layer holding `size` tokens or fewer is left as it is: a
  /// rollback to a point the layer never reached has nothing to forget, and the rows past
  /// its size are storage, not tokens.
  void truncate(Eigen::Index size) {
    for (Eigen::Index layer = 0; layer < num_layers(); ++layer) truncate(layer, size);
  }

  /// Forgets all but the first `size` tokens of `layer`; nothing if it holds `size` or fewer.
  void truncate(Eigen::Index layer, Eigen::Index size) {
    const std::size_t l = index(layer);
    if (size < 0) detail::raise<std::invalid_argument>("attn::KVCache::truncate: size must be >= 0, got ", size);
    sizes_[l] = std::min(sizes_[l], size);
  }

  /// Bytes of key and value storage held.
  std::size_t bytes() const noexcept {
    return static_cast<std::size_t>(capacity_ * heads_) * sizes_.size() *
           (Store::row_bytes(key_width_ / heads_) + Store::row_bytes(value_width_ / heads_));
  }

 private:
  friend struct detail::KVCacheAccess;

  std::size_t index(Eigen::Index layer) const {
    if (layer < 0 || layer >= num_layers()) {
      detail::raise<std::out_of_range>("attn::KVCache: layer ", layer, " is out of range [0, ", num_layers(), ")");
    }
    return static_cast<std::size_t>(layer);
  }

  /// `store` with room for `capacity` tokens per head, keeping each head's first `size`.
  Store regrown(const Store& store, Eigen::Index capacity, Eigen::Index size) const {
    Store grown(heads_ * capacity, store.width());
    for (Eigen::Index head = 0; head < heads_; ++head) grown.copy(head * capacity, store, head * capacity_, size);
    return grown;
  }

  std::vector<Store> keys_;
  std::vector<Store> values_;
  std::vector<Eigen::Index> sizes_;
  Eigen::Index key_width_;
  Eigen::Index value_width_;
  Eigen::Index capacity_;
  Eigen::Index heads_;
  CacheOverflow on_overflow_;
};

namespace detail {

/// The tiled kernel's way to a layer's keys and values, head by head.
struct KVCacheAccess {
  template <typename Scalar>
  static auto keys(const KVCache<Scalar>& cache, Eigen::Index layer) {
    const std::size_t l = cache.index(layer);
    return cache.keys_[l].operand(cache.sizes_[l], cache.heads_, cache.capacity_);
  }
  template <typename Scalar>
  static auto values(const KVCache<Scalar>& cache, Eigen::Index layer) {
    const std::size_t l = cache.index(layer);
    return cache.values_[l].operand(cache.sizes_[l], cache.heads_, cache.capacity_);
  }
};

}  // namespace detail

using KVCachef = KVCache<float>;
using KVCached = KVCache<double>;
using KVCacheq8 = KVCache<q8_0>;

}  // namespace attn

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

namespace attn {

/// What appending past the capacity does.
enum class CacheOverflow {
  throw_error,  ///< throw `attn::capacity_error` and leave the cache as it was (the default)
  grow,         ///< reallocate to at least twice the capacity, keeping the contents
};

/// Keys and values of the tokens seen so far, for each layer of a decoder, stored as
/// `Scalar`: float or double, or bfloat16 or half (2 bytes a value, read back into float by
/// the tiled kernel a tile at a time; see precision.hpp). Layer l holds
/// `size(l)` rows (one per token, oldest first) of `key_width` key and `value_width` value
/// columns, heads side by side as `flash_attention` takes them (key width = H_kv·d_k).
///
/// Storage for `capacity` tokens per layer is allocated up front, so appending within the
/// capacity never allocates: a decode step costs O(tokens·width) to store its keys and
/// values, whatever the cache holds. The rows are row-major, so one token's keys are
/// contiguous and appending writes one stretch of memory.
template <typename Scalar>
class KVCache {
 public:
  using Storage = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using ConstRows = Eigen::Block<const Storage>;
  using Rows = Eigen::Block<Storage>;

  /// The rows `extend` made room for, to be written by the caller.
  struct NewRows {
    Rows keys;
    Rows values;
  };

  KVCache(Eigen::Index num_layers, Eigen::Index key_width, Eigen::Index value_width, Eigen::Index capacity,
          CacheOverflow on_overflow = CacheOverflow::throw_error)
      : key_width_(key_width), value_width_(value_width), capacity_(capacity), on_overflow_(on_overflow) {
    detail::require_storage_scalar<Scalar>();
    if (num_layers < 1 || key_width < 0 || value_width < 0 || capacity < 0) {
      detail::raise<std::invalid_argument>(
          "attn::KVCache: need num_layers >= 1 and non-negative widths and capacity, got num_layers = ", num_layers,
          ", key_width = ", key_width, ", value_width = ", value_width, ", capacity = ", capacity);
    }
    keys_.assign(static_cast<std::size_t>(num_layers), Storage(capacity, key_width));
    values_.assign(static_cast<std::size_t>(num_layers), Storage(capacity, value_width));
    sizes_.assign(static_cast<std::size_t>(num_layers), 0);
  }

  Eigen::Index num_layers() const noexcept { return static_cast<Eigen::Index>(sizes_.size()); }
  Eigen::Index key_width() const noexcept { return key_width_; }
  Eigen::Index value_width() const noexcept { return value_width_; }
  /// Tokens each layer can hold before overflowing.
  Eigen::Index capacity() const noexcept { return capacity_; }
  CacheOverflow on_overflow() const noexcept { return on_overflow_; }

  /// Tokens stored in `layer`.
  Eigen::Index size(Eigen::Index layer) const { return sizes_[index(layer)]; }

  /// The stored keys of `layer`: size(layer) × key_width, oldest token first. A view: it
  /// stays valid until the cache reallocates (`reserve`, or growing on overflow) or is moved.
  ConstRows keys(Eigen::Index layer) const {
    const std::size_t l = index(layer);
    return ConstRows(keys_[l], 0, 0, sizes_[l], key_width_);
  }

  /// The stored values of `layer`: size(layer) × value_width.
  ConstRows values(Eigen::Index layer) const {
    const std::size_t l = index(layer);
    return ConstRows(values_[l], 0, 0, sizes_[l], value_width_);
  }

  /// Makes room for `count` more tokens in `layer` and returns their rows, uninitialised,
  /// for the caller to write (a decode step projects straight into them: no copy). Past
  /// the capacity it throws `capacity_error` (the cache unchanged) or grows, per
  /// `on_overflow()`.
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
    return {Rows(keys_[l], first, 0, count, key_width_), Rows(values_[l], first, 0, count, value_width_)};
  }

  /// Appends `count` tokens' keys (count × key_width) and values (count × value_width) to
  /// `layer`.
  template <typename DerivedK, typename DerivedV>
  void append(Eigen::Index layer, const Eigen::MatrixBase<DerivedK>& keys, const Eigen::MatrixBase<DerivedV>& values) {
    constexpr const char* operation = "attn::KVCache::append";
    using Computed = detail::compute_scalar_t<Scalar>;
    static_assert((std::is_same_v<typename DerivedK::Scalar, Scalar> || std::is_same_v<typename DerivedK::Scalar, Computed>) &&
                      (std::is_same_v<typename DerivedV::Scalar, Scalar> || std::is_same_v<typename DerivedV::Scalar, Computed>),
                  "attn::KVCache::append: keys and values must have the cache's scalar type, or float for a "
                  "bfloat16 or half cache (rounded as they are stored)");
    detail::require_shape(operation, detail::operand("keys", keys), keys.rows(), key_width_, "count x key_width");
    detail::require_shape(operation, detail::operand("values", values), keys.rows(), value_width_,
                          "keys.rows() x value_width");
    const Eigen::Index count = keys.rows();
    if (count > capacity_ - size(layer) && on_overflow_ == CacheOverflow::grow) {
      // Growing frees the old storage, which the inputs may be views of (copying a layer,
      // or a shared prefix): copy them out first.
      const Storage new_keys = keys.template cast<Scalar>();
      const Storage new_values = values.template cast<Scalar>();
      NewRows rows = extend(layer, count);
      rows.keys = new_keys;
      rows.values = new_values;
      return;
    }
    NewRows rows = extend(layer, count);
    rows.keys = keys.template cast<Scalar>();
    rows.values = values.template cast<Scalar>();
  }

  /// Grows every layer's storage to hold `capacity` tokens, keeping what is stored; never
  /// shrinks. Views from `keys`/`values` are invalidated when it reallocates.
  void reserve(Eigen::Index capacity) {
    if (capacity <= capacity_) return;
    for (auto& keys : keys_) keys.conservativeResize(capacity, key_width_);
    for (auto& values : values_) values.conservativeResize(capacity, value_width_);
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
    return static_cast<std::size_t>(capacity_ * (key_width_ + value_width_)) * sizes_.size() * sizeof(Scalar);
  }

 private:
  std::size_t index(Eigen::Index layer) const {
    if (layer < 0 || layer >= num_layers()) {
      detail::raise<std::out_of_range>("attn::KVCache: layer ", layer, " is out of range [0, ", num_layers(), ")");
    }
    return static_cast<std::size_t>(layer);
  }

  std::vector<Storage> keys_;
  std::vector<Storage> values_;
  std::vector<Eigen::Index> sizes_;
  Eigen::Index key_width_;
  Eigen::Index value_width_;
  Eigen::Index capacity_;
  CacheOverflow on_overflow_;
};

using KVCachef = KVCache<float>;
using KVCached = KVCache<double>;

}  // namespace attn

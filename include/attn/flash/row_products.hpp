#pragma once
/// @file
/// The tile products of a query block of a few rows (a decode step: one query per head, or
/// a GQA group's few heads), written out over Eigen's SIMD packets. There the two tile
/// products are matrix-vector products whose cost is reading the keys and values once
/// from memory: through Eigen's products, a 16-bit tile is first widened into a 128 KiB
/// float tile and read again, and the memory sits idle while each product, the softmax
/// and the next widening run one after the other. Here keys and values are read in
/// groups of `row_group` rows, converted in registers as they are loaded (16 bits, q8_0)
/// or read as they lie, and every query row's dot products, or its value updates, are
/// made from them while the next group streams in. Portable: Eigen's packet primitives
/// (`ploadu`, `pmadd`, `predux`) and, for the end of four sums, SSE/AVX/AVX-512
/// shuffles, so the same code runs on SSE2, AVX2 and AVX-512; the tile path of tile.hpp
/// stays the path every other block takes, and the tests hold both to the same reference.

#include <algorithm>
#include <type_traits>

#include <Eigen/Core>

#include "../detail/operands.hpp"
#include "../precision.hpp"
#include "../quantize.hpp"

namespace attn::detail {

/// Blocks of at most this many rows take the row products.
inline constexpr Eigen::Index row_product_max_rows = 8;

/// Keys (or values) read, widened and used together: 16 rows of d = 64 in float are 4 KiB.
inline constexpr Eigen::Index row_group = 16;

/// Rows of one KV head's columns of an operand stored row by row: row j at data + j·stride.
template <typename Stored>
struct StoredRows {
  const Stored* data;
  Eigen::Index stride;
  const Stored* row(Eigen::Index j) const noexcept { return data + j * stride; }
};

/// One q8_0 row: its quants and its blocks' scales, converted to float (`QuantizedTile`).
struct QuantizedRow {
  const std::int8_t* quants;
  const float* scales;
};

/// Rows of one KV head of a q8_0 tile: row j's quants at quants + j·width, its scales at
/// scales + j·q8_0::blocks(width).
template <>
struct StoredRows<q8_0> {
  const std::int8_t* quants;
  const float* scales;
  Eigen::Index width;
  QuantizedRow row(Eigen::Index j) const noexcept { return {quants + j * width, scales + j * q8_0::blocks(width)}; }
};

/// Rows [first_row, first_row + count) of one KV head of a q8_0 store as the row products
/// read them: the quants where they lie, the scales converted from half to float once, all
/// together (`row_operand`): converted where they were used, each took a conversion and a
/// broadcast per block of each key and value (four query rows per key: a GQA decode step
/// 10% faster without them, Intel AVX-512).
struct QuantizedTile {
  const std::int8_t* quants;  // row first_row's
  const float* scales;        // row first_row's
  Eigen::Index first_row;
};

/// `strided_map<Stored, true>` spelled so that `Stored` can be deduced.
template <typename Stored>
using row_map = Eigen::Map<const Eigen::Matrix<Stored, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>,
                           Eigen::Unaligned, Eigen::OuterStride<>>;
static_assert(std::is_same_v<row_map<float>, strided_map<float, true>>);

/// Operands whose rows the row products read: a KV cache's head-major rows, or a row-major
/// operand with unit inner stride (what `kernel_operand` makes of one).
template <typename Operand>
struct has_stored_rows : std::false_type {};
template <typename Stored>
struct has_stored_rows<HeadMajorRows<Stored>> : std::true_type {};
template <>
struct has_stored_rows<QuantizedRows> : std::true_type {};
template <>
struct has_stored_rows<QuantizedTile> : std::true_type {};
template <typename Stored>
struct has_stored_rows<row_map<Stored>> : std::true_type {};
template <typename Operand>
inline constexpr bool has_stored_rows_v = has_stored_rows<std::remove_cv_t<Operand>>::value;

/// Rows from `first_row` of head `kv_head` (of `width` columns) of `operand`.
template <typename Stored>
StoredRows<Stored> stored_rows(const HeadMajorRows<Stored>& operand, Eigen::Index kv_head, Eigen::Index first_row,
                               Eigen::Index /*width*/) noexcept {
  return {operand.row(kv_head, first_row), operand.width};
}
template <typename Stored>
StoredRows<Stored> stored_rows(const row_map<Stored>& operand, Eigen::Index kv_head, Eigen::Index first_row,
                               Eigen::Index width) noexcept {
  return {operand.data() + first_row * operand.outerStride() + kv_head * width, operand.outerStride()};
}
/// (A tile holds one head's rows: `kv_head` is the one it was made for.)
inline StoredRows<q8_0> stored_rows(const QuantizedTile& tile, Eigen::Index /*kv_head*/, Eigen::Index first_row,
                                   Eigen::Index width) noexcept {
  const Eigen::Index offset = first_row - tile.first_row;
  return {tile.quants + offset * width, tile.scales + offset * q8_0::blocks(width), width};
}

/// The operand the row products read for rows [first_row, first_row + count) of head
/// `kv_head`: the operand itself, or for a q8_0 store a `QuantizedTile` whose scales are
/// converted into `storage` (at least count·q8_0::blocks(width) floats: a tile's scratch,
/// which the row products do not otherwise use).
template <typename Operand, typename Scalar>
const Operand& row_operand(const Operand& operand, Eigen::Matrix<Scalar, Eigen::Dynamic, 1>& /*storage*/,
                           Eigen::Index /*kv_head*/, Eigen::Index /*first_row*/, Eigen::Index /*count*/) noexcept {
  return operand;
}
inline QuantizedTile row_operand(const QuantizedRows& operand, Eigen::Matrix<float, Eigen::Dynamic, 1>& storage,
                                 Eigen::Index kv_head, Eigen::Index first_row, Eigen::Index count) {
  const Eigen::Index scales = count * q8_0::blocks(operand.quants.width);
  eigen_assert(storage.size() >= scales);
  widen(operand.scales.row(kv_head, first_row), storage.data(), scales);
  return {operand.quants.row(kv_head, first_row), storage.data(), first_row};
}

/// Asks for `count` rows of `width` values from `rows` to be brought into the cache: the
/// next group, while this one is computed.
template <typename Stored>
EIGEN_ALWAYS_INLINE void prefetch_rows(const StoredRows<Stored>& rows, Eigen::Index count,
                                       Eigen::Index width) noexcept {
#if defined(__GNUC__)
  constexpr Eigen::Index per_line = 64 / static_cast<Eigen::Index>(sizeof(Stored));
  for (Eigen::Index i = 0; i < count; ++i) {
    const Stored* row = rows.data + i * rows.stride;
    for (Eigen::Index c = 0; c < width; c += per_line) __builtin_prefetch(row + c);
  }
#else
  (void)rows, (void)count, (void)width;
#endif
}

/// (A q8_0 tile's scales were read when they were converted.)
inline void prefetch_rows(const StoredRows<q8_0>& rows, Eigen::Index count, Eigen::Index width) noexcept {
  prefetch_rows(StoredRows<std::int8_t>{rows.quants, width}, count, width);
}

/// The packet of `Scalar` at column c of a row stored as `Scalar` or, for a float kernel,
/// in 16 bits; `value_at`, the one value.
template <typename Scalar, typename Stored>
EIGEN_ALWAYS_INLINE auto load_packet(const Stored* row, Eigen::Index c) noexcept {
  if constexpr (std::is_same_v<Stored, Scalar>) {
    return Eigen::internal::ploadu<typename Eigen::internal::packet_traits<Scalar>::type>(row + c);
  } else {
    return load_float_packet(row + c);
  }
}
template <typename Scalar, typename Stored>
EIGEN_ALWAYS_INLINE Scalar value_at(const Stored* row, Eigen::Index c) noexcept {
  return static_cast<Scalar>(row[c]);
}

/// The same for a q8_0 row: a packet lies within one block (32 is a multiple of every
/// packet size), so it takes one scale.
template <typename Scalar>
EIGEN_ALWAYS_INLINE auto load_packet(const QuantizedRow& row, Eigen::Index c) noexcept {
  return load_float_packet(row.quants + c, row.scales[c / q8_0::block_size]);
}
template <typename Scalar>
EIGEN_ALWAYS_INLINE Scalar value_at(const QuantizedRow& row, Eigen::Index c) noexcept {
  return row.scales[c / q8_0::block_size] * static_cast<float>(row.quants[c]);
}

/// out[k·stride] = the sum of packet k's entries, k = 0…3. A dot product ends in a sum
/// across a packet, and one at a time (Eigen's `predux`) that is 4 shuffles and 4 adds for
/// 16 floats, as many instructions as the products themselves for a 64-wide head; four
/// at a time share them: a 4 × 4 transposition within each 128-bit lane leaves every lane
/// holding a part of each sum, and the lanes are added once. For float packets of SSE,
/// AVX and AVX-512; `predux` for each packet elsewhere (double, builds without SIMD).
template <typename Scalar, typename Packet = typename Eigen::internal::packet_traits<Scalar>::type>
EIGEN_ALWAYS_INLINE void sum_each(const Packet (&packets)[4], Scalar* out, Eigen::Index stride) noexcept {
#if defined(EIGEN_VECTORIZE_SSE2)
  if constexpr (std::is_same_v<Scalar, float> && Eigen::internal::packet_traits<float>::size >= 4) {
    const auto transposed_sum = [](auto a, auto b, auto c, auto d, auto unpacklo, auto unpackhi, auto shuffle_low,
                                   auto shuffle_high, auto add) {
      const auto ab_low = unpacklo(a, b), ab_high = unpackhi(a, b);
      const auto cd_low = unpacklo(c, d), cd_high = unpackhi(c, d);
      return add(add(shuffle_low(ab_low, cd_low), shuffle_high(ab_low, cd_low)),
                 add(shuffle_low(ab_high, cd_high), shuffle_high(ab_high, cd_high)));
    };
    __m128 sums;
#if defined(EIGEN_VECTORIZE_AVX512)
    const __m512 lanes = transposed_sum(
        packets[0], packets[1], packets[2], packets[3], [](__m512 x, __m512 y) { return _mm512_unpacklo_ps(x, y); },
        [](__m512 x, __m512 y) { return _mm512_unpackhi_ps(x, y); },
        [](__m512 x, __m512 y) { return _mm512_shuffle_ps(x, y, _MM_SHUFFLE(1, 0, 1, 0)); },
        [](__m512 x, __m512 y) { return _mm512_shuffle_ps(x, y, _MM_SHUFFLE(3, 2, 3, 2)); },
        [](__m512 x, __m512 y) { return _mm512_add_ps(x, y); });
    const __m256 halves = _mm256_add_ps(_mm512_castps512_ps256(lanes),
                                        _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(lanes), 1)));
    sums = _mm_add_ps(_mm256_castps256_ps128(halves), _mm256_extractf128_ps(halves, 1));
#elif defined(EIGEN_VECTORIZE_AVX)
    const __m256 lanes = transposed_sum(
        packets[0], packets[1], packets[2], packets[3], [](__m256 x, __m256 y) { return _mm256_unpacklo_ps(x, y); },
        [](__m256 x, __m256 y) { return _mm256_unpackhi_ps(x, y); },
        [](__m256 x, __m256 y) { return _mm256_shuffle_ps(x, y, _MM_SHUFFLE(1, 0, 1, 0)); },
        [](__m256 x, __m256 y) { return _mm256_shuffle_ps(x, y, _MM_SHUFFLE(3, 2, 3, 2)); },
        [](__m256 x, __m256 y) { return _mm256_add_ps(x, y); });
    sums = _mm_add_ps(_mm256_castps256_ps128(lanes), _mm256_extractf128_ps(lanes, 1));
#else
    sums = transposed_sum(
        packets[0], packets[1], packets[2], packets[3], [](__m128 x, __m128 y) { return _mm_unpacklo_ps(x, y); },
        [](__m128 x, __m128 y) { return _mm_unpackhi_ps(x, y); },
        [](__m128 x, __m128 y) { return _mm_shuffle_ps(x, y, _MM_SHUFFLE(1, 0, 1, 0)); },
        [](__m128 x, __m128 y) { return _mm_shuffle_ps(x, y, _MM_SHUFFLE(3, 2, 3, 2)); },
        [](__m128 x, __m128 y) { return _mm_add_ps(x, y); });
#endif
    alignas(16) float each[4];
    _mm_store_ps(each, sums);
    for (int k = 0; k < 4; ++k) out[k * stride] = each[k];
    return;
  }
#endif
  for (int k = 0; k < 4; ++k) out[k * stride] = Eigen::internal::predux(packets[k]);
}

/// sums[i] = Σ_c queries[i][c]·keys[i][c] over the first `body` columns (a multiple of the
/// packet size), for four (query row, key) pairs: four rows against one key (`SharedKey`)
/// or one row against four keys, the shared operand loaded (and converted) once. Four
/// chains of fused multiply-adds run side by side: one chain waits on each add's latency,
/// which took a 64-wide dot product 20 cycles. Four q8_0 keys' packets are summed
/// unscaled over each 32-value block and each block's sum is scaled once; a shared key's
/// packets are scaled as they are loaded, once for the four rows.
template <bool SharedKey, typename Scalar, typename Row, typename Packet>
EIGEN_ALWAYS_INLINE void dot_four(const Scalar* const (&queries)[4], const Row (&keys)[4], Eigen::Index body,
                                  Packet (&sums)[4]) noexcept {
  using Eigen::internal::pmadd;
  using Eigen::internal::ploadu;
  using Eigen::internal::pset1;
  constexpr Eigen::Index size = Eigen::internal::packet_traits<Scalar>::size;
  for (int i = 0; i < 4; ++i) sums[i] = pset1<Packet>(Scalar(0));
  if constexpr (std::is_same_v<Row, QuantizedRow> && !SharedKey) {
    for (Eigen::Index first = 0; first < body; first += q8_0::block_size) {
      const Eigen::Index last = std::min(first + q8_0::block_size, body);
      Packet block[4];
      for (int i = 0; i < 4; ++i) block[i] = pset1<Packet>(Scalar(0));
      for (Eigen::Index c = first; c < last; c += size) {
        for (int i = 0; i < 4; ++i) {
          block[i] = pmadd(ploadu<Packet>(queries[i] + c), load_float_packet(keys[i].quants + c), block[i]);
        }
      }
      for (int i = 0; i < 4; ++i) {
        sums[i] = pmadd(pset1<Packet>(keys[i].scales[first / q8_0::block_size]), block[i], sums[i]);
      }
    }
  } else {
    for (Eigen::Index c = 0; c < body; c += size) {
      for (int i = 0; i < 4; ++i) {
        sums[i] = pmadd(ploadu<Packet>(queries[i] + c), load_packet<Scalar>(keys[i], c), sums[i]);
      }
    }
  }
}

/// scores(r, j) = Σ_c queries(r, c)·keys(j, c) for Rows (1 or 4) query rows and `count`
/// keys, row-major, strides in scalars: four rows against each key, or one row against four
/// keys at a time (`dot_four`), their four sums ended together (`sum_each`).
template <int Rows, typename Scalar, typename Keys>
EIGEN_ALWAYS_INLINE void dot_rows(const Scalar* queries, Eigen::Index query_stride, const Keys& keys,
                                  Eigen::Index count, Eigen::Index width, Scalar* scores,
                                  Eigen::Index score_stride) noexcept {
  static_assert(Rows == 1 || Rows == 4, "attn: dot_rows takes one query row or four");
  using Packet = typename Eigen::internal::packet_traits<Scalar>::type;
  using Row = decltype(keys.row(0));
  constexpr Eigen::Index size = Eigen::internal::packet_traits<Scalar>::size;
  const Eigen::Index body = width / size * size;
  const auto tail = [&](const Scalar* query, const Row& key) {
    Scalar sum(0);
    for (Eigen::Index c = body; c < width; ++c) sum += query[c] * value_at<Scalar>(key, c);
    return sum;
  };
  Packet sums[4];
  if constexpr (Rows == 4) {
    const Scalar* const rows[4] = {queries, queries + query_stride, queries + 2 * query_stride,
                                   queries + 3 * query_stride};
    for (Eigen::Index j = 0; j < count; ++j) {
      const Row key = keys.row(j);
      dot_four<true>(rows, {key, key, key, key}, body, sums);
      sum_each(sums, scores + j, score_stride);
      if (body < width) {
        for (int r = 0; r < 4; ++r) scores[r * score_stride + j] += tail(rows[r], key);
      }
    }
  } else {
    const Scalar* const row[4] = {queries, queries, queries, queries};
    Eigen::Index j = 0;
    for (; j + 4 <= count; j += 4) {
      const Row four[4] = {keys.row(j), keys.row(j + 1), keys.row(j + 2), keys.row(j + 3)};
      dot_four<false>(row, four, body, sums);
      sum_each(sums, scores + j, 1);
      if (body < width) {
        for (int k = 0; k < 4; ++k) scores[j + k] += tail(queries, four[k]);
      }
    }
    for (; j < count; ++j) {
      const Row key = keys.row(j);
      dot_four<true>(row, {key, key, key, key}, body, sums);
      scores[j] = Eigen::internal::predux(sums[0]) + tail(queries, key);
    }
  }
}

/// accumulator(r, c…) += Σ_j weights(r, j)·values(j, c…) for Rows rows, the `Packets`
/// packets from column c and `count` values: the sums stay in registers over all the
/// values, and each value packet is loaded (and converted) once for the Rows rows.
template <int Rows, int Packets, typename Scalar, typename Values>
EIGEN_ALWAYS_INLINE void accumulate_packets(const Scalar* weights, Eigen::Index weight_stride, const Values& values,
                                            Eigen::Index count, Eigen::Index c, Scalar* accumulator,
                                            Eigen::Index accumulator_stride) noexcept {
  using Eigen::internal::pmadd;
  using Eigen::internal::pset1;
  using Packet = typename Eigen::internal::packet_traits<Scalar>::type;
  constexpr Eigen::Index size = Eigen::internal::packet_traits<Scalar>::size;
  Packet sums[Rows][Packets];
  for (int r = 0; r < Rows; ++r) {
    for (int p = 0; p < Packets; ++p) {
      sums[r][p] = Eigen::internal::ploadu<Packet>(accumulator + r * accumulator_stride + c + p * size);
    }
  }
  for (Eigen::Index j = 0; j < count; ++j) {
    const auto value = values.row(j);
    Packet loaded[Packets];
    for (int p = 0; p < Packets; ++p) loaded[p] = load_packet<Scalar>(value, c + p * size);
    for (int r = 0; r < Rows; ++r) {
      const Packet weight = pset1<Packet>(weights[r * weight_stride + j]);
      for (int p = 0; p < Packets; ++p) sums[r][p] = pmadd(weight, loaded[p], sums[r][p]);
    }
  }
  for (int r = 0; r < Rows; ++r) {
    for (int p = 0; p < Packets; ++p) {
      Eigen::internal::pstoreu(accumulator + r * accumulator_stride + c + p * size, sums[r][p]);
    }
  }
}

/// The same for one row and a whole q8_0 block from column c (a multiple of 32): the
/// weight takes each value's block scale, so that the value packets need no multiply.
template <typename Values>
EIGEN_ALWAYS_INLINE void accumulate_block(const float* weights, const Values& values, Eigen::Index count,
                                          Eigen::Index c, float* accumulator) noexcept {
  using Eigen::internal::pmadd;
  using Packet = Eigen::internal::packet_traits<float>::type;
  constexpr Eigen::Index size = Eigen::internal::packet_traits<float>::size;
  constexpr int packets = static_cast<int>(q8_0::block_size / size);
  Packet sums[packets];
  for (int p = 0; p < packets; ++p) sums[p] = Eigen::internal::ploadu<Packet>(accumulator + c + p * size);
  for (Eigen::Index j = 0; j < count; ++j) {
    const QuantizedRow value = values.row(j);
    // Two broadcasts from memory and a packet product, rather than a scalar product and a
    // broadcast from a register, which competes with the conversions' shuffles.
    const Packet weight = Eigen::internal::pmul(Eigen::internal::pset1<Packet>(weights[j]),
                                                Eigen::internal::pset1<Packet>(value.scales[c / q8_0::block_size]));
    for (int p = 0; p < packets; ++p) sums[p] = pmadd(weight, load_float_packet(value.quants + c + p * size), sums[p]);
  }
  for (int p = 0; p < packets; ++p) Eigen::internal::pstoreu(accumulator + c + p * size, sums[p]);
}

/// accumulator(r, :) += Σ_j weights(r, j)·values(j, :) for Rows rows and `count` values,
/// a few packets of columns at a time (`accumulate_packets`), then the columns past the
/// last whole packet one by one. One row takes four packets at a time (four chains of
/// adds side by side: 0.8× the time of one); four rows, one packet, whose four sums are
/// chains enough (four packets, 16 sums, measured 1.6× the time on Zen 4).
template <int Rows, typename Scalar, typename Values>
EIGEN_ALWAYS_INLINE void accumulate_rows(const Scalar* weights, Eigen::Index weight_stride, const Values& values,
                                         Eigen::Index count, Eigen::Index width, Scalar* accumulator,
                                         Eigen::Index accumulator_stride) noexcept {
  constexpr Eigen::Index size = Eigen::internal::packet_traits<Scalar>::size;
  constexpr int chunk = Rows == 1 ? 4 : 1;
  const Eigen::Index body = width / size * size;
  Eigen::Index c = 0;
  if constexpr (Rows == 1 && std::is_same_v<decltype(values.row(0)), QuantizedRow>) {
    for (; c + q8_0::block_size <= body; c += q8_0::block_size) {
      accumulate_block(weights, values, count, c, accumulator);
    }
  }
  for (; c + chunk * size <= body; c += chunk * size) {
    accumulate_packets<Rows, chunk>(weights, weight_stride, values, count, c, accumulator, accumulator_stride);
  }
  if constexpr (chunk > 1) {
    for (; c < body; c += size) {
      accumulate_packets<Rows, 1>(weights, weight_stride, values, count, c, accumulator, accumulator_stride);
    }
  }
  for (; c < width; ++c) {
    for (int r = 0; r < Rows; ++r) {
      Scalar sum = accumulator[r * accumulator_stride + c];
      for (Eigen::Index j = 0; j < count; ++j) {
        sum += weights[r * weight_stride + j] * value_at<Scalar>(values.row(j), c);
      }
      accumulator[r * accumulator_stride + c] = sum;
    }
  }
}

/// Calls body(group_rows, group, group_count) for the `count` rows from `first_row` of head
/// `kv_head` of `operand`, in groups of `row_group` rows (`group` counted from `first_row`),
/// and asks for each group's successor to be brought in while the body computes on it.
template <typename Operand, typename Body>
EIGEN_ALWAYS_INLINE void for_each_row_group(const Operand& operand, Eigen::Index kv_head, Eigen::Index first_row,
                                           Eigen::Index count, Eigen::Index width, Body&& body) {
  for (Eigen::Index group = 0; group < count; group += row_group) {
    if (group + row_group < count) {
      prefetch_rows(stored_rows(operand, kv_head, first_row + group + row_group, width),
                    std::min(row_group, count - group - row_group), width);
    }
    body(stored_rows(operand, kv_head, first_row + group, width), group, std::min(row_group, count - group));
  }
}

/// Calls product(std::integral_constant<int, Rows>, r) for query rows r… r + Rows - 1 of
/// `rows`: four at a time, then one at a time.
template <typename Product>
EIGEN_ALWAYS_INLINE void for_each_query_rows(Eigen::Index rows, Product&& product) {
  Eigen::Index r = 0;
  for (; r + 4 <= rows; r += 4) product(std::integral_constant<int, 4>{}, r);
  for (; r < rows; ++r) product(std::integral_constant<int, 1>{}, r);
}

/// scores (rows × count, row stride `score_stride`) = queries (rows × width, row-major) ·
/// the `count` keys from `first_key` of `kv_head`ᵀ.
template <typename Scalar, typename Keys>
void score_rows(const Keys& keys, Eigen::Index kv_head, Eigen::Index first_key, Eigen::Index count,
                Eigen::Index width, const Scalar* queries, Eigen::Index rows, Scalar* scores,
                Eigen::Index score_stride) noexcept {
  for_each_row_group(keys, kv_head, first_key, count, width, [&](const auto& key_rows, Eigen::Index group,
                                                                 Eigen::Index keys_in_group) {
    for_each_query_rows(rows, [&](auto query_rows, Eigen::Index r) {
      dot_rows<decltype(query_rows)::value>(queries + r * width, width, key_rows, keys_in_group, width,
                                            scores + r * score_stride + group, score_stride);
    });
  });
}

/// accumulator (rows × width, row stride `accumulator_stride`) += weights (rows × count,
/// row stride `weight_stride`) · the `count` values from `first_key` of `kv_head`.
template <typename Scalar, typename Values>
void accumulate_value_rows(const Values& values, Eigen::Index kv_head, Eigen::Index first_key, Eigen::Index count,
                           Eigen::Index width, const Scalar* weights, Eigen::Index weight_stride, Eigen::Index rows,
                           Scalar* accumulator, Eigen::Index accumulator_stride) noexcept {
  for_each_row_group(values, kv_head, first_key, count, width, [&](const auto& value_rows, Eigen::Index group,
                                                                   Eigen::Index values_in_group) {
    for_each_query_rows(rows, [&](auto query_rows, Eigen::Index r) {
      accumulate_rows<decltype(query_rows)::value>(weights + r * weight_stride + group, weight_stride, value_rows,
                                                   values_in_group, width, accumulator + r * accumulator_stride,
                                                   accumulator_stride);
    });
  });
}

}  // namespace attn::detail

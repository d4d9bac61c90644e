#pragma once
/// @file
/// The two products of a tile of many query rows, register-blocked over Eigen's SIMD
/// packets: scores = queries · keysᵀ and accumulator += weights · values. Through Eigen's
/// general products each tile product packs both of its operands again and splits into
/// GEMM blocks sized for matrices far larger than a tile; here the keys and values of a
/// tile are packed once, as the kernel reads them (converted from 16-bit storage on the
/// way, which replaces a separate widening pass), and a block of query rows is multiplied
/// against them with its sums held in registers for the whole depth. The same code runs
/// on SSE2, AVX2 and AVX-512: only the register block's shape follows the packet size and
/// the number of SIMD registers.

#include <algorithm>
#include <type_traits>
#include <utility>

#include <Eigen/Core>

#include "../detail/operands.hpp"
#include "../precision.hpp"

namespace attn::detail {

/// The register blocks, from the packet size and the register count (16 on SSE2 and AVX2,
/// 32 on AVX-512): score blocks are `score_rows` query rows × two packets of keys, value
/// blocks `value_rows` rows × `value_packets` packets of the value width. Each leaves a
/// register for every loaded packet and one for the broadcast weight or query value.
template <typename Scalar>
struct TileBlocks {
  using Packet = typename Eigen::internal::packet_traits<Scalar>::type;
  static constexpr Eigen::Index size = Eigen::internal::packet_traits<Scalar>::size;
  static constexpr bool many_registers = EIGEN_ARCH_DEFAULT_NUMBER_OF_REGISTERS >= 32;
  static constexpr int score_rows = many_registers ? 12 : 6;
  static constexpr int score_panels = 2;
  static constexpr int value_rows = 6;
  static constexpr int value_packets = many_registers ? 4 : 2;
};

/// Scalars of packed key panels for `count` keys of `width` columns: each panel holds
/// one packet's worth of keys, column by column, the last one padded with zeros.
template <typename Scalar>
constexpr Eigen::Index packed_keys_size(Eigen::Index count, Eigen::Index width) noexcept {
  constexpr Eigen::Index size = TileBlocks<Scalar>::size;
  return (count + size - 1) / size * size * width;
}

/// Whether a block of an operand stored as `Stored` is read by packet loads into the
/// kernel's scalar: stored as it, or in 16 bits for a float kernel (`load_float_packet`
/// converts in registers), with unit stride within each row (row-major) or column.
template <typename Scalar, typename Block>
inline constexpr bool is_packet_block_v =
    (std::is_same_v<typename Block::Scalar, Scalar> ||
     (std::is_same_v<Scalar, float> && is_reduced_precision_v<typename Block::Scalar>)) &&
    Eigen::internal::traits<Block>::InnerStrideAtCompileTime == 1;

/// The packet of the kernel's scalar at `from`, stored as Scalar or in 16 bits.
template <typename Scalar, typename Stored>
EIGEN_ALWAYS_INLINE typename TileBlocks<Scalar>::Packet load_as(const Stored* from) noexcept {
  if constexpr (std::is_same_v<Stored, Scalar>) {
    return Eigen::internal::ploadu<typename TileBlocks<Scalar>::Packet>(from);
  } else {
    return load_float_packet(from);
  }
}

/// dst (rows × cols, row-major, row stride `dst_stride`) = src (rows × cols, column-major,
/// column stride `src_stride`) in the kernel's scalar: blocks of a packet's size squared
/// are transposed in registers, and only the edges past the last whole block go one
/// scalar at a time.
// PacketBlock<__m512, 16> drops the vector type's alignment attribute as a template
// argument, harmlessly (Eigen's own headers silence the same warning for their uses).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wignored-attributes"
#endif
template <typename Scalar, typename Stored>
void transpose_into_rows(const Stored* src, Eigen::Index src_stride, Eigen::Index rows, Eigen::Index cols,
                         Scalar* dst, Eigen::Index dst_stride) noexcept {
  using Packet = typename TileBlocks<Scalar>::Packet;
  constexpr int size = static_cast<int>(TileBlocks<Scalar>::size);
  Eigen::Index r = 0;
  for (; r + size <= rows; r += size) {
    Eigen::Index c = 0;
    for (; c + size <= cols; c += size) {
      Eigen::internal::PacketBlock<Packet, size> block;
      for (int k = 0; k < size; ++k) block.packet[k] = load_as<Scalar>(src + (c + k) * src_stride + r);
      Eigen::internal::ptranspose(block);
      for (int k = 0; k < size; ++k) Eigen::internal::pstoreu(dst + (r + k) * dst_stride + c, block.packet[k]);
    }
    for (; c < cols; ++c) {
      for (int k = 0; k < size; ++k) dst[(r + k) * dst_stride + c] = static_cast<Scalar>(src[c * src_stride + r + k]);
    }
  }
  for (; r < rows; ++r) {
    for (Eigen::Index c = 0; c < cols; ++c) dst[r * dst_stride + c] = static_cast<Scalar>(src[c * src_stride + r]);
  }
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

/// Packs `keys` (count × width, any storage order and storage scalar) into panels:
/// panel p holds keys [p·size, p·size + size), its column c at packed + (p·width + c)·size.
template <typename Scalar, typename Keys>
void pack_key_panels(const Eigen::MatrixBase<Keys>& keys, Scalar* packed) {
  constexpr Eigen::Index size = TileBlocks<Scalar>::size;
  using Panel = Eigen::Matrix<Scalar, Eigen::Dynamic, size, Eigen::RowMajor>;
  const Eigen::Index count = keys.rows(), width = keys.cols();
  Eigen::Index first = 0;
  if constexpr (is_packet_block_v<Scalar, Keys>) {
    const auto* data = keys.derived().data();
    const Eigen::Index stride = keys.derived().outerStride();
    for (; first + size <= count; first += size) {
      Scalar* panel = packed + first * width;
      if constexpr (bool(Keys::IsRowMajor)) {
        // size keys of `width` columns, each a run: a (width × size) column-major matrix.
        transpose_into_rows(data + first * stride, stride, width, size, panel, size);
      } else {
        for (Eigen::Index c = 0; c < width; ++c) {
          Eigen::internal::pstoreu(panel + c * size, load_as<Scalar>(data + c * stride + first));
        }
      }
    }
  } else {
    for (; first + size <= count; first += size) {
      Eigen::Map<Panel>(packed + first * width, width, size) =
          keys.middleRows(first, size).transpose().template cast<Scalar>();
    }
  }
  if (first < count) {
    Eigen::Map<Panel> panel(packed + first * width, width, size);
    panel.leftCols(count - first) = keys.middleRows(first, count - first).transpose().template cast<Scalar>();
    panel.rightCols(size - (count - first)).setZero();
  }
}

/// Whether the value products read `Values` where they lie: rows of the kernel's scalar,
/// each a run.
template <typename Scalar, typename Values>
inline constexpr bool reads_value_rows_in_place_v = std::is_same_v<typename Values::Scalar, Scalar> &&
                                                    is_packet_block_v<Scalar, Values> && bool(Values::IsRowMajor);

/// The rows of `values` (count × width, any storage order and storage scalar) in the
/// kernel's scalar, row-major: where they lie (`reads_value_rows_in_place_v`), else packed
/// into `packed`: 16-bit rows widened (`widen`), a column-major operand
/// transposed a block at a time (`transpose_into_rows`; Eigen's assignment would read it
/// across its columns, a cache line per value). Returns the rows and their stride.
template <typename Scalar, typename Values>
std::pair<const Scalar*, Eigen::Index> value_rows(const Eigen::MatrixBase<Values>& values, Scalar* packed) {
  const Eigen::Index count = values.rows(), width = values.cols();
  if constexpr (reads_value_rows_in_place_v<Scalar, Values>) {
    return {values.derived().data(), values.derived().outerStride()};
  } else if constexpr (is_packet_block_v<Scalar, Values> && bool(Values::IsRowMajor)) {
    // Rows in 16 bits (the in-place case takes every other row-major packet block).
    for (Eigen::Index j = 0; j < count; ++j) {
      widen(values.derived().data() + j * values.derived().outerStride(), packed + j * width, width);
    }
  } else if constexpr (is_packet_block_v<Scalar, Values>) {
    transpose_into_rows(values.derived().data(), values.derived().outerStride(), count, width, packed, width);
  } else {
    using Rows = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
    Eigen::Map<Rows>(packed, count, width) = values.template cast<Scalar>();
  }
  return {packed, width};
}

/// scores(r, ·) for Rows query rows and Panels packed key panels: the sums stay in
/// registers across the whole depth. queries is column-major (column c of row r at
/// queries[r + c·query_stride]); a panel shorter than `valid` columns is written in part.
template <int Rows, int Panels, typename Scalar>
EIGEN_ALWAYS_INLINE void score_block(const Scalar* queries, Eigen::Index query_stride, const Scalar* panels,
                                     Eigen::Index depth, Scalar* scores, Eigen::Index score_stride,
                                     Eigen::Index valid) noexcept {
  using Blocks = TileBlocks<Scalar>;
  using Packet = typename Blocks::Packet;
  constexpr Eigen::Index size = Blocks::size;
  using Eigen::internal::pmadd;
  using Eigen::internal::pset1;
  Packet sums[Rows][Panels];
  for (int r = 0; r < Rows; ++r) {
    for (int p = 0; p < Panels; ++p) sums[r][p] = pset1<Packet>(Scalar(0));
  }
  for (Eigen::Index c = 0; c < depth; ++c) {
    Packet keys[Panels];
    for (int p = 0; p < Panels; ++p) keys[p] = Eigen::internal::ploadu<Packet>(panels + (p * depth + c) * size);
    const Scalar* query_column = queries + c * query_stride;
    for (int r = 0; r < Rows; ++r) {
      const Packet query = pset1<Packet>(query_column[r]);
      for (int p = 0; p < Panels; ++p) sums[r][p] = pmadd(query, keys[p], sums[r][p]);
    }
  }
  for (int r = 0; r < Rows; ++r) {
    for (int p = 0; p < Panels; ++p) {
      Scalar* out = scores + r * score_stride + p * size;
      const Eigen::Index columns = valid - p * size;
      if (columns >= size) {
        Eigen::internal::pstoreu(out, sums[r][p]);
      } else if (columns > 0) {
        alignas(sizeof(Packet)) Scalar each[size];
        Eigen::internal::pstoreu(each, sums[r][p]);
        std::copy(each, each + columns, out);
      }
    }
  }
}

/// scores (rows × count, row-major, row stride `score_stride`) = queries (rows × depth,
/// column-major) · the keys packed by `pack_key_panels`ᵀ.
template <typename Scalar>
void score_packed_tile(const Scalar* queries, Eigen::Index query_stride, Eigen::Index rows, Eigen::Index depth,
                       const Scalar* panels, Eigen::Index count, Scalar* scores, Eigen::Index score_stride) noexcept {
  using Blocks = TileBlocks<Scalar>;
  constexpr Eigen::Index size = Blocks::size;
  constexpr Eigen::Index block_keys = Blocks::score_panels * size;
  const auto blocks_of_rows = [&](auto block_rows, Eigen::Index first_key, auto panels_now) {
    constexpr int Rows = decltype(block_rows)::value;
    constexpr int Panels = decltype(panels_now)::value;
    const Scalar* key_panels = panels + first_key * depth;
    const Eigen::Index valid = count - first_key;
    Eigen::Index r = 0;
    for (; r + Rows <= rows; r += Rows) {
      score_block<Rows, Panels>(queries + r, query_stride, key_panels, depth, scores + r * score_stride + first_key,
                                score_stride, valid);
    }
    for (; r < rows; ++r) {
      score_block<1, Panels>(queries + r, query_stride, key_panels, depth, scores + r * score_stride + first_key,
                             score_stride, valid);
    }
  };
  using Full = std::integral_constant<int, Blocks::score_rows>;
  Eigen::Index first_key = 0;
  for (; first_key + block_keys <= count; first_key += block_keys) {
    blocks_of_rows(Full{}, first_key, std::integral_constant<int, Blocks::score_panels>{});
  }
  for (; first_key < count; first_key += size) blocks_of_rows(Full{}, first_key, std::integral_constant<int, 1>{});
}

/// accumulator(r, ·) += Σ_j weights(r, j)·values(j, ·) for Rows rows and Packets packets
/// of the value width: the sums stay in registers across all `count` values.
template <int Rows, int Packets, typename Scalar>
EIGEN_ALWAYS_INLINE void value_block(const Scalar* weights, Eigen::Index weight_stride, const Scalar* values,
                                     Eigen::Index value_stride, Eigen::Index count, Scalar* accumulator,
                                     Eigen::Index accumulator_stride) noexcept {
  using Blocks = TileBlocks<Scalar>;
  using Packet = typename Blocks::Packet;
  constexpr Eigen::Index size = Blocks::size;
  using Eigen::internal::pmadd;
  using Eigen::internal::pset1;
  Packet sums[Rows][Packets];
  for (int r = 0; r < Rows; ++r) {
    for (int k = 0; k < Packets; ++k) {
      sums[r][k] = Eigen::internal::ploadu<Packet>(accumulator + r * accumulator_stride + k * size);
    }
  }
  for (Eigen::Index j = 0; j < count; ++j) {
    Packet value[Packets];
    for (int k = 0; k < Packets; ++k) value[k] = Eigen::internal::ploadu<Packet>(values + j * value_stride + k * size);
    for (int r = 0; r < Rows; ++r) {
      const Packet weight = pset1<Packet>(weights[r * weight_stride + j]);
      for (int k = 0; k < Packets; ++k) sums[r][k] = pmadd(weight, value[k], sums[r][k]);
    }
  }
  for (int r = 0; r < Rows; ++r) {
    for (int k = 0; k < Packets; ++k) {
      Eigen::internal::pstoreu(accumulator + r * accumulator_stride + k * size, sums[r][k]);
    }
  }
}

/// accumulator (rows × width, row-major, row stride `accumulator_stride`) += weights (rows
/// × count, row-major) · values (count × width, row-major, row stride `value_stride`).
template <typename Scalar>
void accumulate_packed_tile(const Scalar* weights, Eigen::Index weight_stride, Eigen::Index rows,
                            const Scalar* values, Eigen::Index value_stride, Eigen::Index count, Eigen::Index width,
                            Scalar* accumulator, Eigen::Index accumulator_stride) noexcept {
  using Blocks = TileBlocks<Scalar>;
  constexpr Eigen::Index size = Blocks::size;
  const auto blocks_of_rows = [&](auto block_rows, Eigen::Index first_column, auto packets) {
    constexpr int Rows = decltype(block_rows)::value;
    constexpr int Packets = decltype(packets)::value;
    Eigen::Index r = 0;
    for (; r + Rows <= rows; r += Rows) {
      value_block<Rows, Packets>(weights + r * weight_stride, weight_stride, values + first_column, value_stride, count,
                                 accumulator + r * accumulator_stride + first_column, accumulator_stride);
    }
    for (; r < rows; ++r) {
      value_block<1, Packets>(weights + r * weight_stride, weight_stride, values + first_column, value_stride, count,
                              accumulator + r * accumulator_stride + first_column, accumulator_stride);
    }
  };
  using Full = std::integral_constant<int, Blocks::value_rows>;
  constexpr Eigen::Index block_columns = Blocks::value_packets * size;
  Eigen::Index c = 0;
  for (; c + block_columns <= width; c += block_columns) {
    blocks_of_rows(Full{}, c, std::integral_constant<int, Blocks::value_packets>{});
  }
  for (; c + size <= width; c += size) blocks_of_rows(Full{}, c, std::integral_constant<int, 1>{});
  // Columns past the last whole packet (a width that is not a multiple of the packet size).
  for (; c < width; ++c) {
    for (Eigen::Index r = 0; r < rows; ++r) {
      Scalar sum = accumulator[r * accumulator_stride + c];
      for (Eigen::Index j = 0; j < count; ++j) sum += weights[r * weight_stride + j] * values[j * value_stride + c];
      accumulator[r * accumulator_stride + c] = sum;
    }
  }
}

}  // namespace attn::detail

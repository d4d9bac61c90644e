#pragma once
/// @file
/// How attn takes its operands: which scalars it accepts, the plain matrix types results are
/// returned in, the compile-time checks on operands and outputs, and how caller-owned outputs
/// and attn's own scratch are sized.

#include <algorithm>
#include <type_traits>
#include <utility>

#include <Eigen/Core>

#include "../error.hpp"
#include "../precision.hpp"

namespace attn::detail {

/// Instantiated by every entry point so that a bad scalar fails with one readable line
/// instead of pages of Eigen template errors.
template <typename Scalar>
constexpr void require_floating_point() noexcept {
  static_assert(!Eigen::NumTraits<Scalar>::IsInteger && !Eigen::NumTraits<Scalar>::IsComplex,
                "attn requires a floating-point scalar (float or double): attention weights are "
                "fractions that integer (or complex) matrices cannot hold");
  static_assert(!is_reduced_precision_v<Scalar>,
                "attn: this operation computes in its operands' scalar, and bfloat16 or half would "
                "accumulate in 16 bits; flash_attention (and a KVCache) take 16-bit operands and "
                "compute in float, or convert with .cast<float>()");
}

/// For operands that may be stored in 16 bits (see precision.hpp): float, double,
/// bfloat16 or half.
template <typename Storage>
constexpr void require_storage_scalar() noexcept {
  static_assert(std::is_same_v<Storage, float> || std::is_same_v<Storage, double> ||
                    std::is_same_v<Storage, Eigen::bfloat16> || std::is_same_v<Storage, Eigen::half>,
                "attn: operands are stored as float, double, attn::bfloat16 or attn::half");
}

/// The plain matrix a result is returned in, carrying the inputs' compile-time sizes so
/// that fixed-size inputs give fixed-size results on the stack.
template <typename Scalar, int Rows, int Cols>
using plain_matrix = Eigen::Matrix<Scalar, Rows, Cols>;

/// The scratch for an n_q×n_k score matrix that attn owns: row-major, because the softmax
/// walks rows (about 2× faster than over a column-major matrix at n = 1024). A single
/// column must stay column-major, as Eigen requires of fixed-size vectors.
template <typename Scalar, int Rows, int Cols>
using row_major_matrix =
    Eigen::Matrix<Scalar, Rows, Cols, (Cols == 1 && Rows != 1) ? Eigen::ColMajor : Eigen::RowMajor>;

/// Whether T derives from some MatrixBase<D>. Not is_base_of<MatrixBase<T>, T>: a
/// VectorBlock, say, derives from MatrixBase of the Block it extends.
template <typename Derived>
std::true_type derives_from_matrix_base(const Eigen::MatrixBase<Derived>*);
std::false_type derives_from_matrix_base(...);

template <typename T>
inline constexpr bool is_matrix_v = decltype(derives_from_matrix_base(std::declval<T*>()))::value;

/// True for an Eigen matrix expression that can be written to: a Matrix, a Map, a Ref or a
/// block of one, passed as a non-const lvalue or as a temporary view.
template <typename Out>
inline constexpr bool is_writable_matrix_v = [] {
  using Bare = std::remove_cv_t<std::remove_reference_t<Out>>;
  if constexpr (!is_matrix_v<Bare>) {
    return false;
  } else {
    return !std::is_const_v<std::remove_reference_t<Out>> &&
           (Eigen::internal::traits<Bare>::Flags & Eigen::LvalueBit) != 0;
  }
}();

/// Makes a caller-owned output `rows`×`cols`: a plain matrix of the wrong size is resized
/// (allocation happens only when the size changes, so a loop that reuses it allocates
/// once), while a view (block, Map, Ref) of the wrong size is an error, never a silent
/// write past its end.
template <typename Out>
void fit_output(const char* operation, const char* name, Out& out, Eigen::Index rows, Eigen::Index cols) {
  if (out.rows() == rows && out.cols() == cols) return;
  using Bare = std::remove_cv_t<Out>;
  constexpr bool resizable = std::is_base_of_v<Eigen::PlainObjectBase<Bare>, Bare>;
  if constexpr (resizable) {
    const bool rows_fit = Bare::RowsAtCompileTime == Eigen::Dynamic || Bare::RowsAtCompileTime == rows;
    const bool cols_fit = Bare::ColsAtCompileTime == Eigen::Dynamic || Bare::ColsAtCompileTime == cols;
    const bool max_fits = (Bare::MaxRowsAtCompileTime == Eigen::Dynamic || rows <= Bare::MaxRowsAtCompileTime) &&
                          (Bare::MaxColsAtCompileTime == Eigen::Dynamic || cols <= Bare::MaxColsAtCompileTime);
    if (rows_fit && cols_fit && max_fits) {
      out.resize(rows, cols);
      return;
    }
  }
  require_shape(operation, operand(name, out), rows, cols, "the result's shape");
}

/// Grows scratch that attn owns to at least rows×cols; never shrinks, so a loop that reuses
/// it allocates on its first call only.
template <typename Matrix>
void grow_to(Matrix& matrix, Eigen::Index rows, Eigen::Index cols) {
  if (matrix.rows() < rows || matrix.cols() < cols) {
    matrix.resize(std::max(rows, matrix.rows()), std::max(cols, matrix.cols()));
  }
}

/// True for a matrix stored in memory with unit inner stride (a Matrix, Map or Ref, or a
/// block of whole columns of a column-major one, of whole rows of a row-major one).
template <typename Derived>
inline constexpr bool is_unit_stride_v =
    (Eigen::internal::traits<Derived>::Flags & Eigen::DirectAccessBit) != 0 && Derived::InnerStrideAtCompileTime == 1;

/// The one type the kernels see for every operand stored with unit inner stride: a map of
/// its storage order with a run-time outer stride.
template <typename Scalar, bool RowMajor, typename Element = const Scalar>
using strided_map = Eigen::Map<std::conditional_t<std::is_const_v<Element>,
                                                  const Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic,
                                                                      RowMajor ? Eigen::RowMajor : Eigen::ColMajor>,
                                                  Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic,
                                                                RowMajor ? Eigen::RowMajor : Eigen::ColMajor>>,
                               Eigen::Unaligned, Eigen::OuterStride<>>;

/// An operand as the kernels take it: a Matrix, a block of one, a Map or a Ref all become
/// the same `strided_map` (no copy), so the tile code is compiled once per storage order
/// instead of once per operand type: a test or a program passing five kinds of matrix
/// compiles the kernel twice, not five times. An expression without storage (`2 * q`)
/// passes through as it is, read where the kernel reads it.
template <typename Derived>
decltype(auto) kernel_operand(const Eigen::MatrixBase<Derived>& operand) {
  if constexpr (is_unit_stride_v<Derived>) {
    return strided_map<typename Derived::Scalar, Derived::IsRowMajor>(
        operand.derived().data(), operand.rows(), operand.cols(), Eigen::OuterStride<>(operand.derived().outerStride()));
  } else {
    return operand.derived();
  }
}

/// Rows of a head-major store as the tiled kernel reads them: `tokens` rows of `heads`
/// heads of `width` columns, heads side by side as `flash_attention` takes them (column
/// h·width + c is column c of head h), head h's rows contiguous from data + h·head_stride.
/// One head's keys of a tile are one run of memory (`head_rows`).
template <typename Stored>
struct HeadMajorRows {
  using Scalar = Stored;
  static constexpr bool IsRowMajor = true;

  const Stored* data;
  Eigen::Index tokens;
  Eigen::Index width;
  Eigen::Index heads;
  Eigen::Index head_stride;

  Eigen::Index rows() const noexcept { return tokens; }
  Eigen::Index cols() const noexcept { return heads * width; }
  /// Row `row` of head `head`: `width` values.
  const Stored* row(Eigen::Index head, Eigen::Index row) const noexcept {
    return data + head * head_stride + row * width;
  }
  /// Rows [first, first + count) of head `head`: count × width, row-major, contiguous.
  auto head_rows(Eigen::Index head, Eigen::Index first, Eigen::Index count) const {
    using Rows = Eigen::Matrix<Stored, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
    return Eigen::Map<const Rows>(data + head * head_stride + first * width, count, width);
  }
};

/// A head-major operand (a KV cache's layer) is taken as it is.
template <typename Stored>
const HeadMajorRows<Stored>& kernel_operand(const HeadMajorRows<Stored>& operand) noexcept {
  return operand;
}

/// The same for an output the kernels write: a map of it, or the output itself.
template <typename Out>
decltype(auto) kernel_output(Out& out) {
  if constexpr (is_unit_stride_v<Out>) {
    using Scalar = typename Out::Scalar;
    return strided_map<Scalar, Out::IsRowMajor, Scalar>(out.data(), out.rows(), out.cols(),
                                                        Eigen::OuterStride<>(out.outerStride()));
  } else {
    return (out);
  }
}

/// Eigen refuses to mix scalars too, but with a page of template errors; say it in a line.
template <typename First, typename... Rest>
constexpr void require_same_scalar() noexcept {
  static_assert((std::is_same_v<typename First::Scalar, typename Rest::Scalar> && ...),
                "attn: all operands must have the same scalar type; convert one with "
                ".cast<float>() or .cast<double>()");
}

/// An output of a kernel computing in `Scalar`: in `Scalar`, or stored in 16 bits
/// (rounded from `Scalar` once, at the end).
template <typename Out, typename Scalar>
constexpr void require_output_scalar() noexcept {
  using Stored = typename std::decay_t<Out>::Scalar;
  static_assert(std::is_same_v<compute_scalar_t<Stored>, Scalar>,
                "attn: the output must have the scalar the kernel computes in (float for bfloat16 and "
                "half operands), or be bfloat16 or half over a float computation");
}

template <typename Out>
constexpr void require_writable() noexcept {
  static_assert(is_writable_matrix_v<Out>,
                "attn: an output must be a writable Eigen matrix, Map, Ref or block (not const, "
                "not an expression)");
}

}  // namespace attn::detail

#pragma once
/// @file
/// `attn::MatrixView`: a read-only, non-owning view of a matrix stored in memory, the way
/// attention options refer to a caller's mask or bias without copying n_q×n_k entries.

#include <type_traits>

#include <Eigen/Core>

namespace attn {

/// A read-only view of a `T` matrix that lives in caller memory: a `Matrix`, an `Array`, a
/// `Map` over a user buffer, or a block of one, in either storage order, with any strides.
/// An empty view (the default) means "absent".
///
/// The view does not own its data: the matrix must outlive every use of the view. Binding
/// a temporary plain matrix is rejected at compile time because it would dangle at once.
template <typename T>
class MatrixView {
 public:
  /// Column-major map with both strides free, able to describe any directly stored matrix.
  using Map = Eigen::Map<const Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>, Eigen::Unaligned,
                         Eigen::Stride<Eigen::Dynamic, Eigen::Dynamic>>;

  MatrixView() noexcept = default;

  template <typename Derived>
  MatrixView(const Eigen::DenseBase<Derived>& matrix) noexcept  // NOLINT(google-explicit-constructor)
      : data_(matrix.derived().data()), present_(true), rows_(matrix.rows()), cols_(matrix.cols()) {
    static_assert(std::is_same_v<typename Derived::Scalar, T>,
                  "attn::MatrixView: the matrix's scalar type must match the view's (a mask is a "
                  "bool matrix; a bias has the attention's scalar type)");
    static_assert((Eigen::internal::traits<Derived>::Flags & Eigen::DirectAccessBit) != 0,
                  "attn::MatrixView: a mask or bias must be stored in memory (a Matrix, Array, Map "
                  "or block of one); evaluate an expression into a matrix first");
    const Eigen::Index inner = matrix.derived().innerStride();
    const Eigen::Index outer = matrix.derived().outerStride();
    row_stride_ = Derived::IsRowMajor ? outer : inner;
    col_stride_ = Derived::IsRowMajor ? inner : outer;
  }

  /// A temporary plain matrix would be destroyed at the end of the statement.
  template <typename Derived>
  MatrixView(Eigen::PlainObjectBase<Derived>&& temporary) = delete;

  /// True when no matrix was given (a 0×0 matrix that was given is not empty).
  bool empty() const noexcept { return !present_; }
  Eigen::Index rows() const noexcept { return rows_; }
  Eigen::Index cols() const noexcept { return cols_; }

  const T& operator()(Eigen::Index row, Eigen::Index col) const noexcept {
    return data_[row * row_stride_ + col * col_stride_];
  }

  /// The viewed matrix as an Eigen expression, for whole-matrix arithmetic.
  Map map() const noexcept {
    return Map(data_, rows_, cols_, Eigen::Stride<Eigen::Dynamic, Eigen::Dynamic>(col_stride_, row_stride_));
  }

 private:
  const T* data_ = nullptr;
  bool present_ = false;
  Eigen::Index rows_ = 0;
  Eigen::Index cols_ = 0;
  Eigen::Index row_stride_ = 0;
  Eigen::Index col_stride_ = 0;
};

}  // namespace attn

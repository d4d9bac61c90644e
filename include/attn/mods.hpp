#pragma once
/// @file
/// How the tiled kernel and the reference path see a multi-head problem: `Heads`, the
/// layout of several heads side by side in one matrix, and `Mods`, compile-time score and
/// mask modifiers inlined into the loops (in the spirit of PyTorch's FlexAttention), with
/// the identity modifiers that cost nothing.

#include <type_traits>

#include <Eigen/Core>

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

/// Compile-time hooks into the attention loops: `score_mod(score, query, key, head)`
/// returns the score to use in place of scale·q·k + bias (ALiBi, soft-capping, relative
/// biases), and `mask_mod(query, key, head)` returns false to mask a key. The score
/// modifier sees every score before any mask applies, and a masked key stays masked
/// whatever it returned. Both are inlined; neither needs an n_q×n_k matrix. Indices are
/// global: query in [0, n_q), key in [0, n_k), head in [0, H).
template <typename ScoreMod = NoScoreMod, typename MaskMod = NoMaskMod>
struct Mods {
  ScoreMod score_mod{};
  MaskMod mask_mod{};
};
template <typename ScoreMod, typename MaskMod>
Mods(ScoreMod, MaskMod) -> Mods<ScoreMod, MaskMod>;

namespace detail {

/// Whether a modifier declares itself the identity, so the loops can skip calling it.
template <typename Mod, typename = void>
struct is_identity_mod : std::false_type {};
template <typename Mod>
struct is_identity_mod<Mod, std::void_t<decltype(Mod::is_identity)>> : std::bool_constant<Mod::is_identity> {};

}  // namespace detail
}  // namespace attn

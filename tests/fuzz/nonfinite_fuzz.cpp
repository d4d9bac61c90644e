// A bounded-time randomized test of attn's rules for NaN, ±∞ and masked garbage: random
// shapes, heads, masks, tile sizes and thread counts, with non-finite values injected into
// q, k and v, checked against a plain double-precision loop written here (it shares no
// code with the library). A plain main rather than a libFuzzer target, so that it runs in
// every build configuration under ctest (test fuzz.nonfinite).
//
// The rules, per query row i and head (score s_ij = scale·q_i·k_j + bias_ij; key j is
// masked for query i by causal, the keep-mask, valid_keys, the window, or a bias of −∞):
//   1. A masked key has no influence, whatever its k and v rows hold; a −∞ bias masks its
//      key even where the unbiased score is NaN or +∞.
//   2. An attended key whose score is NaN or +∞ makes the whole output row NaN, and the
//      row's log-sum-exp NaN.
//   3. A score of −∞ from the product itself gives its key weight 0, as if masked.
//   4. A row that attends nothing is exactly zero, with log-sum-exp −∞.
//   5. Otherwise out_ic = Σ_j p_ij·v_jc over the attended keys: a non-finite v_jc of an
//      attended key makes out_ic non-finite (NaN or ±∞: float may round a weight to 0, and
//      0·∞ = NaN), and nothing else; the other columns and the log-sum-exp stay finite.
// Finite inputs stay within [−2, 2] (bias within [−3, 3]), so that nothing overflows in
// float: the only non-finite values are the injected ones.
//
// Checked: the tiled kernel (flash_attention_into, several tile sizes, heads, threads),
// the reference path (attention_into per head, with its weights) and, in one case in
// five, merge_into of two disjoint key halves (of the kernel's halves, and of the loop's).
//
// Usage: attn_fuzz_nonfinite [--seconds S] [--seed N] [--cases N] [--case K] [--keep-going]
//   Runs cases 0, 1, 2, … of seed N until S seconds (default 8) or N cases have passed,
//   and stops at the first failure, printing the case; each case depends on (seed, case
//   index) alone, so `--seed N --case K` replays case K by itself. `--keep-going` runs on
//   past failures and ends with a table of the distinct failures and where each was first
//   seen (with --case, it prints every check's failure). ctest runs it with
//   OMP_WAIT_POLICY=passive (see tests/CMakeLists.txt); by hand, set it too on a busy machine.

#include <algorithm>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <iomanip>
#include <iostream>
#include <limits>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include <Eigen/Core>

#include <attn/attention.hpp>
#include <attn/flash.hpp>
#include <attn/merge.hpp>

#include "reference.hpp"  // attn_test::tolerance only: the loop below is this file's own

// Under AddressSanitizer (the sanitize workflow), a report ends the process through the
// sanitizer's own exit, which no signal handler sees: its death callback names the case.
#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#define ATTN_FUZZ_ASAN 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__)
#define ATTN_FUZZ_ASAN 1
#endif
#if defined(ATTN_FUZZ_ASAN)
#include <sanitizer/common_interface_defs.h>
#endif

namespace {

using Index = Eigen::Index;
template <typename Scalar>
using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
template <typename Scalar>
using RowMajorMatrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using BoolMatrix = Eigen::Matrix<bool, Eigen::Dynamic, Eigen::Dynamic>;

constexpr double nan_value = std::numeric_limits<double>::quiet_NaN();
constexpr double infinity = std::numeric_limits<double>::infinity();

// --- Random numbers ----------------------------------------------------------------------

/// splitmix64 with its own integer and real draws rather than <random>'s distributions,
/// whose output differs between standard libraries: a (seed, case) pair names the same
/// case for g++ with libstdc++ and clang++ with libc++.
class Rng {
 public:
  explicit Rng(std::uint64_t state) : state_(state) {}

  std::uint64_t next() {
    std::uint64_t z = (state_ += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
  }
  /// Uniform in [lo, hi], both included (the modulo bias is irrelevant at these ranges).
  Index between(Index lo, Index hi) {
    return lo + static_cast<Index>(next() % static_cast<std::uint64_t>(hi - lo + 1));
  }
  /// Uniform in [lo, hi): the top 53 bits as a fraction of 2^53.
  double uniform(double lo, double hi) {
    return lo + (hi - lo) * (static_cast<double>(next() >> 11) * (1.0 / 9007199254740992.0));
  }
  bool chance(double probability) { return uniform(0.0, 1.0) < probability; }

 private:
  std::uint64_t state_;
};

/// The generator of case `index` of `seed`: a function of both alone, so that any case can
/// be replayed without running the ones before it.
Rng case_rng(std::uint64_t seed, std::uint64_t index) {
  Rng seed_mixer(seed);
  Rng index_mixer(index ^ seed_mixer.next());
  return Rng(index_mixer.next());
}

// --- A case: everything drawn, as plain data that can be printed and replayed --------------

/// The tile sizes of flash_attention_into<BlockQ, BlockK>: the defaults, and small ones that
/// put a row's keys in many tiles (and a tile's keys in several query blocks).
enum class Tiles { defaults, q4_k8, q16_k32, q1_k3 };

/// The explicit tile sizes {BlockQ, BlockK}; {0, 0} = the defaults.
std::pair<Index, Index> tile_sizes(Tiles tiles) {
  switch (tiles) {
    case Tiles::defaults: return {0, 0};
    case Tiles::q4_k8: return {4, 8};
    case Tiles::q16_k32: return {16, 32};
    case Tiles::q1_k3: return {1, 3};
  }
  return {0, 0};
}

const char* tiles_name(Tiles tiles) {
  switch (tiles) {
    case Tiles::defaults: return "<0, 0> (defaults)";
    case Tiles::q4_k8: return "<4, 8>";
    case Tiles::q16_k32: return "<16, 32>";
    case Tiles::q1_k3: return "<1, 3>";
  }
  return "?";
}

struct Injection {
  std::string where;  // "q", "k", "v", or "k and v" for a whole key row of both
  Index row = 0;
  Index col = -1;     // −1: the whole row
  double value = nan_value;
  std::string aim;    // why this position was chosen
};

struct Case {
  std::uint64_t seed = 0;
  std::uint64_t index = 0;
  bool use_double = false;
  Index n_q = 0, n_k = 0, num_heads = 1, num_kv_heads = 1, d_k = 1, d_v = 1;
  std::optional<double> scale;  // absent: the default 1/√d_k
  bool causal = false;
  std::optional<BoolMatrix> keep;  // true = may attend
  double keep_density = 1.0;
  std::vector<Index> blocked_queries;  // rows of `keep` set all false
  std::vector<Index> blocked_keys;     // columns of `keep` set all false
  std::optional<Index> valid_keys;
  std::optional<std::pair<Index, Index>> window;  // {left, right}, −1 = unbounded
  std::optional<Eigen::MatrixXd> bias;             // n_q×n_k, shared by every head
  Index bias_minus_infinities = 0;
  int threads = 1;
  Tiles tiles = Tiles::defaults;
  bool row_major_weights = false;  // the reference path's weights: both softmax loops
  std::optional<Index> merge_split;  // keys [0, split) and [split, n_k) merged
  // The values the library sees, already rounded to the case's scalar, so that the loop
  // below computes from exactly the same inputs; row-major, so that its dot products read
  // contiguous rows (the loop is most of a case's time under AddressSanitizer).
  RowMajorMatrix<double> q, k, v;
  // Rule 1 for every (query, key), worked out once: 1 = masked (row-major, n_q×n_k).
  std::vector<char> masked_table;
  std::vector<Injection> injections;

  Index group() const { return num_heads / num_kv_heads; }
  double scale_value() const { return scale ? *scale : 1.0 / std::sqrt(static_cast<double>(d_k)); }
};

double round_to_scalar(const Case& c, double x) {
  return c.use_double ? x : static_cast<double>(static_cast<float>(x));
}

Eigen::MatrixXd random_values(Rng& rng, const Case& c, Index rows, Index cols, double range) {
  Eigen::MatrixXd m(rows, cols);
  for (Index col = 0; col < cols; ++col) {
    for (Index row = 0; row < rows; ++row) m(row, col) = round_to_scalar(c, rng.uniform(-range, range));
  }
  return m;
}

/// The positional rules and the keep-mask, written out from options.hpp's definitions.
bool masked_by_position_or_keep(const Case& c, Index query, Index key) {
  const Index offset = c.n_k - c.n_q;  // bottom-right alignment
  if (c.causal && key > query + offset) return true;
  if (c.valid_keys && key >= *c.valid_keys) return true;
  if (c.window) {
    const auto [left, right] = *c.window;
    if (left >= 0 && key < query + offset - left) return true;
    if (right >= 0 && key > query + offset + right) return true;
  }
  return c.keep && !(*c.keep)(query, key);
}

/// Rule 1's notion of a masked key: by a mask, or by a bias of −∞.
std::vector<char> tabulate_masks(const Case& c) {
  std::vector<char> table(static_cast<std::size_t>(c.n_q * c.n_k));
  for (Index query = 0; query < c.n_q; ++query) {
    for (Index key = 0; key < c.n_k; ++key) {
      table[static_cast<std::size_t>(query * c.n_k + key)] =
          masked_by_position_or_keep(c, query, key) || (c.bias && (*c.bias)(query, key) == -infinity);
    }
  }
  return table;
}

bool masked(const Case& c, Index query, Index key) {
  return c.masked_table[static_cast<std::size_t>(query * c.n_k + key)] != 0;
}

void draw_shapes(Rng& rng, Case& c) {
  c.use_double = rng.chance(0.5);
  if (rng.chance(0.1)) {
    // Few queries over more than split_key_chunk (1024) keys: the kernel splits the keys
    // across work items and merges the chunks through their log-sum-exp.
    c.n_q = rng.between(1, 4);
    c.n_k = rng.between(1025, 1400);
  } else {
    c.n_q = rng.chance(0.05) ? 0 : rng.between(1, 40);
    c.n_k = rng.chance(0.05) ? 0 : rng.between(1, 300);
  }
  if (rng.chance(0.2)) c.merge_split = rng.between(0, c.n_k);
  // The merge check computes every score a second time, in two halves.
  const Index passes = c.merge_split ? 2 : 1;
  c.num_heads = rng.between(1, 4);
  // At most 16000 scores (n_q·H·n_k, per pass) per case: the largest shapes take fewer
  // heads, so that one case stays within ~50 ms under AddressSanitizer at -O1 on a busy
  // machine.
  constexpr Index score_budget = 16000;
  while (c.num_heads > 1 && passes * c.n_q * c.num_heads * c.n_k > score_budget) --c.num_heads;
  std::vector<Index> divisors;
  for (Index d = 1; d <= c.num_heads; ++d) {
    if (c.num_heads % d == 0) divisors.push_back(d);
  }
  c.num_kv_heads = divisors[static_cast<std::size_t>(rng.between(0, static_cast<Index>(divisors.size()) - 1))];
  c.d_k = rng.between(1, 17);
  c.d_v = rng.between(1, 17);
  // At most 0.35: scores stay within ±(4·0.35·17 + 3), and their softmax weights far above
  // float's underflow, as with the default scale.
  if (rng.chance(0.3)) c.scale = round_to_scalar(c, rng.uniform(0.05, 0.35));
  c.threads = static_cast<int>(rng.between(1, 3));
  c.tiles = static_cast<Tiles>(rng.between(0, 3));
  // A tile costs microseconds whatever its size (tens under AddressSanitizer): small tiles
  // on a large problem would take a case past 50 ms. Such cases take the next larger tiles
  // (tile_count is only asked about the explicit sizes).
  constexpr Index tile_budget = 2000;
  const auto tile_count = [&](Tiles tiles) {
    const auto [block_q, block_k] = tile_sizes(tiles);
    return passes * (c.n_q + block_q - 1) / block_q * c.num_heads * ((c.n_k + block_k - 1) / block_k);
  };
  if (c.tiles == Tiles::q1_k3 && tile_count(c.tiles) > tile_budget) c.tiles = Tiles::q4_k8;
  if (c.tiles == Tiles::q4_k8 && tile_count(c.tiles) > tile_budget) c.tiles = Tiles::q16_k32;
  c.row_major_weights = rng.chance(0.5);
}

void draw_masks(Rng& rng, Case& c) {
  c.causal = rng.chance(0.3);
  if (rng.chance(0.3)) c.valid_keys = rng.between(0, c.n_k);
  if (rng.chance(0.25)) {
    const auto side = [&] { return rng.chance(0.3) ? Index(-1) : rng.between(0, std::max<Index>(c.n_k / 2, 0)); };
    const Index left = side();
    c.window = {left, side()};
  }
  if (rng.chance(0.35)) {
    c.keep_density = rng.uniform(0.2, 1.0);
    BoolMatrix keep(c.n_q, c.n_k);
    for (Index key = 0; key < c.n_k; ++key) {
      for (Index query = 0; query < c.n_q; ++query) keep(query, key) = rng.chance(c.keep_density);
    }
    // (An empty row or column of an empty matrix would be a null pointer plus an offset.)
    if (c.n_q > 0 && c.n_k > 0 && rng.chance(0.3)) {
      for (Index n = rng.between(1, 2); n > 0; --n) c.blocked_queries.push_back(rng.between(0, c.n_q - 1));
    }
    if (c.n_q > 0 && c.n_k > 0 && rng.chance(0.3)) c.blocked_keys.push_back(rng.between(0, c.n_k - 1));
    for (const Index query : c.blocked_queries) keep.row(query).setConstant(false);
    for (const Index key : c.blocked_keys) keep.col(key).setConstant(false);
    c.keep = keep;
  }
  if (rng.chance(0.35)) {
    Eigen::MatrixXd bias = random_values(rng, c, c.n_q, c.n_k, 3.0);
    const double minus_infinity_rate = rng.chance(0.5) ? 0.05 : 0.0;
    for (Index key = 0; key < c.n_k; ++key) {
      for (Index query = 0; query < c.n_q; ++query) {
        if (rng.chance(minus_infinity_rate)) bias(query, key) = -infinity;
      }
    }
    // Whole rows and columns of −∞: queries that attend nothing, keys nobody attends.
    if (c.n_q > 0 && c.n_k > 0 && rng.chance(0.2)) bias.row(rng.between(0, c.n_q - 1)).setConstant(-infinity);
    if (c.n_q > 0 && c.n_k > 0 && rng.chance(0.2)) bias.col(rng.between(0, c.n_k - 1)).setConstant(-infinity);
    c.bias_minus_infinities = (bias.array() == -infinity).count();
    c.bias = bias;
  }
}

double draw_non_finite(Rng& rng) {
  const Index kind = rng.between(0, 9);
  return kind < 4 ? nan_value : kind < 7 ? infinity : -infinity;
}

std::vector<Index> keys_masked_for(const Case& c, Index query) {
  std::vector<Index> keys;
  for (Index key = 0; key < c.n_k; ++key) {
    if (masked(c, query, key)) keys.push_back(key);
  }
  return keys;
}

std::vector<Index> keys_masked_for_every_query(const Case& c) {
  std::vector<Index> keys;
  for (Index key = 0; key < c.n_k; ++key) {
    bool every = true;
    for (Index query = 0; query < c.n_q && every; ++query) every = masked(c, query, key);
    if (every) keys.push_back(key);
  }
  return keys;
}

Index pick(Rng& rng, const std::vector<Index>& from) {
  return from[static_cast<std::size_t>(rng.between(0, static_cast<Index>(from.size()) - 1))];
}

/// One non-finite value in a random entry of `where` ("q", "k" or "v"); false if it is empty.
bool inject_anywhere(Rng& rng, Case& c, const std::string& where, const std::string& aim) {
  const RowMajorMatrix<double>& m = where == "q" ? c.q : where == "k" ? c.k : c.v;
  if (m.size() == 0) return false;
  c.injections.push_back({where, rng.between(0, m.rows() - 1), rng.between(0, m.cols() - 1), draw_non_finite(rng), aim});
  return true;
}

/// One non-finite value in key `key`'s row of k or v.
void inject_in_key(Rng& rng, Case& c, Index key, const std::string& aim) {
  const bool in_k = rng.chance(0.5);
  const Index cols = in_k ? c.k.cols() : c.v.cols();
  c.injections.push_back({in_k ? "k" : "v", key, rng.between(0, cols - 1), draw_non_finite(rng), aim});
}

/// 1–4 non-finite values: anywhere, or where a rule says they must not matter (the rows of
/// masked keys, a whole padded key row, the q row of a query that attends nothing).
void draw_injections(Rng& rng, Case& c) {
  for (Index n = rng.between(1, 4); n > 0; --n) {
    const Index strategy = rng.between(0, 6);
    if (strategy == 3 && c.n_q > 0) {
      const Index query = rng.between(0, c.n_q - 1);
      const std::vector<Index> keys = keys_masked_for(c, query);
      if (!keys.empty()) {
        inject_in_key(rng, c, pick(rng, keys), "a key masked for query " + std::to_string(query));
        continue;
      }
    } else if (strategy == 4) {
      const std::vector<Index> keys = keys_masked_for_every_query(c);
      if (!keys.empty()) {
        inject_in_key(rng, c, pick(rng, keys), "a key masked for every query");
        continue;
      }
    } else if (strategy == 5 && c.valid_keys && *c.valid_keys < c.n_k) {
      c.injections.push_back({"k and v", rng.between(*c.valid_keys, c.n_k - 1), -1, nan_value, "a padding key row"});
      continue;
    } else if (strategy == 6) {
      std::vector<Index> queries;
      for (Index query = 0; query < c.n_q; ++query) {
        if (static_cast<Index>(keys_masked_for(c, query).size()) == c.n_k) queries.push_back(query);
      }
      if (!queries.empty()) {
        c.injections.push_back({"q", pick(rng, queries), rng.between(0, c.q.cols() - 1), draw_non_finite(rng),
                                "the query row of a query that attends nothing"});
        continue;
      }
    }
    // Strategies 0–2, and the fallback when the targeted position does not exist.
    const Index tensor = strategy <= 2 ? strategy : rng.between(0, 2);
    inject_anywhere(rng, c, tensor == 0 ? "q" : tensor == 1 ? "k" : "v", "anywhere");
  }
  for (const Injection& injection : c.injections) {
    if (injection.where == "k and v") {
      c.k.row(injection.row).setConstant(injection.value);
      c.v.row(injection.row).setConstant(injection.value);
    } else {
      RowMajorMatrix<double>& m = injection.where == "q" ? c.q : injection.where == "k" ? c.k : c.v;
      m(injection.row, injection.col) = injection.value;
    }
  }
}

Case draw_case(std::uint64_t seed, std::uint64_t index) {
  Rng rng = case_rng(seed, index);
  Case c;
  c.seed = seed;
  c.index = index;
  draw_shapes(rng, c);
  draw_masks(rng, c);
  c.masked_table = tabulate_masks(c);
  c.q = random_values(rng, c, c.n_q, c.num_heads * c.d_k, 2.0);
  c.k = random_values(rng, c, c.n_k, c.num_kv_heads * c.d_k, 2.0);
  c.v = random_values(rng, c, c.n_k, c.num_kv_heads * c.d_v, 2.0);
  if (rng.chance(0.7)) draw_injections(rng, c);
  return c;
}

// --- The reference: a plain loop in double ------------------------------------------------

/// What rules 1–4 make of query `query`'s keys [from, to) in `head`.
struct RowAnalysis {
  std::vector<Index> masked;           // rule 1
  std::vector<Index> poisoning;        // attended, score NaN or +∞: rule 2
  std::vector<Index> minus_infinite;   // attended, score −∞: rule 3
  std::vector<Index> attended;         // finite scores
  std::vector<double> scores;          // of `attended`
};

RowAnalysis analyse_row(const Case& c, Index head, Index query, Index from, Index to) {
  const Index kv_head = head / c.group();
  RowAnalysis row;
  for (Index key = from; key < to; ++key) {
    if (masked(c, query, key)) {
      row.masked.push_back(key);
      continue;
    }
    // Summed in double, NaN, +∞ and −∞ come out whatever the order: any NaN term, or terms of
    // both infinities, give NaN; otherwise an infinite term decides the sign.
    const double* q_row = c.q.data() + query * c.q.cols() + head * c.d_k;
    const double* k_row = c.k.data() + key * c.k.cols() + kv_head * c.d_k;
    double dot = 0.0;
    for (Index d = 0; d < c.d_k; ++d) dot += q_row[d] * k_row[d];
    double score = c.scale_value() * dot;
    if (c.bias) score += (*c.bias)(query, key);
    if (std::isnan(score) || score == infinity) {
      row.poisoning.push_back(key);
    } else if (score == -infinity) {
      row.minus_infinite.push_back(key);
    } else {
      row.attended.push_back(key);
      row.scores.push_back(score);
    }
  }
  return row;
}

enum class RowKind { attends, poisoned, empty };

const char* row_kind_name(RowKind kind) {
  switch (kind) {
    case RowKind::attends: return "attends keys (rule 5)";
    case RowKind::poisoned: return "NaN row (rule 2)";
    case RowKind::empty: return "attends nothing (rule 4)";
  }
  return "?";
}

/// One head's expected results over keys [from, to).
struct HeadExpectation {
  std::vector<RowKind> kind;  // per query
  Eigen::VectorXd lse;        // per query
  // (n_q × d_v); a non-finite entry of an `attends` row must come out non-finite.
  RowMajorMatrix<double> out;
  // (n_q × keys); in a NaN row, NaN where the weight must be NaN and 0 where 0 or NaN will
  // do (masked keys, −∞ scores); elsewhere 0 exactly for every key not attended.
  RowMajorMatrix<double> weights;
};

HeadExpectation expect_head(const Case& c, Index head, Index from, Index to) {
  const Index kv_head = head / c.group();
  HeadExpectation e{std::vector<RowKind>(static_cast<std::size_t>(c.n_q)), Eigen::VectorXd(c.n_q),
                    RowMajorMatrix<double>::Zero(c.n_q, c.d_v), RowMajorMatrix<double>::Zero(c.n_q, to - from)};
  for (Index query = 0; query < c.n_q; ++query) {
    const RowAnalysis row = analyse_row(c, head, query, from, to);
    RowKind& kind = e.kind[static_cast<std::size_t>(query)];
    if (!row.poisoning.empty()) {
      kind = RowKind::poisoned;
      e.lse(query) = nan_value;
      e.out.row(query).setConstant(nan_value);
      for (const Index key : row.poisoning) e.weights(query, key - from) = nan_value;
      for (const Index key : row.attended) e.weights(query, key - from) = nan_value;
      continue;
    }
    if (row.attended.empty()) {
      kind = RowKind::empty;
      e.lse(query) = -infinity;
      continue;
    }
    kind = RowKind::attends;
    const double max_score = *std::max_element(row.scores.begin(), row.scores.end());
    double total = 0.0;
    for (const double score : row.scores) total += std::exp(score - max_score);
    e.lse(query) = max_score + std::log(total);
    double* out_row = e.out.data() + query * c.d_v;
    for (std::size_t n = 0; n < row.attended.size(); ++n) {
      const Index key = row.attended[n];
      const double p = std::exp(row.scores[n] - max_score) / total;
      e.weights(query, key - from) = p;
      const double* v_row = c.v.data() + key * c.v.cols() + kv_head * c.d_v;
      for (Index col = 0; col < c.d_v; ++col) out_row[col] += p * v_row[col];
    }
  }
  return e;
}

std::vector<HeadExpectation> expect_heads(const Case& c, Index from, Index to) {
  std::vector<HeadExpectation> heads;
  for (Index head = 0; head < c.num_heads; ++head) heads.push_back(expect_head(c, head, from, to));
  return heads;
}

/// The suite's tolerance (tests/reference.hpp) with the size of these scores: |q·k| ≤ 4·d_k,
/// and the outputs are averages of values within ±2.
template <typename Scalar>
double tolerance_for(const Case& c) {
  const double score_bound = 4.0 * c.scale_value() * static_cast<double>(c.d_k) + (c.bias ? 3.0 : 0.0);
  return attn_test::tolerance<Scalar>(c.d_k, c.n_k, 2.0 * score_bound);
}

// --- Judging one element ------------------------------------------------------------------

/// The rule an element breaks, or nullptr.
const char* judge_out(RowKind kind, double expected, double got, double tolerance) {
  switch (kind) {
    case RowKind::poisoned:
      return std::isnan(got) ? nullptr : "rule 2: a row attending a NaN or +inf score is NaN in every column";
    case RowKind::empty:
      return got == 0.0 ? nullptr : "rule 4: a row attending nothing is exactly zero";
    case RowKind::attends:
      if (!std::isfinite(expected)) {
        return std::isfinite(got) ? "rule 5: a non-finite value of an attended key makes its column non-finite"
                                  : nullptr;
      }
      if (!std::isfinite(got)) {
        return "rules 1, 3, 5: masked keys, keys scored -inf and other columns' values have no influence "
               "(expected finite)";
      }
      return std::abs(got - expected) <= tolerance ? nullptr : "rule 5: within tolerance of the double reference";
  }
  return nullptr;
}

const char* judge_lse(RowKind kind, double expected, double got, double tolerance) {
  switch (kind) {
    case RowKind::poisoned: return std::isnan(got) ? nullptr : "rule 2: the lse of a NaN row is NaN";
    case RowKind::empty: return got == -infinity ? nullptr : "rule 4: the lse of a row attending nothing is -inf";
    case RowKind::attends:
      if (!std::isfinite(got)) return "rule 5: the lse of a row attending finite scores is finite";
      return std::abs(got - expected) <= tolerance ? nullptr : "rule 5: lse within tolerance of the double reference";
  }
  return nullptr;
}

const char* judge_weight(RowKind kind, double expected, double got, double tolerance) {
  if (kind == RowKind::poisoned) {
    if (std::isnan(expected)) return std::isnan(got) ? nullptr : "rule 2: the weights of a NaN row are NaN";
    return got == 0.0 || std::isnan(got) ? nullptr : "rule 2: a masked key's weight in a NaN row is 0 or NaN";
  }
  if (expected == 0.0) {
    return got == 0.0 ? nullptr : "rules 1, 3, 4: a masked or -inf-scored key's weight is exactly 0";
  }
  if (!std::isfinite(got)) return "rule 5: the weights of a row attending finite scores are finite";
  return std::abs(got - expected) <= tolerance ? nullptr : "rule 5: weight within tolerance of the double reference";
}

const char* value_class(double x) {
  if (std::isnan(x)) return "NaN";
  if (x == infinity) return "+inf";
  if (x == -infinity) return "-inf";
  if (x == 0.0) return "0";
  return "finite";
}

/// The first element a check found wrong, with what is needed to understand it.
struct Mismatch {
  std::string check;    // which call: "tiled kernel", "reference path", "merge_into of …"
  std::string element;  // "out", "lse", "weights" or "exception"
  Index head = 0, row = 0, col = 0;
  RowKind kind = RowKind::attends;
  std::string rule;
  double expected = 0.0, got = 0.0;
  std::vector<double> expected_row, got_row;
  Index key_from = 0, key_to = 0;  // the keys the checked call saw
  std::string context;             // extra lines (merge halves)

  /// Failures of the same kind share a signature, for --keep-going's table.
  std::string signature() const {
    if (element == "exception") return check + ": threw";
    return check + ", " + element + ": " + rule + "; got " + value_class(got);
  }
};

template <typename Derived>
std::vector<double> row_values(const Eigen::MatrixBase<Derived>& m, Index row) {
  std::vector<double> values;
  for (Index col = 0; col < m.cols(); ++col) values.push_back(static_cast<double>(m(row, col)));
  return values;
}

/// Compares one head's output block (n_q × d_v) and, when given, its lse column and weights.
template <typename Out, typename Lse, typename Weights>
std::optional<Mismatch> compare_head(const std::string& check, const HeadExpectation& e, Index head, const Out& out,
                                     const Lse* lse, const Weights* weights, double tolerance) {
  Mismatch m;
  m.check = check;
  m.head = head;
  for (Index row = 0; row < out.rows(); ++row) {
    m.row = row;
    m.kind = e.kind[static_cast<std::size_t>(row)];
    for (Index col = 0; col < out.cols(); ++col) {
      const double got = static_cast<double>(out(row, col));
      if (const char* rule = judge_out(m.kind, e.out(row, col), got, tolerance)) {
        m.element = "out";
        m.col = col;
        m.rule = rule;
        m.expected = e.out(row, col);
        m.got = got;
        m.expected_row = row_values(e.out, row);
        m.got_row = row_values(out, row);
        return m;
      }
    }
    // After the outputs, so that a NaN row that came out finite is reported as such rather
    // than by its log-sum-exp.
    if (lse) {
      const double got = static_cast<double>((*lse)(row));
      if (const char* rule = judge_lse(m.kind, e.lse(row), got, tolerance)) {
        m.element = "lse";
        m.rule = rule;
        m.expected = e.lse(row);
        m.got = got;
        m.expected_row = row_values(e.out, row);
        m.got_row = row_values(out, row);
        return m;
      }
    }
    if (weights) {
      for (Index col = 0; col < weights->cols(); ++col) {
        const double got = static_cast<double>((*weights)(row, col));
        if (const char* rule = judge_weight(m.kind, e.weights(row, col), got, tolerance)) {
          m.element = "weights";
          m.col = col;
          m.rule = rule;
          m.expected = e.weights(row, col);
          m.got = got;
          if (weights->cols() <= 40) {
            m.expected_row = row_values(e.weights, row);
            m.got_row = row_values(*weights, row);
          }
          return m;
        }
      }
    }
  }
  return std::nullopt;
}

/// Compares a multi-head result: out (n_q × H·d_v), lse (n_q × H).
template <typename Scalar>
std::optional<Mismatch> compare_heads(const std::string& check, const Case& c,
                                      const std::vector<HeadExpectation>& expected, const Matrix<Scalar>& out,
                                      const Matrix<Scalar>& lse, double tolerance) {
  for (Index head = 0; head < c.num_heads; ++head) {
    const auto head_out = out.middleCols(head * c.d_v, c.d_v);
    const auto head_lse = lse.col(head);
    const Matrix<Scalar>* no_weights = nullptr;
    if (auto m = compare_head(check, expected[static_cast<std::size_t>(head)], head, head_out, &head_lse, no_weights,
                              tolerance)) {
      return m;
    }
  }
  return std::nullopt;
}

Mismatch thrown(const std::string& check, const std::exception& error) {
  Mismatch m;
  m.check = check;
  m.element = "exception";
  m.rule = error.what();
  return m;
}

// --- Running the library --------------------------------------------------------------------

/// The case's matrices in its scalar; the options view them, so they outlive the calls.
template <typename Scalar>
struct Inputs {
  Matrix<Scalar> q, k, v, bias;
  BoolMatrix keep;
};

template <typename Scalar>
void load_inputs(const Case& c, Inputs<Scalar>& in) {
  in.q = c.q.cast<Scalar>();
  in.k = c.k.cast<Scalar>();
  in.v = c.v.cast<Scalar>();
  if (c.bias) in.bias = c.bias->cast<Scalar>();
  if (c.keep) in.keep = *c.keep;
}

template <typename Scalar>
attn::AttentionOptions<Scalar> whole_options(const Case& c, const Inputs<Scalar>& in) {
  attn::AttentionOptions<Scalar> options;
  if (c.scale) options.scale = static_cast<Scalar>(*c.scale);
  options.causal = c.causal;
  if (c.keep) options.mask = in.keep;
  if (c.bias) options.bias = in.bias;
  options.valid_keys = c.valid_keys;
  if (c.window) options.window = attn::SlidingWindow{c.window->first, c.window->second};
  options.num_threads = c.threads;
  return options;
}

template <typename Scalar, typename K, typename V>
void run_tiled(const Case& c, const Matrix<Scalar>& q, const K& k, const V& v,
               const attn::AttentionOptions<Scalar>& options, Matrix<Scalar>& out, Matrix<Scalar>& lse,
               attn::Workspace<Scalar>& workspace) {
  const attn::Heads heads{c.num_heads, c.num_kv_heads};
  switch (c.tiles) {
    case Tiles::defaults: attn::flash_attention_into<0, 0>(q, k, v, heads, options, out, lse, workspace); break;
    case Tiles::q4_k8: attn::flash_attention_into<4, 8>(q, k, v, heads, options, out, lse, workspace); break;
    case Tiles::q16_k32: attn::flash_attention_into<16, 32>(q, k, v, heads, options, out, lse, workspace); break;
    case Tiles::q1_k3: attn::flash_attention_into<1, 3>(q, k, v, heads, options, out, lse, workspace); break;
  }
}

/// (a) The tiled kernel on every head at once.
template <typename Scalar>
std::optional<Mismatch> check_tiled(const Case& c, const Inputs<Scalar>& in,
                                    const std::vector<HeadExpectation>& expected, attn::Workspace<Scalar>& workspace) {
  const std::string check = "tiled kernel (flash_attention_into)";
  Matrix<Scalar> out, lse;
  try {
    run_tiled(c, in.q, in.k, in.v, whole_options(c, in), out, lse, workspace);
  } catch (const std::exception& error) {
    return thrown(check, error);
  }
  auto m = compare_heads(check, c, expected, out, lse, tolerance_for<Scalar>(c));
  if (m) m->key_to = c.n_k;
  return m;
}

/// (b) The reference path, one head at a time on the heads' column blocks.
template <typename Scalar, typename Weights>
std::optional<Mismatch> check_reference_path(const Case& c, const Inputs<Scalar>& in,
                                             const std::vector<HeadExpectation>& expected) {
  const std::string check = "reference path (attention_into)";
  attn::AttentionOptions<Scalar> options = whole_options(c, in);
  Matrix<Scalar> out;
  Weights weights;
  for (Index head = 0; head < c.num_heads; ++head) {
    const Index kv_head = head / c.group();
    try {
      attn::attention_into(in.q.middleCols(head * c.d_k, c.d_k), in.k.middleCols(kv_head * c.d_k, c.d_k),
                           in.v.middleCols(kv_head * c.d_v, c.d_v), options, out, weights);
    } catch (const std::exception& error) {
      return thrown(check, error);
    }
    const Matrix<Scalar>* no_lse = nullptr;
    if (auto m = compare_head(check, expected[static_cast<std::size_t>(head)], head, out, no_lse, &weights,
                              tolerance_for<Scalar>(c))) {
      m->key_to = c.n_k;
      return m;
    }
  }
  return std::nullopt;
}

/// Keys [from, to) as a problem of their own. The positional rules depend on n_k, so the
/// half carries the whole's masks as an explicit keep-mask, and the bias as a block of the
/// whole's (its −∞ entries mask as they do in the whole).
template <typename Scalar>
struct KeyHalf {
  Index from = 0, to = 0;
  BoolMatrix keep;
  attn::AttentionOptions<Scalar> options;
  Matrix<Scalar> out, lse;
};

template <typename Scalar>
void make_half(const Case& c, const Inputs<Scalar>& in, Index from, Index to, KeyHalf<Scalar>& half) {
  half.from = from;
  half.to = to;
  half.keep.resize(c.n_q, to - from);
  for (Index key = from; key < to; ++key) {
    for (Index query = 0; query < c.n_q; ++query) half.keep(query, key - from) = !masked_by_position_or_keep(c, query, key);
  }
  if (c.scale) half.options.scale = static_cast<Scalar>(*c.scale);
  half.options.mask = half.keep;
  if (c.bias) half.options.bias = in.bias.middleCols(from, to - from);
  half.options.num_threads = c.threads;
}

/// The same (head, row) of both halves, to tell a wrong half from a wrong merge.
template <typename Scalar>
std::string describe_halves(const Case& c, const KeyHalf<Scalar>* halves, Index head, Index row) {
  std::ostringstream text;
  text << std::setprecision(9);
  for (int h = 0; h < 2; ++h) {
    const KeyHalf<Scalar>& half = halves[h];
    text << "  half " << (h == 0 ? 'A' : 'B') << " keys [" << half.from << ", " << half.to << "): lse "
         << static_cast<double>(half.lse(row, head)) << ", out";
    for (Index col = 0; col < c.d_v; ++col) text << ' ' << static_cast<double>(half.out(row, head * c.d_v + col));
    text << '\n';
  }
  return text.str();
}

/// merge_into of half B into half A, against the whole.
template <typename Scalar>
std::optional<Mismatch> merge_and_compare(const std::string& check, const Case& c, const KeyHalf<Scalar>* halves,
                                          const std::vector<HeadExpectation>& expected) {
  Matrix<Scalar> out = halves[0].out, lse = halves[0].lse;
  try {
    attn::merge_into(out, lse, halves[1].out, halves[1].lse);
  } catch (const std::exception& error) {
    return thrown(check, error);
  }
  auto m = compare_heads(check, c, expected, out, lse, 2.0 * tolerance_for<Scalar>(c));
  if (m) {
    m->key_to = c.n_k;
    m->context = describe_halves(c, halves, m->head, m->row);
  }
  return m;
}

/// (c) merge_into of the loop's own results on keys [0, split) and [split, n_k), rounded to
/// Scalar: merge_into alone, on halves known to follow the rules (a NaN row with lse NaN,
/// an empty row with zeros and −∞), whatever the kernel does.
template <typename Scalar>
std::optional<Mismatch> check_merge_of_loop_halves(const Case& c, const std::vector<HeadExpectation>& expected,
                                                   const std::vector<HeadExpectation>* half_expected) {
  const Index split = *c.merge_split;
  KeyHalf<Scalar> halves[2];
  for (int h = 0; h < 2; ++h) {
    KeyHalf<Scalar>& half = halves[h];
    half.from = h == 0 ? 0 : split;
    half.to = h == 0 ? split : c.n_k;
    half.out.resize(c.n_q, c.num_heads * c.d_v);
    half.lse.resize(c.n_q, c.num_heads);
    for (Index head = 0; head < c.num_heads; ++head) {
      const HeadExpectation& e = half_expected[h][static_cast<std::size_t>(head)];
      half.out.middleCols(head * c.d_v, c.d_v) = e.out.cast<Scalar>();
      half.lse.col(head) = e.lse.cast<Scalar>();
    }
  }
  return merge_and_compare("merge_into of the double loop's key halves", c, halves, expected);
}

/// (d) The tiled kernel on keys [0, split) and [split, n_k) as problems of their own, into
/// `halves`, each checked against the loop on its keys.
template <typename Scalar>
std::optional<Mismatch> check_kernel_halves(const Case& c, const Inputs<Scalar>& in,
                                            const std::vector<HeadExpectation>* half_expected,
                                            attn::Workspace<Scalar>& workspace, KeyHalf<Scalar>* halves) {
  const Index split = *c.merge_split;
  make_half(c, in, 0, split, halves[0]);
  make_half(c, in, split, c.n_k, halves[1]);
  std::optional<Mismatch> first;
  for (int h = 0; h < 2; ++h) {
    KeyHalf<Scalar>& half = halves[h];
    const std::string check = std::string("tiled kernel on key half ") + (h == 0 ? "A" : "B") + " (explicit mask)";
    const Index keys = half.to - half.from;
    try {
      run_tiled(c, in.q, in.k.middleRows(half.from, keys), in.v.middleRows(half.from, keys), half.options, half.out,
                half.lse, workspace);
    } catch (const std::exception& error) {
      return thrown(check, error);
    }
    auto m = compare_heads(check, c, half_expected[h], half.out, half.lse, tolerance_for<Scalar>(c));
    if (m && !first) {
      m->key_from = half.from;
      m->key_to = half.to;
      first = std::move(m);
    }
  }
  return first;
}

/// Runs every check of a case; returns each check's first mismatch (the first only, unless
/// `all`).
template <typename Scalar>
std::vector<Mismatch> run_case(const Case& c, attn::Workspace<Scalar>& workspace, bool all) {
  Inputs<Scalar> in;
  load_inputs(c, in);
  const std::vector<HeadExpectation> expected = expect_heads(c, 0, c.n_k);
  std::vector<Mismatch> found;
  const auto keep = [&](std::optional<Mismatch> m) {
    if (m) found.push_back(std::move(*m));
    return all || found.empty();
  };
  if (!keep(check_tiled(c, in, expected, workspace))) return found;
  const bool go_on = c.row_major_weights ? keep(check_reference_path<Scalar, RowMajorMatrix<Scalar>>(c, in, expected))
                                         : keep(check_reference_path<Scalar, Matrix<Scalar>>(c, in, expected));
  if (!go_on || !c.merge_split) return found;
  const std::vector<HeadExpectation> half_expected[2] = {expect_heads(c, 0, *c.merge_split),
                                                         expect_heads(c, *c.merge_split, c.n_k)};
  if (!keep(check_merge_of_loop_halves<Scalar>(c, expected, half_expected))) return found;
  KeyHalf<Scalar> halves[2];
  const std::optional<Mismatch> wrong_half = check_kernel_halves(c, in, half_expected, workspace, halves);
  const bool halves_ran = !wrong_half || wrong_half->element != "exception";
  // With `all`, wrong halves are merged too: what merge_into makes of what the kernel
  // hands it (the halves' rows are printed with a failure).
  if (keep(wrong_half) && halves_ran) {
    keep(merge_and_compare("merge_into of the tiled kernel's key halves", c, halves, expected));
  }
  return found;
}

// --- Reporting ------------------------------------------------------------------------------

std::string format_index_list(const std::vector<Index>& indices, std::size_t limit = 12) {
  std::ostringstream text;
  text << '[';
  for (std::size_t n = 0; n < indices.size() && n < limit; ++n) text << (n ? ", " : "") << indices[n];
  if (indices.size() > limit) text << ", … (" << indices.size() << " in all)";
  text << ']';
  return text.str();
}

std::string format_values(const std::vector<double>& values) {
  std::ostringstream text;
  text << std::setprecision(9) << '[';
  for (std::size_t n = 0; n < values.size(); ++n) text << (n ? ", " : "") << values[n];
  text << ']';
  return text.str();
}

void describe_case(std::ostream& os, const Case& c) {
  os << "  scalar " << (c.use_double ? "double" : "float") << "; n_q " << c.n_q << ", n_k " << c.n_k << "; heads H "
     << c.num_heads << ", H_kv " << c.num_kv_heads << "; d_k " << c.d_k << ", d_v " << c.d_v << '\n';
  os << "  scale " << std::setprecision(9) << c.scale_value() << (c.scale ? " (explicit)" : " (default 1/sqrt(d_k))")
     << "; tiles flash_attention_into" << tiles_name(c.tiles) << "; threads " << c.threads
     << "; reference-path weights " << (c.row_major_weights ? "row-major" : "column-major") << '\n';
  os << "  causal " << (c.causal ? "yes" : "no") << "; valid_keys "
     << (c.valid_keys ? std::to_string(*c.valid_keys) : std::string("none")) << "; window ";
  if (c.window) {
    os << "{left " << c.window->first << ", right " << c.window->second << "}";
  } else {
    os << "none";
  }
  os << '\n';
  if (c.keep) {
    os << "  keep-mask: density " << std::setprecision(3) << c.keep_density << ", all-false rows "
       << format_index_list(c.blocked_queries) << ", all-false columns " << format_index_list(c.blocked_keys) << '\n';
  } else {
    os << "  keep-mask: none\n";
  }
  if (c.bias) {
    os << "  bias: finite in [-3, 3], " << c.bias_minus_infinities << " entries -inf\n";
  } else {
    os << "  bias: none\n";
  }
  if (c.merge_split) os << "  merge check: keys split at " << *c.merge_split << '\n';
  os << "  injected:" << (c.injections.empty() ? " nothing" : "") << '\n';
  for (const Injection& injection : c.injections) {
    os << "    " << injection.where << '[' << injection.row << ", "
       << (injection.col < 0 ? std::string(":") : std::to_string(injection.col)) << "] = " << injection.value << "  ("
       << injection.aim << ")\n";
  }
}

/// Which keys the failing row attends, and which hold non-finite values, by the loop's
/// reckoning: what the row should have done, in terms of the rules.
void describe_row(std::ostream& os, const Case& c, const Mismatch& m) {
  const RowAnalysis row = analyse_row(c, m.head, m.row, m.key_from, m.key_to);
  const Index kv_head = m.head / c.group();
  std::vector<Index> non_finite_values, non_finite_keys;
  for (const Index key : row.attended) {
    if (!c.v.row(key).segment(kv_head * c.d_v, c.d_v).allFinite()) non_finite_values.push_back(key);
  }
  for (const Index key : row.masked) {
    if (!c.k.row(key).segment(kv_head * c.d_k, c.d_k).allFinite() ||
        !c.v.row(key).segment(kv_head * c.d_v, c.d_v).allFinite()) {
      non_finite_keys.push_back(key);
    }
  }
  os << "  row " << m.row << " of head " << m.head << " (kv head " << kv_head << "), keys [" << m.key_from << ", "
     << m.key_to << "): " << row_kind_name(m.kind) << '\n'
     << "    q row finite: " << (c.q.row(m.row).segment(m.head * c.d_k, c.d_k).allFinite() ? "yes" : "no")
     << "; masked keys " << row.masked.size() << " (with non-finite k or v: " << format_index_list(non_finite_keys)
     << ")\n"
     << "    keys scored NaN or +inf " << format_index_list(row.poisoning) << "; scored -inf "
     << format_index_list(row.minus_infinite) << "; attended " << row.attended.size()
     << " (with non-finite v: " << format_index_list(non_finite_values) << ")\n";
}

void describe_failure(std::ostream& os, const Case& c, const Mismatch& m) {
  os << "FAILED: case " << c.index << " of seed " << c.seed << " (rerun: --seed " << c.seed << " --case " << c.index
     << ")\n";
  describe_case(os, c);
  os << "  check: " << m.check << '\n';
  if (m.element == "exception") {
    os << "  threw: " << m.rule << '\n';
    return;
  }
  describe_row(os, c, m);
  os << std::setprecision(9) << "  mismatch: " << m.element << '[' << m.row << ", "
     << (m.element == "lse" ? m.head : m.col) << ']' << (m.element == "lse" ? "" : " of head " + std::to_string(m.head))
     << ": expected " << m.expected << ", got " << m.got << '\n'
     << "  broken: " << m.rule << '\n';
  if (!m.expected_row.empty()) {
    const std::string what = m.element == "weights" ? "weights" : "out";
    os << "  expected " << what << " row " << format_values(m.expected_row) << '\n'
       << "  got " << what << " row      " << format_values(m.got_row) << '\n';
  }
  os << m.context;
}

// --- The driver -----------------------------------------------------------------------------

/// The case running now, as the line to print should it crash (an Eigen assertion, a
/// segfault, a sanitizer report): written before each case, so that printing it needs no
/// allocation or formatting in a signal handler.
char crash_note[160] = "attn_fuzz_nonfinite: crashed before the first case\n";

void note_current_case(std::uint64_t seed, std::uint64_t index) {
  std::snprintf(crash_note, sizeof crash_note,
                "attn_fuzz_nonfinite: crashed in case %llu of seed %llu (rerun: --seed %llu --case %llu)\n",
                static_cast<unsigned long long>(index), static_cast<unsigned long long>(seed),
                static_cast<unsigned long long>(seed), static_cast<unsigned long long>(index));
}

extern "C" void print_crash_note() { std::fputs(crash_note, stderr); }

extern "C" void print_crash_note_and_die(int signal_number) {
  print_crash_note();
  std::signal(signal_number, SIG_DFL);
  std::raise(signal_number);
}

void install_crash_note() {
  std::signal(SIGABRT, print_crash_note_and_die);
  std::signal(SIGSEGV, print_crash_note_and_die);
  std::signal(SIGFPE, print_crash_note_and_die);
#if defined(ATTN_FUZZ_ASAN)
  __sanitizer_set_death_callback(print_crash_note);
#endif
}

struct Arguments {
  double seconds = 8.0;
  std::uint64_t seed = 1;
  std::uint64_t cases = std::numeric_limits<std::uint64_t>::max();
  std::optional<std::uint64_t> single_case;
  bool keep_going = false;
};

[[noreturn]] void usage(const std::string& problem) {
  std::cerr << "attn_fuzz_nonfinite: " << problem << "\n"
            << "usage: attn_fuzz_nonfinite [--seconds S] [--seed N] [--cases N] [--case K] [--keep-going]\n";
  std::exit(2);
}

Arguments parse_arguments(int argc, char** argv) {
  Arguments arguments;
  for (int n = 1; n < argc; ++n) {
    const std::string flag = argv[n];
    if (flag == "--keep-going") {
      arguments.keep_going = true;
      continue;
    }
    if (n + 1 >= argc) usage(flag + " needs a value");
    const std::string value = argv[++n];
    try {
      std::size_t used = 0;
      if (flag == "--seconds") {
        arguments.seconds = std::stod(value, &used);
      } else if (flag == "--seed") {
        arguments.seed = std::stoull(value, &used);
      } else if (flag == "--cases") {
        arguments.cases = std::stoull(value, &used);
      } else if (flag == "--case") {
        arguments.single_case = std::stoull(value, &used);
      } else {
        usage("unknown argument " + flag);
      }
      if (used != value.size()) usage("not a number: " + flag + " " + value);
    } catch (const std::logic_error&) {
      usage("not a number: " + flag + " " + value);
    }
  }
  return arguments;
}

/// --keep-going's tally: each distinct failure, how often, and the first case showing it.
struct Tally {
  std::uint64_t count = 0;
  std::uint64_t first_case = 0;
};

}  // namespace

int main(int argc, char** argv) {
  const Arguments arguments = parse_arguments(argc, argv);
  install_crash_note();
  // One workspace per scalar across all cases, as a user's loop keeps one.
  attn::Workspace<float> float_workspace;
  attn::Workspace<double> double_workspace;
  using Clock = std::chrono::steady_clock;
  const Clock::time_point start = Clock::now();
  const auto seconds_since = [](Clock::time_point from) {
    return std::chrono::duration<double>(Clock::now() - from).count();
  };

  std::uint64_t run = 0, failed_cases = 0, slowest_case = 0;
  double slowest_seconds = 0.0;
  std::map<std::string, Tally> tallies;
  const std::uint64_t first = arguments.single_case.value_or(0);
  const std::uint64_t limit = arguments.single_case ? 1 : arguments.cases;
  for (std::uint64_t index = first; run < limit; ++index) {
    if (!arguments.single_case && seconds_since(start) >= arguments.seconds) break;
    const Clock::time_point case_start = Clock::now();
    note_current_case(arguments.seed, index);
    const Case c = draw_case(arguments.seed, index);
    if (arguments.single_case) {
      std::cout << "case " << index << " of seed " << arguments.seed << ":\n";
      describe_case(std::cout, c);
    }
    const std::vector<Mismatch> mismatches = c.use_double ? run_case(c, double_workspace, arguments.keep_going)
                                                          : run_case(c, float_workspace, arguments.keep_going);
    ++run;
    const double took = seconds_since(case_start);
    if (took > slowest_seconds) {
      slowest_seconds = took;
      slowest_case = index;
    }
    if (mismatches.empty()) continue;
    ++failed_cases;
    if (arguments.single_case && arguments.keep_going) {
      for (const Mismatch& m : mismatches) describe_failure(std::cout, c, m);
    }
    if (!arguments.keep_going) {
      describe_failure(std::cout, c, mismatches.front());
      std::cout << "attn_fuzz_nonfinite: seed " << arguments.seed << ", " << run << " cases run, case " << index
                << " failed\n";
      return 1;
    }
    for (const Mismatch& m : mismatches) {
      Tally& tally = tallies[m.signature()];
      if (tally.count++ == 0) tally.first_case = index;
    }
  }
  for (const auto& [signature, tally] : tallies) {
    std::cout << std::setw(6) << tally.count << " cases, first case " << tally.first_case << ": " << signature << '\n';
  }
  std::cout << "attn_fuzz_nonfinite: seed " << arguments.seed << ", " << run << " cases run in " << std::setprecision(3)
            << seconds_since(start) << " s, " << failed_cases << " failed; slowest case " << slowest_case << " ("
            << slowest_seconds * 1e3 << " ms)\n";
  return failed_cases == 0 ? 0 : 1;
}

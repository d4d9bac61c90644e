#pragma once
/// @file
/// The one place that knows which Catch2 the tests are built with: v3 when CMake found it
/// (and defined ATTN_CATCH2_V3=1), else v2.13 as Debian 12 ships it. Test files include this
/// header instead of Catch2's own and spell matchers through `attn_test::`:
///
///     using attn_test::WithinRel;
///     REQUIRE_THAT(x, WithinRel(1.0, 1e-12));
///     REQUIRE_THROWS_WITH(f(), attn_test::ContainsSubstring("q has 4 columns"));
///     REQUIRE_THROWS_MATCHES(f(), attn::dimension_error, attn_test::Message("..."));
///
/// It includes neither Eigen nor attn: each test file includes what it uses.

#include <string>

#if defined(ATTN_CATCH2_V3) && ATTN_CATCH2_V3

#include <catch2/catch_template_test_macros.hpp>
#include <catch2/catch_test_macros.hpp>
#include <catch2/generators/catch_generators.hpp>
#include <catch2/generators/catch_generators_adapters.hpp>
#include <catch2/generators/catch_generators_random.hpp>
#include <catch2/generators/catch_generators_range.hpp>
#include <catch2/matchers/catch_matchers_exception.hpp>
#include <catch2/matchers/catch_matchers_floating_point.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

namespace attn_test {

using Catch::Matchers::ContainsSubstring;

}  // namespace attn_test

#else

#include <catch2/catch.hpp>

namespace attn_test {

/// v2 spells the substring matcher `Contains` (and overloads the name for vectors), so
/// wrap it under v3's name rather than re-export the whole overload set.
inline Catch::Matchers::StdString::ContainsMatcher ContainsSubstring(
    const std::string& substring, Catch::CaseSensitive::Choice case_sensitivity = Catch::CaseSensitive::Yes) {
  return Catch::Matchers::Contains(substring, case_sensitivity);
}

}  // namespace attn_test

#endif

namespace attn_test {

// The same names and signatures in v2.13 and v3.
using Catch::Matchers::EndsWith;
using Catch::Matchers::Message;
using Catch::Matchers::StartsWith;
using Catch::Matchers::WithinAbs;
using Catch::Matchers::WithinRel;
using Catch::Matchers::WithinULP;

}  // namespace attn_test

#pragma once
/// @file
/// The attn version, as macros for the preprocessor and as constants for code.

#define ATTN_VERSION_MAJOR 0
#define ATTN_VERSION_MINOR 1
#define ATTN_VERSION_PATCH 0

namespace attn {

inline constexpr int version_major = ATTN_VERSION_MAJOR;
inline constexpr int version_minor = ATTN_VERSION_MINOR;
inline constexpr int version_patch = ATTN_VERSION_PATCH;

}  // namespace attn

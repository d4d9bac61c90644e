#pragma once
// The committed fixture directories (tests/fixtures/<set>/<config>/) and their config.txt
// files, shared by the tests that read them.

#include <filesystem>
#include <fstream>
#include <map>
#include <string>

#include <Eigen/Core>

#include "attn_test.hpp"

namespace attn_test {

/// tests/fixtures/<set>/<config>, found from this header's own path so that the tests run
/// from any directory.
inline std::filesystem::path fixture_directory(const std::string& set, const std::string& config) {
  return std::filesystem::path(__FILE__).parent_path() / "fixtures" / set / config;
}

/// config.txt: one "key value" line per setting, integers only, as the fixture scripts
/// write it.
inline std::map<std::string, Eigen::Index> read_config(const std::filesystem::path& directory) {
  std::ifstream file(directory / "config.txt");
  REQUIRE(file.good());
  std::map<std::string, Eigen::Index> config;
  std::string key;
  Eigen::Index value = 0;
  while (file >> key >> value) config[key] = value;
  return config;
}

}  // namespace attn_test

// Catch2 v2's main(), compiled once and shared by the test executables (Catch2 v3 brings
// its own in Catch2::Catch2WithMain, and this file is then not compiled).
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>

// Response parameters naming the params generation (live updates) that scored a request, as
// the Python front ends write them (serving/frontend/codec.py generation_params):
// "params_generation" (the highest), and "params_generation_min" when a split request
// straddled an update.
#include <string>

#include "frontend.h"

namespace xlaserve::native {
namespace {

void PutVarint(std::string* out, uint64_t v) {
  while (v >= 0x80) {
    out->push_back(char(v | 0x80));
    v >>= 7;
  }
  out->push_back(char(v));
}

// One map<string, InferParameter> entry (field 4) holding int64_param (field 2).
void PutEntry(std::string* out, const std::string& key, int64_t value) {
  std::string param;
  param.push_back(char(2 << 3 | 0));
  PutVarint(&param, uint64_t(value));
  std::string entry;
  entry.push_back(char(1 << 3 | 2));
  PutVarint(&entry, key.size());
  entry += key;
  entry.push_back(char(2 << 3 | 2));
  PutVarint(&entry, param.size());
  entry += param;
  out->push_back(char(4 << 3 | 2));
  PutVarint(out, entry.size());
  *out += entry;
}

}  // namespace

std::string GenerationParamsProto(const Generations& g) {
  std::string out;
  if (g.hi <= 0) return out;
  PutEntry(&out, "params_generation", g.hi);
  if (g.lo != g.hi) PutEntry(&out, "params_generation_min", g.lo);
  return out;
}

std::string GenerationParamsJson(const Generations& g) {
  if (g.hi <= 0) return "";
  std::string out = "{\"params_generation\":" + std::to_string(g.hi);
  if (g.lo != g.hi) out += ",\"params_generation_min\":" + std::to_string(g.lo);
  return out + "}";
}

}  // namespace xlaserve::native

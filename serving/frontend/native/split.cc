// Canary traffic splits on the native fast path (serving/repository/traffic.py is the Python
// twin and the reference). A model with a split publishes its unversioned entry with a `Split`:
// a request naming a version goes to that version's entry; an unversioned one is pinned by the
// sticky parameter's value (64-bit FNV-1a of its UTF-8 bytes, MurmurHash3's fmix64, the top 53
// bits as a point in [0, 1): the same point as `sticky_point`), else a random point, and goes to
// the version whose interval of the cumulative weights holds it. With a shadow, a `fraction` of
// them is relayed, marked, so Python's servicer answers them and scores them with the shadow.
// What this cannot decide exactly as Python would (a double-valued key) is relayed.

#include <algorithm>
#include <random>

#include <pybind11/stl.h>

#include "row_queue.h"

namespace xlaserve::native {
namespace {

bool Varint(const uint8_t*& p, const uint8_t* end, uint64_t* v) {
  uint64_t out = 0;
  for (int shift = 0; shift < 64 && p < end; shift += 7) {
    uint8_t b = *p++;
    out |= uint64_t(b & 0x7f) << shift;
    if (!(b & 0x80)) return *v = out, true;
  }
  return false;
}

// The sticky key of an InferParameter as Python's str() of its value: 1 a key, 0 no key (unset
// or empty: a random point), -1 not representable here (relay).
int KeyOf(std::string_view param, std::string* key) {
  const auto* p = reinterpret_cast<const uint8_t*>(param.data());
  const auto* end = p + param.size();
  int found = 0;
  while (p < end) {
    uint64_t tag, v;
    if (!Varint(p, end, &tag)) return -1;
    uint32_t field = uint32_t(tag >> 3), type = uint32_t(tag & 7);
    if (type == 0 && (field == 1 || field == 2 || field == 5)) {
      if (!Varint(p, end, &v)) return -1;
      *key = field == 1 ? (v ? "True" : "False")
             : field == 2 ? std::to_string(int64_t(v)) : std::to_string(v);
    } else if (type == 2 && field == 3) {
      if (!Varint(p, end, &v) || v > uint64_t(end - p)) return -1;
      key->assign(reinterpret_cast<const char*>(p), v);
      p += v;
    } else {
      return -1;  // a double (Python's repr is not ours to copy) or anything unknown
    }
    ++found;
  }
  if (found > 1) return -1;  // a oneof set twice: Python's protobuf keeps the last; relay
  return found && !key->empty() ? 1 : 0;
}

double StickyPoint(std::string_view key) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char b : key) h = (h ^ b) * 0x100000001b3ull;
  h ^= h >> 33;
  h *= 0xff51afd7ed558ccdull;
  h ^= h >> 33;
  h *= 0xc4ceb9fe1a85ec53ull;
  h ^= h >> 33;
  return double(h >> 11) * 0x1p-53;
}

double Uniform() {
  thread_local std::mt19937_64 rng{std::random_device{}()};
  return std::uniform_real_distribution<double>(0.0, 1.0)(rng);
}

}  // namespace

std::shared_ptr<const Model> Frontend::Route(Call* c, const Request& r) {
  std::shared_ptr<const Model> m = Lookup(r.model_name, r.model_version);
  if (!m || !m->split) return m;
  const Split& s = *m->split;
  double u = -1;
  if (!s.sticky.empty()) {
    for (const auto& [k, v] : r.params) {
      if (k != s.sticky) continue;
      std::string key;
      int got = KeyOf(v, &key);
      if (got < 0) return nullptr;
      if (got > 0) u = StickyPoint(key);
    }
  }
  if (u < 0) u = Uniform();
  if (s.shadow_fraction > 0 && (s.shadow_fraction >= 1 || Uniform() < s.shadow_fraction)) {
    c->shadow = true;  // Python answers it and offers it to the shadow
    return nullptr;
  }
  size_t i = std::upper_bound(s.bounds.begin(), s.bounds.end(), u * s.bounds.back()) -
             s.bounds.begin();
  i = std::min(i, s.bounds.size() - 1);
  std::shared_ptr<const Model> picked = Lookup(r.model_name, s.versions[i]);
  if (picked) s.routed[i]->fetch_add(1, std::memory_order_relaxed);
  return picked;
}

void Frontend::SetSplit(Model* m, const std::string& name, const py::tuple& t) {
  auto s = std::make_unique<Split>();
  s->sticky = t[0].cast<std::string>();
  s->bounds = t[1].cast<std::vector<double>>();
  s->versions = t[2].cast<std::vector<std::string>>();
  s->shadow_fraction = t[3].cast<double>();
  if (s->bounds.empty() || s->bounds.size() != s->versions.size() || !(s->bounds.back() > 0)) {
    throw std::invalid_argument("a split needs positive cumulative weights, one per version");
  }
  std::lock_guard<std::mutex> l(table_mu_);
  for (const auto& v : s->versions) {
    auto& counter = routed_[name + std::string(1, '\0') + v];
    if (!counter) counter = std::make_unique<std::atomic<int64_t>>(0);
    s->routed.push_back(counter.get());
  }
  m->split = std::move(s);
}

py::dict Frontend::RoutedCounts() {
  py::dict d;
  std::lock_guard<std::mutex> l(table_mu_);
  for (const auto& [key, n] : routed_) {
    size_t z = key.find('\0');
    d[py::make_tuple(key.substr(0, z), key.substr(z + 1))] = int64_t(n->load());
  }
  return d;
}

}  // namespace xlaserve::native

// The cache of freed large CPU outputs (see fresh_output.h for why).
#include "fresh_output.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#if defined(__linux__)
#include <pthread.h>
#include <sys/mman.h>
#endif

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <list>
#include <mutex>
#include <new>

namespace bnbx::cpu {
namespace {

constexpr int64_t kHugePageBytes = int64_t{2} << 20;
// Outputs from 1 MiB are cached: a mid-size output (a 1024 x 1024 bf16 weight dequantized for the backward) paid
// as much again in page faults as its product took, because glibc gives the top of its heap back to the system
// when such a block is freed and faults it in again on the next step. From 8 MiB (huge) they are rounded to
// whole 2 MiB pages advised for transparent huge pages, below that to 64 KiB.
constexpr int64_t kMinCachedBytes = int64_t{1} << 20;
constexpr int64_t kMinHugeBytes = 4 * kHugePageBytes;
constexpr int64_t kMidGranuleBytes = int64_t{64} << 10;
constexpr int64_t kDefaultLimitBytes = int64_t{1024} << 20;

#if defined(__SANITIZE_ADDRESS__)
constexpr bool kSanitized = true;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
constexpr bool kSanitized = true;
#else
constexpr bool kSanitized = false;
#endif
#else
constexpr bool kSanitized = false;
#endif

int64_t limit_from_environment() {
  if (kSanitized) return 0;
  const char* text = std::getenv("BNBX_CPU_CACHE_MB");
  if (text == nullptr || *text == '\0') return kDefaultLimitBytes;
  char* end = nullptr;
  const long long mib = std::strtoll(text, &end, 10);
  if (*end != '\0' || mib < 0) return kDefaultLimitBytes;  // unreadable: the default (Python warns)
  return std::min<int64_t>(mib, std::numeric_limits<int64_t>::max() >> 20) << 20;  // no overflow
}

struct Block {
  void* ptr;
  int64_t bytes;  // a multiple of kHugePageBytes (huge) or kMidGranuleBytes
};

// Blocks of at least kMinCachedBytes, the huge ones 2 MiB-aligned and advised for huge pages; freed ones kept
// (most recently freed first) while their total stays within the limit.
class OutputCache final : public c10::Allocator {
 public:
  OutputCache() {
#if defined(__linux__)
    // a child forked while another thread held the lock would wait on it forever: the child starts unlocked
    pthread_atfork(nullptr, nullptr, [] { new (&instance().mutex_) std::mutex(); });
#endif
  }

  c10::DataPtr allocate(size_t n) override {
    if (static_cast<int64_t>(n) < kMinCachedBytes) return c10::GetCPUAllocator()->allocate(n);
    const int64_t granule = static_cast<int64_t>(n) >= kMinHugeBytes ? kHugePageBytes : kMidGranuleBytes;
    const int64_t bytes = (static_cast<int64_t>(n) + granule - 1) / granule * granule;
    Block* block = take(bytes);
    if (block == nullptr) block = map(bytes);
    return {block->ptr, block, &OutputCache::release_block, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }

  void set_limit(int64_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    limit_ = bytes;
    trim_locked(limit_);
  }

  void clear() {
    std::lock_guard<std::mutex> lock(mutex_);
    trim_locked(0);
  }

  // [limit, cached bytes, in-use bytes, hits, misses]
  void stats(int64_t* out) {
    std::lock_guard<std::mutex> lock(mutex_);
    out[0] = limit_;
    out[1] = cached_;
    out[2] = in_use_;
    out[3] = hits_;
    out[4] = misses_;
  }

 private:
  // The free block that fits best: at least `bytes` and at most a quarter more (a larger one would hold
  // memory the output never uses); nullptr when none does.
  Block* take(int64_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto best = free_.end();
    for (auto it = free_.begin(); it != free_.end(); ++it) {
      if ((*it)->bytes >= bytes && (*it)->bytes <= bytes + bytes / 4 &&
          (best == free_.end() || (*it)->bytes < (*best)->bytes)) {
        best = it;
      }
    }
    if (best == free_.end()) {
      ++misses_;
      return nullptr;
    }
    Block* block = *best;
    free_.erase(best);
    cached_ -= block->bytes;
    in_use_ += block->bytes;
    ++hits_;
    return block;
  }

  Block* map(int64_t bytes) {
    void* ptr = nullptr;
    const bool huge = bytes >= kMinHugeBytes;
    TORCH_CHECK_WITH(OutOfMemoryError,
                     posix_memalign(&ptr, huge ? kHugePageBytes : 4096, static_cast<size_t>(bytes)) == 0,
                     "bnbx: out of memory allocating a ", bytes, "-byte CPU output");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (huge) madvise(ptr, static_cast<size_t>(bytes), MADV_HUGEPAGE);  // a hint: a refusal changes nothing
#endif
    std::lock_guard<std::mutex> lock(mutex_);
    in_use_ += bytes;
    return new Block{ptr, bytes};
  }

  static void release_block(void* context) { instance().release(static_cast<Block*>(context)); }

  void release(Block* block) {
    std::lock_guard<std::mutex> lock(mutex_);
    in_use_ -= block->bytes;
    free_.push_front(block);
    cached_ += block->bytes;
    trim_locked(limit_);
  }

  // Frees the least recently freed blocks until the cached total is at most `keep` bytes.
  void trim_locked(int64_t keep) {
    while (cached_ > keep && !free_.empty()) {
      Block* block = free_.back();
      free_.pop_back();
      cached_ -= block->bytes;
      std::free(block->ptr);
      delete block;
    }
  }

 public:
  // Never destroyed: tensors freed during interpreter exit still return their blocks here.
  static OutputCache& instance() {
    static OutputCache* cache = new OutputCache();
    return *cache;
  }

 private:
  std::mutex mutex_;
  std::list<Block*> free_;
  int64_t limit_ = limit_from_environment();
  int64_t cached_ = 0;
  int64_t in_use_ = 0;
  int64_t hits_ = 0;
  int64_t misses_ = 0;
};

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  TORCH_INTERNAL_ASSERT(options.device().is_cpu());
  return at::detail::empty_generic(sizes, &OutputCache::instance(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   options.dtype().toScalarType(), std::nullopt);
}

}  // namespace bnbx::cpu

// Control from Python (bnbx/_library.py, through ctypes; not ops: they hold no tensors).
extern "C" {

void bnbx_cpu_cache_set_limit(int64_t bytes) { bnbx::cpu::OutputCache::instance().set_limit(bytes < 0 ? 0 : bytes); }

void bnbx_cpu_cache_clear() { bnbx::cpu::OutputCache::instance().clear(); }

void bnbx_cpu_cache_stats(int64_t* out) { bnbx::cpu::OutputCache::instance().stats(out); }
}

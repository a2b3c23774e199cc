// msl_runtime.cpp: the emulator's scheduler (fibers, barriers, simd collectives, dispatch).
// Compiled once per configuration into its own library; kernels call it through mslcpu::Api.
//
// Context switches are a hand-written register swap on x86-64 Linux (swapcontext would make two
// signal-mask syscalls per switch); elsewhere, or with -DMSLCPU_UCONTEXT, ucontext is used.
#if !(defined(__x86_64__) && defined(__linux__)) && !defined(MSLCPU_UCONTEXT)
#define MSLCPU_UCONTEXT 1
#endif
#if defined(MSLCPU_UCONTEXT) && defined(__APPLE__)
#define _XOPEN_SOURCE 600  // macOS exposes ucontext only with it...
#define _DARWIN_C_SOURCE   // ...which would otherwise hide MAP_ANONYMOUS
#endif
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <thread>
#include <vector>
#include <sys/mman.h>
#ifdef MSLCPU_UCONTEXT
#include <ucontext.h>
#endif
#define MSLCPU_RUNTIME
#include "msl_cpu.h"

namespace mslcpu {
enum State : int { RUNNABLE = 0, AT_BARRIER = 1, AT_SIMD = 2, DONE = 3 };
constexpr int kStack = 256 * 1024;



struct Fiber {
  void* sp = nullptr;
  int state = RUNNABLE;
  size_t tg_cursor = 0;
  char* stack = nullptr;
#ifdef MSLCPU_UCONTEXT
  ucontext_t ctx;
#endif
};



struct Worker {
  std::vector<Fiber> fibers;
  std::vector<int> order;
  std::vector<SimdGroup> sgs;
  void* sched_sp = nullptr;
#ifdef MSLCPU_UCONTEXT
  ucontext_t sched_ctx;
#endif
  char* stacks = nullptr;
  size_t nstacks = 0;
  unsigned char* tg_arena = nullptr;
  size_t tg_high = 0;
  int n = 0, cur = 0, at_barrier = 0, done = 0;
  bool failed = false;
  char error[1024];
  Body body = nullptr;
  void* ctx = nullptr;
  Attrs base;  // group-constant attributes
  const Launch* L = nullptr;
};
constexpr size_t kArena = 1 << 20;

inline Worker*& W() { static thread_local Worker* w = nullptr; return w; }
}  // namespace mslcpu

#ifndef MSLCPU_UCONTEXT
extern "C" void mslcpu_swap(void** save_sp, void* load_sp);
__asm__(
    ".text\n"
    ".p2align 4\n"
    ".globl mslcpu_swap\n"
    ".hidden mslcpu_swap\n"
    ".type mslcpu_swap,@function\n"
    "mslcpu_swap:\n"
    "  pushq %rbp\n  pushq %rbx\n  pushq %r12\n  pushq %r13\n  pushq %r14\n  pushq %r15\n"
    "  movq %rsp, (%rdi)\n"
    "  movq %rsi, %rsp\n"
    "  popq %r15\n  popq %r14\n  popq %r13\n  popq %r12\n  popq %rbx\n  popq %rbp\n"
    "  ret\n"
    ".size mslcpu_swap, .-mslcpu_swap\n");
#endif

namespace mslcpu {
inline void failf(const char* fmt, int a = 0, int b = 0, int c = 0) {
  Worker* w = W();
  if (!w->failed) {
    w->failed = true;
    snprintf(w->error, sizeof(w->error), fmt, a, b, c);
  }
}
inline void to_scheduler() {
  Worker* w = W();
#ifdef MSLCPU_UCONTEXT
  swapcontext(&w->fibers[w->cur].ctx, &w->sched_ctx);
#else
  mslcpu_swap(&w->fibers[w->cur].sp, w->sched_sp);
#endif
}
inline int rt_cur_lane() { return W()->cur & 31; }
inline SimdGroup& rt_cur_sg() { return W()->sgs[W()->cur >> 5]; }

inline void release_simd(SimdGroup& g) {
  Worker* w = W();
  if (g.mismatch) {
    failf("divergent simd collectives: lanes of simdgroup %d reached different simd_* operations", W()->cur >> 5);
  } else {
    g.op(g);
  }
  int base = (w->cur >> 5) << 5;
  for (int l = 0; l < g.size; l++)
    if (g.active >> l & 1u) w->fibers[base + l].state = RUNNABLE;
  g.arrived = 0; g.active = 0; g.op = nullptr; g.mismatch = false;
}

// A lane arrives at a simd collective with its operand already in g.in[lane].
inline void simd_arrive(SimdOp op) {
  Worker* w = W();
  SimdGroup& g = rt_cur_sg();
  int lane = rt_cur_lane();
  if (g.op && g.op != op) g.mismatch = true;
  g.op = op;
  g.active |= 1u << lane;
  g.arrived++;
  w->fibers[w->cur].state = AT_SIMD;
  if (g.arrived + g.done == g.size) {
    release_simd(g);
  } else {
    to_scheduler();
  }
  if (w->failed) to_scheduler();  // the group is abandoned; never resumed
}

inline void barrier_arrive() {
  Worker* w = W();
  w->fibers[w->cur].state = AT_BARRIER;
  w->at_barrier++;
  if (w->at_barrier + w->done == w->n) {
    if (w->done > 0) {
      failf("threadgroup_barrier reached by %d threads while %d threads of the group had returned", w->at_barrier, w->done);
      to_scheduler();
    }
    for (int i = 0; i < w->n; i++) if (w->fibers[i].state == AT_BARRIER) w->fibers[i].state = RUNNABLE;
    w->at_barrier = 0;
  } else {
    to_scheduler();
  }
  if (w->failed) to_scheduler();
}

inline void fiber_finished() {
  Worker* w = W();
  w->fibers[w->cur].state = DONE;
  w->done++;
  SimdGroup& g = rt_cur_sg();
  g.done++;
  if (g.arrived > 0 && g.arrived + g.done == g.size) release_simd(g);
  if (w->at_barrier > 0 && w->at_barrier + w->done == w->n)
    failf("threadgroup_barrier reached by %d threads while %d threads of the group had returned", w->at_barrier, w->done);
}

inline Attrs thread_attrs(const Worker* w, int t) {
  Attrs a = w->base;
  uint tx = a.threads_per_threadgroup.x, ty = a.threads_per_threadgroup.y;
  a.thread_position_in_threadgroup = uint3((uint)(t % tx), (uint)((t / tx) % ty), (uint)(t / (tx * ty)));
  a.thread_position_in_grid = a.threadgroup_position_in_grid * a.dispatch_threads_per_threadgroup + a.thread_position_in_threadgroup;
  a.thread_index_in_threadgroup = t;
  a.thread_index_in_simdgroup = t & 31;
  a.simdgroup_index_in_threadgroup = t >> 5;
  a.thread_index_in_quadgroup = t & 3;
  a.quadgroup_index_in_threadgroup = t >> 2;
  return a;
}

[[noreturn]] inline void fiber_entry() {
  Worker* w = W();
  Attrs a = thread_attrs(w, w->cur);
  w->body(w->ctx, a);
  fiber_finished();
  to_scheduler();
  abort();  // unreachable: a finished fiber is never resumed
}
#ifdef MSLCPU_UCONTEXT
inline void fiber_entry_uc() { fiber_entry(); }
#endif

inline void prepare_fiber(Worker* w, int i) {
  Fiber& f = w->fibers[i];
  f.state = RUNNABLE;
  f.tg_cursor = 0;
  char* top = f.stack + kStack;
#ifdef MSLCPU_UCONTEXT
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = f.stack;
  f.ctx.uc_stack.ss_size = kStack;
  f.ctx.uc_link = nullptr;
  makecontext(&f.ctx, (void (*)())fiber_entry_uc, 0);
  (void)top;
#else
  // Initial frame popped by mslcpu_swap: six callee-saved registers, then the return address.
  uintptr_t p = ((uintptr_t)top & ~(uintptr_t)15) - 16;  // return-address slot: 16-byte aligned
  void** sp = (void**)p;
  sp[0] = (void*)&fiber_entry;
  sp[1] = nullptr;
  for (int r = 1; r <= 6; r++) *(sp - r) = nullptr;
  f.sp = (void*)(sp - 6);
#endif
}

inline void ensure_capacity(Worker* w, int n) {
  if ((size_t)n <= w->nstacks) return;
  size_t per = kStack + 4096;  // guard page below each stack
  char* mem = (char*)mmap(nullptr, per * n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mem == MAP_FAILED) { perror("mslcpu: mmap fiber stacks"); abort(); }
  if (w->stacks) munmap(w->stacks, per * w->nstacks);  // a larger group than before: replace
  w->fibers.assign(n, Fiber());
  for (int i = 0; i < n; i++) {
    mprotect(mem + per * i, 4096, PROT_NONE);
    w->fibers[i].stack = mem + per * i + 4096;
  }
  w->stacks = mem;
  w->nstacks = n;
}

inline void describe_deadlock(Worker* w) {
  int bar = 0, sim = 0, fin = 0;
  for (int i = 0; i < w->n; i++) {
    int s = w->fibers[i].state;
    bar += s == AT_BARRIER; sim += s == AT_SIMD; fin += s == DONE;
  }
  failf("deadlock: %d threads wait at threadgroup_barrier, %d at a simd collective whose simdgroup "
       "is split across a barrier or an exit, %d have returned (divergent barrier/collective)", bar, sim, fin);
}

// Runs one threadgroup; returns false if it failed (w->error says why).
inline bool run_group(Worker* w, int n) {
  w->n = n; w->at_barrier = 0; w->done = 0; w->tg_high = 0;
  int nsg = (n + 31) / 32;
  w->sgs.resize(nsg);
  for (int s = 0; s < nsg; s++) {
    SimdGroup& g = w->sgs[s];
    g.size = std::min(32, n - s * 32); g.arrived = 0; g.done = 0; g.active = 0; g.op = nullptr; g.mismatch = false;
  }
  for (int i = 0; i < n; i++) prepare_fiber(w, i);
  w->order.resize(n);
  for (int i = 0; i < n; i++) w->order[i] = i;
  int sched = w->L->schedule;
  if (sched == 1) std::reverse(w->order.begin(), w->order.end());
  if (sched >= 2) {  // deterministic shuffle (xorshift), different per group
    uint64_t s = (uint64_t)sched * 0x9E3779B97F4A7C15ull ^ ((uint64_t)w->base.threadgroup_position_in_grid.x << 32 ^
                 (uint64_t)w->base.threadgroup_position_in_grid.y << 16 ^ w->base.threadgroup_position_in_grid.z);
    for (int i = n - 1; i > 0; i--) {
      s ^= s << 13; s ^= s >> 7; s ^= s << 17;
      std::swap(w->order[i], w->order[(int)(s % (uint64_t)(i + 1))]);
    }
  }
  for (;;) {
    bool ran = false;
    for (int k = 0; k < n && !w->failed; k++) {
      int i = w->order[k];
      if (w->fibers[i].state != RUNNABLE) continue;
      ran = true;
      w->cur = i;
#ifdef MSLCPU_UCONTEXT
      swapcontext(&w->sched_ctx, &w->fibers[i].ctx);
#else
      mslcpu_swap(&w->sched_sp, w->fibers[i].sp);
#endif
    }
    if (w->failed) return false;
    if (w->done == n) return true;
    if (!ran) { describe_deadlock(w); return false; }
  }
}

inline void* tg_alloc(size_t size, size_t align) {
  Worker* w = W();
  Fiber& f = w->fibers[w->cur];
  size_t off = (f.tg_cursor + align - 1) / align * align;
  f.tg_cursor = off + size;
  if (f.tg_cursor > (size_t)w->L->tg_mem_limit || f.tg_cursor > kArena) {
    failf("threadgroup memory %d bytes exceeds the Metal limit of %d bytes", (int)f.tg_cursor, (int)w->L->tg_mem_limit);
    to_scheduler();
  }
  if (f.tg_cursor > w->tg_high) {  // first thread to declare it: poison, as GPU memory is not zeroed
    std::memset(w->tg_arena + w->tg_high, 0xff, f.tg_cursor - w->tg_high);
    w->tg_high = f.tg_cursor;
  }
  return w->tg_arena + off;
}

inline uint3 min_u3(uint3 a, uint3 b) { return uint3(std::min(a.x, b.x), std::min(a.y, b.y), std::min(a.z, b.z)); }

// Runs the whole dispatch (grid counts threads, as MLX's dispatchThreads does). Returns 0 or 1.
inline int launch(Launch* L, Body body, void* ctx) {
  uint3 grid = uint3(L->grid[0], L->grid[1], L->grid[2]);
  uint3 tg = uint3(std::min(L->threadgroup[0], L->grid[0]), std::min(L->threadgroup[1], L->grid[1]),
                   std::min(L->threadgroup[2], L->grid[2]));
  long tgsize = (long)tg.x * tg.y * tg.z;
  L->error[0] = 0;
  if (tgsize <= 0) { snprintf(L->error, sizeof(L->error), "empty grid or threadgroup"); return 1; }
  if (tgsize > L->max_threads) {
    snprintf(L->error, sizeof(L->error), "threadgroup of %ld threads exceeds the Metal limit of %d threads per threadgroup", tgsize, L->max_threads);
    return 1;
  }
  uint3 ngroups = (grid + tg - 1) / tg;
  long total = (long)ngroups.x * ngroups.y * ngroups.z;
  std::vector<long> order(total);
  for (long i = 0; i < total; i++) order[i] = i;
  if (L->schedule == 1) std::reverse(order.begin(), order.end());
  if (L->schedule >= 2) {
    uint64_t s = (uint64_t)L->schedule * 0xD1B54A32D192ED03ull + 1;
    for (long i = total - 1; i > 0; i--) {
      s ^= s << 13; s ^= s >> 7; s ^= s << 17;
      std::swap(order[i], order[(long)(s % (uint64_t)(i + 1))]);
    }
  }
  std::atomic<long> next(0);
  std::atomic<bool> failed(false);
  auto work = [&]() {
    Worker w;
    w.L = L; w.body = body; w.ctx = ctx;
    w.tg_arena = (unsigned char*)malloc(kArena);
    W() = &w;
    for (;;) {
      long gi = next.fetch_add(1);
      if (gi >= total || failed.load()) break;
      long g = order[gi];
      uint3 pos = uint3((uint)(g % ngroups.x), (uint)((g / ngroups.x) % ngroups.y), (uint)(g / ((long)ngroups.x * ngroups.y)));
      uint3 here = min_u3(tg, grid - pos * tg);  // edge groups of a non-uniform dispatch are smaller
      Attrs& a = w.base;
      a.threads_per_grid = grid; a.grid_size = grid; a.grid_origin = uint3(0);
      a.threadgroup_position_in_grid = pos; a.threadgroups_per_grid = ngroups;
      a.threads_per_threadgroup = here; a.dispatch_threads_per_threadgroup = tg;
      int n = (int)(here.x * here.y * here.z);
      a.simdgroups_per_threadgroup = (n + 31) / 32; a.dispatch_simdgroups_per_threadgroup = (uint)((tgsize + 31) / 32);
      a.quadgroups_per_threadgroup = (n + 3) / 4; a.dispatch_quadgroups_per_threadgroup = (uint)((tgsize + 3) / 4);
      a.threads_per_simdgroup = 32; a.thread_execution_width = 32;
      ensure_capacity(&w, n);
      if (!run_group(&w, n)) {
        if (!failed.exchange(true))
          snprintf(L->error, sizeof(L->error), "threadgroup (%u, %u, %u): %s", pos.x, pos.y, pos.z, w.error);
        break;
      }
    }
    W() = nullptr;
    free(w.tg_arena);
    if (w.stacks) munmap(w.stacks, (kStack + 4096) * w.nstacks);
  };
  int nw = std::max(1, std::min<int>(L->workers, (int)std::min<long>(total, 64)));
  if (nw == 1) {
    work();
  } else {
    std::vector<std::thread> ts;
    for (int i = 0; i < nw; i++) ts.emplace_back(work);
    for (auto& t : ts) t.join();
  }
  return failed.load() ? 1 : 0;
}
}  // namespace mslcpu


namespace mslcpu {
static void api_barrier() { barrier_arrive(); }
static void api_fail(const char* m) {
  Worker* w = W();
  if (!w->failed) { w->failed = true; snprintf(w->error, sizeof(w->error), "%s", m); }
}
static SimdGroup* api_cur_sg() { return &rt_cur_sg(); }
static int api_cur_lane() { return rt_cur_lane(); }
static const Api kApi = {&api_barrier, &simd_arrive, &api_cur_sg, &api_cur_lane, &tg_alloc, &api_fail, &launch};
}  // namespace mslcpu

extern "C" const mslcpu::Api* mslcpu_api() { return &mslcpu::kApi; }

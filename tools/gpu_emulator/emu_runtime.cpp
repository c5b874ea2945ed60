// Fiber scheduler behind emu_cuda.h: runs the blocks of a grid one after another, the threads
// of a block as fibers that switch at every barrier.

#include "emu_cuda.h"

#include <xmmintrin.h>

namespace emu {

dim3 thread_idx, block_idx, block_dim, grid_dim;

namespace {

enum class State { kRunnable, kAtBlockBarrier, kAtWarpBarrier, kDone };

struct Fiber {
  ucontext_t context;
  State state;
  std::vector<char> stack;
};

constexpr size_t kStackBytes = 256 * 1024;

std::vector<Fiber> fibers;
std::vector<unsigned long long> slots(1024);
std::vector<unsigned char> shared_memory;
ucontext_t scheduler;
int current = -1;
const std::function<void()>* kernel_body = nullptr;

void set_thread_index(int index) {
  thread_idx = dim3(index % block_dim.x, (index / block_dim.x) % block_dim.y, index / (block_dim.x * block_dim.y));
}

void fiber_main(int index) {
  (*kernel_body)();
  fibers[index].state = State::kDone;
  // Returning resumes the scheduler through uc_link.
}

void wait(State state) {
  const int self = current;
  fibers[self].state = state;
  swapcontext(&fibers[self].context, &scheduler);
  current = self;
  set_thread_index(self);
}

// Runs one block to completion; returns non-zero on a barrier deadlock.
int run_block(int num_threads) {
  for (int i = 0; i < num_threads; ++i) {
    Fiber& fiber = fibers[i];
    getcontext(&fiber.context);
    fiber.context.uc_stack.ss_sp = fiber.stack.data();
    fiber.context.uc_stack.ss_size = fiber.stack.size();
    fiber.context.uc_link = &scheduler;
    makecontext(&fiber.context, reinterpret_cast<void (*)()>(fiber_main), 1, i);
    fiber.state = State::kRunnable;
  }
  const int num_warps = (num_threads + 31) / 32;
  for (;;) {
    for (int i = 0; i < num_threads; ++i) {
      if (fibers[i].state != State::kRunnable) continue;
      current = i;
      set_thread_index(i);
      swapcontext(&scheduler, &fibers[i].context);
    }
    int done = 0, at_block = 0;
    for (int i = 0; i < num_threads; ++i) {
      done += fibers[i].state == State::kDone;
      at_block += fibers[i].state == State::kAtBlockBarrier;
    }
    if (done == num_threads) return 0;
    bool released = false;
    for (int w = 0; w < num_warps; ++w) {
      int waiting = 0, live = 0;
      for (int i = w * 32; i < (w + 1) * 32 && i < num_threads; ++i) {
        live += fibers[i].state != State::kDone;
        waiting += fibers[i].state == State::kAtWarpBarrier;
      }
      if (waiting > 0 && waiting == live) {
        for (int i = w * 32; i < (w + 1) * 32 && i < num_threads; ++i) {
          if (fibers[i].state == State::kAtWarpBarrier) fibers[i].state = State::kRunnable;
        }
        released = true;
      }
    }
    if (!released && at_block == num_threads - done) {
      for (int i = 0; i < num_threads; ++i) {
        if (fibers[i].state == State::kAtBlockBarrier) fibers[i].state = State::kRunnable;
      }
      released = true;
    }
    if (!released) {
      std::fprintf(stderr, "emulator: deadlock in block (%u, %u, %u): %d threads at __syncthreads, %d done, "
                   "the rest at a warp shuffle\n", block_idx.x, block_idx.y, block_idx.z, at_block, done);
      return 3;
    }
  }
}

}  // namespace

void block_barrier() { wait(State::kAtBlockBarrier); }
void warp_barrier() { wait(State::kAtWarpBarrier); }
unsigned long long* shuffle_slots() { return slots.data(); }
void* dynamic_shared() { return shared_memory.data(); }

int run_grid(dim3 grid, dim3 block, size_t shared_bytes, const std::function<void()>& body) {
  const int num_threads = (int)(block.x * block.y * block.z);
  if (num_threads <= 0 || num_threads > 1024) {
    std::fprintf(stderr, "emulator: invalid block size %d\n", num_threads);
    return 4;
  }
  if (fibers.size() < (size_t)num_threads) {
    const size_t old = fibers.size();
    fibers.resize(num_threads);
    for (size_t i = old; i < fibers.size(); ++i) fibers[i].stack.resize(kStackBytes);
  }
  // Dynamic shared memory starts as garbage on a GPU; fill it with a pattern so that a read
  // before a write shows up as wrong numbers.
  shared_memory.assign(shared_bytes + 16, 0xA5);
  kernel_body = &body;
  block_dim = block;
  grid_dim = grid;
  // -ftz=true: flush subnormal inputs (DAZ) and results (FTZ) while the kernel runs. The fibers'
  // contexts are made inside, so they start with these bits too.
  const unsigned saved_csr = _mm_getcsr();
  _mm_setcsr(saved_csr | 0x8040u);
  struct RestoreCsr {
    unsigned csr;
    ~RestoreCsr() { _mm_setcsr(csr); }
  } restore{saved_csr};
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        block_idx = dim3(x, y, z);
        const int status = run_block(num_threads);
        if (status != 0) return status;
      }
    }
  }
  return 0;
}

}  // namespace emu

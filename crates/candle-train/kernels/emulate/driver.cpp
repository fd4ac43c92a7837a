// Runs one kernel of ../optim.cu on the host (see cuda_emu.h) over raw little-endian files in
// a directory, with the grid the Rust launcher uses, and writes the results back beside them:
//
//   driver adamw DIR N        p g m v s(7)          -> p m v copy(bf16) p32 (the f32 variant)
//   driver sgd DIR N NESTEROV FIRST MOMENTUM(0|1)   p g [buf] s(4) -> p [buf] copy(bf16)
//   driver adamw8bit DIR N    p g mc ms vc vs sc uc s(7) -> p mc ms vc vs copy(bf16)
//   driver sumsq DIR N        x                     -> total(f64)
//
// Built and run by tests/cuda_kernels.rs; never part of a build.
#include "cuda_emu.h"
#include "../optim.cu"

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <string>

template <typename T>
static std::vector<T> load(const std::string &dir, const char *name, size_t count) {
  std::ifstream in(dir + "/" + name, std::ios::binary);
  std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (bytes.size() != count * sizeof(T)) {
    throw std::runtime_error(std::string("bad size for ") + name);
  }
  std::vector<T> out(count);
  std::memcpy(out.data(), bytes.data(), bytes.size());
  return out;
}

template <typename T>
static void save(const std::string &dir, const char *name, const std::vector<T> &values) {
  std::ofstream out(dir + "/" + name, std::ios::binary);
  out.write(reinterpret_cast<const char *>(values.data()), (std::streamsize)(values.size() * sizeof(T)));
}

static unsigned blocks_for(size_t n, size_t per, size_t most) {
  size_t b = (n + per - 1) / per;
  return (unsigned)std::clamp<size_t>(b, 1, most);
}

int main(int argc, char **argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: driver KERNEL DIR N ...\n");
    return 2;
  }
  const std::string kernel = argv[1], dir = argv[2];
  const size_t n = std::strtoull(argv[3], nullptr, 10);
  try {
    if (kernel == "adamw") {
      auto p = load<float>(dir, "p", n), g = load<float>(dir, "g", n);
      auto m = load<float>(dir, "m", n), v = load<float>(dir, "v", n);
      auto s = load<float>(dir, "s", 7);
      auto p32 = p, m32 = m, v32 = v;
      std::vector<__nv_bfloat16> copy(n);
      const unsigned grid = blocks_for(n, 256, 132 * 32);
      emu_launch(grid, 256, [&] {
        candle_fit_adamw_bf16(n, p.data(), g.data(), m.data(), v.data(), copy.data(), s[0], s[1], s[2], s[3],
                              s[4], s[5], s[6]);
      });
      emu_launch(grid, 256, [&] {
        candle_fit_adamw_f32(n, p32.data(), g.data(), m32.data(), v32.data(), nullptr, s[0], s[1], s[2], s[3],
                             s[4], s[5], s[6]);
      });
      save(dir, "p.out", p);
      save(dir, "m.out", m);
      save(dir, "v.out", v);
      save(dir, "copy.out", copy);
      save(dir, "p32.out", p32);
    } else if (kernel == "sgd") {
      const int nesterov = std::atoi(argv[4]), first = std::atoi(argv[5]), with_buffer = std::atoi(argv[6]);
      auto p = load<float>(dir, "p", n), g = load<float>(dir, "g", n);
      auto s = load<float>(dir, "s", 4);
      std::vector<float> buf = with_buffer ? load<float>(dir, "buf", n) : std::vector<float>();
      std::vector<__nv_bfloat16> copy(n);
      emu_launch(blocks_for(n, 256, 132 * 32), 256, [&] {
        candle_fit_sgd_bf16(n, p.data(), g.data(), with_buffer ? buf.data() : nullptr, copy.data(), s[0], s[1],
                            s[2], s[3], nesterov, first);
      });
      save(dir, "p.out", p);
      if (with_buffer) {
        save(dir, "buf.out", buf);
      }
      save(dir, "copy.out", copy);
    } else if (kernel == "adamw8bit") {
      const size_t blocks = (n + 2047) / 2048;
      auto p = load<float>(dir, "p", n), g = load<float>(dir, "g", n);
      auto mc = load<uint8_t>(dir, "mc", n), vc = load<uint8_t>(dir, "vc", n);
      auto ms = load<float>(dir, "ms", blocks), vs = load<float>(dir, "vs", blocks);
      auto sc = load<float>(dir, "sc", 256), uc = load<float>(dir, "uc", 256);
      auto s = load<float>(dir, "s", 7);
      std::vector<__nv_bfloat16> copy(n);
      emu_launch(blocks_for(n, 2048, 132 * 8), 256, [&] {
        candle_fit_adamw8bit_bf16(n, p.data(), g.data(), mc.data(), ms.data(), vc.data(), vs.data(), sc.data(),
                                  uc.data(), copy.data(), s[0], s[1], s[2], s[3], s[4], s[5], s[6]);
      });
      save(dir, "p.out", p);
      save(dir, "mc.out", mc);
      save(dir, "ms.out", ms);
      save(dir, "vc.out", vc);
      save(dir, "vs.out", vs);
      save(dir, "copy.out", copy);
    } else if (kernel == "sumsq") {
      auto x = load<float>(dir, "x", n);
      const unsigned grid = blocks_for(n, 256, 1024);
      std::vector<double> partial(grid);
      emu_launch(grid, 256, [&] { candle_fit_sum_sq_f64(n, x.data(), partial.data()); });
      double total = 0.0;
      for (double v : partial) {
        total += v;
      }
      save(dir, "total.out", std::vector<double>{total});
    } else {
      std::fprintf(stderr, "unknown kernel %s\n", kernel.c_str());
      return 2;
    }
  } catch (const std::exception &e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
  return 0;
}

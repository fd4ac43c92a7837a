// Host stand-in for CUDA's header (see cuda_emu.h): an IEEE half rounded to nearest even.
#pragma once
struct __half {
  _Float16 value;
  __half() : value(0) {}
  explicit __half(float f) : value((_Float16)f) {}
};

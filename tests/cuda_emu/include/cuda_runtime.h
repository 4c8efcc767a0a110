// cuda_runtime.h: the CPU emulation's stand-in for the CUDA header of this name (see ../emu.h).
#include "../emu.h"

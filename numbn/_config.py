"""Tunables of the kernels, in one place so tests and benchmarks can change them.

Everything here is read at call time, never at import time of the kernels, so
``monkeypatch.setattr(numbn._config, NAME, value)`` takes effect at once.
"""

# CPU kernels ---------------------------------------------------------------

#: Elements one thread reduces in a block before merging it into its running
#: (count, mean, M2): small enough that the second pass over the block hits
#: the cache, large enough that the merge costs nothing.
CPU_BLOCK = 4096

#: Smallest number of elements worth giving a thread of its own.
CPU_MIN_TASK = 16384

#: Tasks per thread a reduction is split into, for load balance.
CPU_TASKS_PER_THREAD = 4

#: A channel-major reduction (inner run >= this) splits per channel; shorter
#: inner runs (channels-last, 2-D) use per-thread row blocks over all channels.
CPU_CHANNEL_MAJOR_MIN_INNER = 16

# CUDA kernels --------------------------------------------------------------

#: Threads per block of the CUDA kernels (a multiple of 32).
CUDA_THREADS_PER_BLOCK = 256

#: Largest number of blocks a reduction is split into per channel.
CUDA_MAX_BLOCKS_PER_CHANNEL = 64

#: Elements each block of a reduction aims to cover.
CUDA_ELEMENTS_PER_BLOCK = 16384

"""Tunables of the kernels, in one place so tests and benchmarks can change them.

Everything here is read at call time, never at import time of the kernels, so
``monkeypatch.setattr(numbn._config, NAME, value)`` takes effect at once: the
launch plans that ``numbn._cpu`` computes from these values and keeps per
array layout are dropped whenever one of them is set (:class:`_Settings`).
"""

import sys
import types

#: Called, without arguments, after any setting here is assigned or deleted.
ON_CHANGE: list = []


class _Settings(types.ModuleType):
    """This module's type: assigning or deleting a setting runs the callbacks
    of ``ON_CHANGE`` (``numbn._cpu`` drops its launch plans there), so that
    no value computed from the old setting outlives it. Assignments in this
    file's own body (the defaults) go to the module's namespace directly."""

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        _changed()

    def __delattr__(self, name):
        super().__delattr__(name)
        _changed()


def _changed() -> None:
    for callback in ON_CHANGE:
        callback()


sys.modules[__name__].__class__ = _Settings

# CPU kernels ---------------------------------------------------------------

#: Elements one thread reduces in a block before merging it into its running
#: (count, mean, M2): small enough that the second pass over the block hits
#: the cache, large enough that the merge costs nothing.
CPU_BLOCK = 4096

#: Elements (rows x C) of a channels-last block: every block costs a Chan
#: merge per channel, so blocks are larger than ``CPU_BLOCK``, while still
#: fitting in a core's L2 cache for the second pass.
CPU_ROWS_BLOCK = 32768

#: Fewest rows in a block, however long the rows (from 513 columns on):
#: each block costs a merge per column, and a block of few rows is often
#: "too far" (``_cpu._too_far``) from the mean of the rows before it, whose
#: columns are then summed again: with 8 rows, about one column in ten of
#: standard-normal data. Training forward, float32, two threads, whole
#: calls interleaved with PyTorch, 64 rows over 8 rows a block: (1024,
#: 4096) 0.56-0.58, (128, 8192) 0.70-0.79, (163, 1024, 5, 5) as rows of
#: 25600 columns 0.72-0.77, (128, 512, 4, 4) 0.70-0.76, NHWC (8, 7, 7,
#: 1024) 0.91-0.93; float16 (1024, 4096) 0.49-0.56, float64 0.94-0.97;
#: the backward (a float64 flush per block) 0.84-1.0; 32 rows did about as
#: well (measured). (One row a block against 8 had cost 1.7x.)
CPU_ROWS_BLOCK_MIN_ROWS = 64
#: At most this many rows a channels-last block: each column of a block is
#: summed in one accumulator of x's arithmetic dtype (float32 for float32),
#: so its length bounds the rounding. At C=2 a block of 16384 rows lost the
#: rest of a column's squares behind one outlier of 1e6 (float32 invstd off
#: by 3e-5 relative); 512 rows (C >= 64 had no more) keep it to 3.5e-6.
CPU_ROWS_BLOCK_MAX_ROWS = 512

#: How far ahead (bytes of x) the channels-last statistics and normalisation
#: kernels prefetch x when it is not cache-resident (``_cpu._ahead``).
CPU_ROWS_STREAM_AHEAD_BYTES = 8192
#: Largest channel slab (bytes of x per channel) that the fused kernels take
#: in one task: statistics (or the backward sums), then the elementwise pass
#: while the slab is still cached, so x crosses memory once. The second pass
#: reads from L2 or, past it, from L3: on the machine this was tuned on (L2
#: 1 MiB per core, L3 32 MiB) 2 MiB slabs beat 512 KiB by 10-20% (backward
#: of (16, 32, 112, 112): 1.78 ms against 2.27; of (32, 32, 112, 112): 8.97
#: against 11.06), and 4 MiB was no better.
CPU_FUSED_MAX_SLAB_BYTES = 2 * 1024 * 1024
#: The fused backward takes channels whose runs are shorter than
#: ``CPU_FUSED_GROUP_MAX_RUN_BYTES`` in groups of adjacent channels, as many
#: as keep the group's slabs of x and dy within ``CPU_FUSED_GROUP_BYTES``,
#: walked in memory order (``_cpu._channel_group``): a channel alone is
#: ``outer`` runs of x and of dy, a few cache lines each, a channel's stride
#: apart, which the hardware prefetcher follows badly; a group is ``outer``
#: stretches of ``group`` runs each. 0: one channel a task. Full calls,
#: float32, two threads, interleaved with PyTorch and a copy, one channel a
#: task over grouped time (the backward of the larger of these inputs took
#: the two-pass kernels before grouping):
#:
#: - (64, 256, 14, 14) 1.27-1.31 and, with x shared by the calls as in
#:   ``numbn bench``, 1.12-1.22, then 1.05-1.06 in a later sitting; (64,
#:   512, 7, 7) 1.52-1.79, (16, 512, 14,
#:   14) 1.49-1.69, (32, 1024, 7, 7) 1.90-2.24, (8, 512, 7, 7) 2.03-2.11,
#:   (32, 256, 28, 28) 1.38-1.51, (32, 128, 28, 28) 1.29-1.36 and
#:   1.09-1.21, (64, 128, 20, 20) 1.21-1.26, (128, 256, 12, 12) 1.40-1.44;
#:   float16 (64, 256, 14, 14) 1.70-1.76, (128, 512, 7, 7) 2.24-2.29;
#:   float64 (32, 256, 14, 14) 1.26-1.43.
#: - the two-pass kernels over grouped time, where they had taken over:
#:   (96, 512, 8, 8) 1.12-1.15, (64, 512, 10, 10) 1.18-1.19, (128, 256, 12,
#:   12) 1.08-1.12, (128, 512, 7, 7) 0.97-1.00, (256, 256, 7, 7) 0.98-1.00;
#:   float16 (96, 512, 10, 10) 1.01-1.04.
#: - budgets of 512 KiB to 2 MiB did alike at 7x7 to 20x20 maps, but with
#:   about 680 KiB the fused kernel lost to the two passes at 7x7 to 10x10
#:   maps with N >= 64 (1.08-1.26x their time); runs of 4 KiB and more
#:   gained nothing ((32, 64, 56, 56) 0.97-1.03).
#:
#: The training forward keeps one channel a task: grouped the same way, it
#: gained at 8x8 and 10x10 maps of 12 MiB (1.08-1.39) but lost at small
#: inputs ((8, 512, 7, 7): 0.64-0.76) and went both ways at 7x7 and 14x14
#: maps from one sitting to the next ((32, 1024, 7, 7): 0.86-0.92 in one,
#: 1.29-1.34 in another), where its prefetch of the runs ahead
#: (``_cpu._AHEAD_BYTES``) already serves (measured).
CPU_FUSED_GROUP_BYTES = 2 * 1024 * 1024
CPU_FUSED_GROUP_MAX_RUN_BYTES = 4096

#: Bytes of input that count as cache-resident: the rows kernels (channels-last
#: input, and short runs) prefetch rows ahead above this (x and dy together),
#: not below it, where the prefetch instructions only cost (``_cpu._ahead``).
#: Half the 32 MiB last-level cache of the machine this was tuned on.
CPU_CACHE_BYTES = 16 * 1024 * 1024

#: Channel-major input with short runs (``inner`` = H*W elements per channel
#: and sample) takes the rows kernels, as rows of C * inner columns
#: (``numbn._cpu._row_views``), when ``inner <= CPU_ROWS_MAX_INNER`` and
#: ``C * inner**2 <= CPU_ROWS_MAX_WORK``. The channel-major kernels pay a
#: fixed cost per run (a reduction's epilogue, a merge): the training
#: forward of 4M float32 in 2x2 maps took 20.7 ms, 0.82 as rows. Long rows
#: cost the rows kernels instead (their per-column accumulators leave the L1
#: cache), and the gain shrinks as runs grow: the second limit keeps the
#: channel-major kernels where they were as fast or faster, e.g. at
#: (167, 512, 7, 7) (measured; ``benchmarks/scaling.py`` sweeps H*W at a
#: fixed size).
CPU_ROWS_MAX_INNER = 63
CPU_ROWS_MAX_WORK = 655_360
#: The elementwise passes alone (eval, the two-pass forward's normalisation)
#: take the rows view of channel-major input for runs shorter than this
#: only: they reduce nothing, and a rows view gives every element its own
#: column of coefficients to load. Eval of (256, 256, 7, 7) float32 took
#: 0.74 ms as rows, 0.46 channel-major (PyTorch 0.57); (64, 64, 7, 7) 0.037
#: and 0.033; (128, 256, 5, 5) 0.12 as rows, 0.16 channel-major (measured).
CPU_ROWS_ELEMENTWISE_MAX_INNER = 32

#: Outputs of at least this many bytes are stored non-temporally by the
#: elementwise passes, channel-major and rows (y of the forward and eval, dx
#: of the backward; ``numbn._cpu._stream_line``): each cache line goes to memory
#: without first being read, so the pass moves 2|x| (3|x| for dx) instead of
#: 3|x| (4|x|). 3/4 of the 32 MiB last-level cache of the machine this was
#: tuned on, the rule glibc's memcpy uses: a smaller output may still be in
#: the cache when the next layer reads it, which a streamed one is not. At
#: 24.5 MiB float32 the streamed eval, training forward and backward took
#: 0.85-0.87, 0.83-0.87 and 0.87-0.97 of the ordinary time; at 12.2 MiB
#: the eval with 14x14 maps took 1.23 (measured, interleaved). SyncBatchNorm
#: judges what its ranks on this machine write together: they share the cache.
CPU_STREAM_MIN_BYTES = 24 * 1024 * 1024
#: The rows kernels (channels-last and 2-D input, whose tasks each write one
#: run of memory) stream from this size already. Full calls, float32, two
#: threads, interleaved, streamed over ordinary time, forward / eval /
#: backward, in two sittings (the second on a quieter machine): (16, 56, 56,
#: 64) 12.2 MiB 0.82 / 0.74-0.77 / 0.82-0.85, then 0.85-0.93 / 0.81-0.90 /
#: 0.77-0.81; (12288, 256) 12 MiB 0.97 / 0.92 / 0.89; (16384, 256) 16 MiB
#: 0.84 / 0.66 / 0.78, then 0.89 / 0.75 / 0.79. At 8 MiB it went both ways:
#: (8192, 256) 0.93 / 0.79 / 0.95, then 1.08-1.11 / 1.13-1.23 / 1.02-1.19;
#: at 2-3 MiB the backward took up to 1.8x as long (measured).
CPU_ROWS_STREAM_MIN_BYTES = 12 * 1024 * 1024
#: The one-task-per-channel kernels (the fused training forward and backward
#: of channel-major input) stream from this size already, when the channel's
#: runs have at least ``CPU_SLAB_STREAM_MIN_RUN_BYTES``: a task writes its
#: channel's runs far apart, and ordinary stores there cost a scattered read
#: of each line as well. Full calls, float32, two threads, interleaved,
#: streamed over ordinary time, forward / backward: (16, 256, 14, 14) 3.1
#: MiB 0.72 / 0.75; (8, 64, 56, 56) 6.1 MiB 0.76 / 0.79; (64, 256, 14, 14)
#: 12.2 MiB 0.74 / 0.94; (16, 64, 56, 56) 0.68 / 0.80; (64, 256, 11, 11)
#: 0.80 / 0.87 (measured). Below 4 MiB the output is left in the cache for
#: the next layer.
CPU_SLAB_STREAM_MIN_BYTES = 4 * 1024 * 1024
#: Shorter runs keep ordinary stores in those kernels: the partial lines at
#: a run's ends are stored as usual, and in a short run they are much of it.
#: Streamed, 7x7 maps (196-byte runs) took 1.25-1.47x the forward's time,
#: 10x10 (400 bytes) 0.86-1.09x (measured).
CPU_SLAB_STREAM_MIN_RUN_BYTES = 448
#: The names of the size thresholds above, from which outputs are streamed:
#: set all three past any size and every output is stored ordinarily
#: (``benchmarks/store_choice.py``, the streaming tests).
STORE_THRESHOLDS = ("CPU_STREAM_MIN_BYTES", "CPU_SLAB_STREAM_MIN_BYTES",
                    "CPU_ROWS_STREAM_MIN_BYTES")
#: Inputs with fewer elements run the serial twins of the kernels: starting
#: the threads of a parallel region costs more than such an input's work.
CPU_PARALLEL_MIN = 32768

#: Copies between memory orders (a ``dy`` whose order is not x's) of at
#: least this many elements take the tiled kernel (``_cpu.copy_into``);
#: smaller ones, cached anyway, NumPy's assignment.
CPU_TILED_COPY_MIN = 32768

#: Outputs of at least this many bytes are touched once per page when
#: allocated, on the calling thread (numbn._layout.Plan.empty says why).
#: glibc maps allocations above 32 MiB anew every time; smaller ones reuse
#: heap pages that are already resident, where touching them only costs.
CPU_PREFAULT_BYTES = 32 * 1024 * 1024

#: Smallest number of elements worth giving a thread of its own.
CPU_MIN_TASK = 16384

#: Tasks per thread a reduction is split into, for load balance.
CPU_TASKS_PER_THREAD = 4
#: Tasks per thread of the rows kernels (``_cpu._row_tasks``): one. Numba's
#: parallel loops give each thread an equal, contiguous share of the tasks
#: (a static schedule), so more tasks than threads balanced nothing there,
#: and each costs a probe, a merge per block and a partial per column.
#: Whole calls, float32, two threads, one task a thread over four: forward
#: (32, 4096) 0.67-0.68, (64, 4096) 0.71-0.74, (128, 8192) 0.77-0.81,
#: (128, 1024) 0.84-0.87, (256, 1024) 0.88-0.95, NHWC (8, 7, 7, 1024)
#: 0.87-0.90; backward (32, 4096) 0.82-0.83, (64, 4096) 0.86-0.88; from
#: (2048, 512) and (8192, 64) on 0.95-1.08, noise (measured).
CPU_ROWS_TASKS_PER_THREAD = 1

#: Channel-major reductions of the two-pass path (the statistics, the
#: backward's sums) split the outer axis among their tasks, each task
#: reading its rows of every channel in memory order (``_cpu._stats_outer``,
#: ``_cpu._sums_outer``), when the outer axis has at least this many rows
#: per thread; with fewer, one channel's runs at a time, split along the
#: channel for every thread (``_cpu._stats_channel_major``).
CPU_OUTER_ROWS_PER_THREAD = 4

# CUDA kernels --------------------------------------------------------------

#: Threads per block of the CUDA kernels: a power of two, at least 32 (a warp)
#: on a GPU; the CUDA simulator takes any power of two (tests use 8).
CUDA_THREADS_PER_BLOCK = 256

#: Largest number of blocks a reduction is split into per channel (the
#: per-channel partials are merged by a second, small kernel).
CUDA_MAX_BLOCKS_PER_CHANNEL = 64

#: Elements each block aims to cover (reductions and elementwise kernels);
#: sets the grid size, with the caps here.
CUDA_ELEMENTS_PER_BLOCK = 16384

#: Channel-major CUDA kernels (blocks along each channel's contiguous inner
#: run) when the inner run is at least this long; shorter runs (channels-last,
#: 2-D) tile contiguous channels across the threads of a block instead.
CUDA_CHANNEL_MAJOR_MIN_INNER = 32

#: Largest 1-D grid of the grid-stride elementwise and copy kernels.
CUDA_MAX_GRID_BLOCKS = 65535

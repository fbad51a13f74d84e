/* Layouts and constants of probes/block_io.bpf.c that user space reads
 * (map keys and values, totals indexes, ops, latency kinds, slots).
 *
 * Mirrored by ctypes in agent/ebpf/block_io.py; tests/unit/
 * test_probe_layouts.py compiles this file with cc (with the -DSLOT_MAX
 * the loader passes) and compares every field's name, offset and size and
 * every constant. Needs common.h first.
 */
#ifndef KVMSCOPE_BLOCK_IO_H
#define KVMSCOPE_BLOCK_IO_H

#ifndef SLOT_MAX
#define SLOT_MAX 36 /* 2^36 ns = 68.7 s */
#endif
#define NSLOTS (SLOT_MAX + 2)

/* in order: BLOCK_OPS (agent/ebpf/decode.py) */
enum op { OP_READ = 0, OP_WRITE = 1, OP_FLUSH = 2, OP_DISCARD = 3, OP_OTHER = 4, OP_N = 5 };
/* in order: the Python KINDS (agent/ebpf/block_io.py) */
enum kind { KIND_TOTAL = 0, KIND_QUEUE = 1, KIND_DEVICE = 2, KIND_N = 3 };

/* totals indexes */
#define TOT_INSERTED 0
#define TOT_ISSUED 1
#define TOT_COMPLETED 2   /* completions matched to an issue */
#define TOT_UNMATCHED 3   /* completions without an issue seen (lost) */
#define TOT_OVERWRITTEN 4 /* issue found the slot taken by another request */
#define TOT_N 5

struct lat_key {
    u32 dev;
    u32 op;
};

struct lat_val {
    u64 slots[KIND_N * NSLOTS]; /* [kind * NSLOTS + slot] */
    u64 sum_ns[KIND_N];
    u64 bytes;
};

/* One process's requests on one (dev, op): the total-latency slots (their
 * sum is the count), the latency sum and the bytes. */
struct proc_val {
    u64 slots[NSLOTS];
    u64 sum_ns;
    u64 bytes;
};

struct proc_key {
    u32 tgid; /* the submitter's process (every thread of it) */
    u32 dev;
    u32 op;
};

#endif

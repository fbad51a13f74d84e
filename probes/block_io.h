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
#define TOT_INSERTED 0     /* classic: block_rq_insert runs; request mode: block_io_start runs */
#define TOT_ISSUED 1       /* classic: block_rq_issue runs (request mode: none) */
#define TOT_COMPLETED 2    /* requests counted in the histograms */
#define TOT_UNMATCHED 3    /* classic: completions without an issue seen (lost) */
#define TOT_OVERWRITTEN 4  /* classic: issue found the slot taken by another request */
#define TOT_UNTIMED 5      /* request mode: completions of requests the kernel kept no start time for */
#define TOT_PARTIAL 6      /* request mode: partial completions (the request goes on; counted once, at its end) */
#define TOT_UNATTRIBUTED 7 /* request mode: completions whose submitter was not in the owner table (tgid 0) */
#define TOT_FULL 8         /* completions of a (dev, op) the lat table had no room for (not in the histograms) */
#define TOT_PROC_EVICTED 9 /* procs entries pushed out for another (tgid, dev, op) on their CPU */
#define TOT_N 10

#ifndef LAT_ENTRIES
#define LAT_ENTRIES 256 /* (dev, op) per CPU, a power of two */
#endif
#ifndef PROC_ENTRIES
#define PROC_ENTRIES 1024 /* (tgid, dev, op) per CPU, a power of two */
#endif

/* lat: per-CPU array, open addressing on (dev, op); an entry is never
 * given back (a host has far fewer devices): used != 0 from its first
 * completion on. Each CPU's copy carries its own key: user space sums the
 * CPUs by key, not by index. */
struct lat_val {
    u32 dev;
    u32 op;
    u32 used;
    u32 pad;
    u64 slots[KIND_N * NSLOTS]; /* [kind * NSLOTS + slot] */
    u64 sum_ns[KIND_N];
    u64 bytes;
};

/* procs: per-CPU array, open addressing on (tgid, dev, op), the least
 * recently completed of the probed entries pushed out when they are all
 * taken. gen counts the entry's (re)starts on its CPU (0: never used), so
 * user space tells a restarted entry from a grown one. */
struct proc_val {
    u32 tgid; /* the submitter's process (every thread of it); 0: not known */
    u32 dev;
    u32 op;
    u32 gen;
    u64 last_ns;
    u64 slots[NSLOTS]; /* total latency; their sum is the count */
    u64 sum_ns;
    u64 bytes;
};

#endif

/* kvmscope: block I/O latency per device and operation, and per issuing
 * process.
 *
 * Tracepoints: block:block_rq_issue and block:block_rq_complete (required),
 * block:block_rq_insert (optional, HAVE_BLOCK_RQ_INSERT: splits queue time
 * from device time for requests that pass through an I/O scheduler or the
 * software queues).
 *
 * The tracepoints carry no request pointer, so a request is keyed by
 * (dev, op, sector), as bcc's tracepoint-based tools do. Two requests in
 * flight on the same device, op and sector at once overwrite each other
 * (counted as lost). The issuing process is taken at insert (the
 * submitter's context) or else at issue; completion runs in interrupt
 * context, so it is carried in the in-flight map.
 *
 * Maps:
 *   inflight  lru_hash  (dev, op, sector) -> insert/issue time, tgid, comm;
 *                       LRU: a request that never completes is evicted,
 *                       never leaked
 *   hist      hash      (dev, op, kind, log2 slot) -> count
 *   sums      hash      (dev, op, kind) -> count, sum_ns, bytes
 *   procs     lru_hash  (tgid, comm, dev, op) -> count, sum_ns, bytes
 *   totals    percpu    see TOT_*
 *
 * kind: 0 = total (first seen -> complete), 1 = queue (insert -> issue,
 * only when insert was seen), 2 = device (issue -> complete).
 * Slot s holds latencies in [2^(s-1), 2^s) ns (bpf_log2l); SLOT_MAX + 1
 * holds everything at or above 2^SLOT_MAX ns.
 *
 * Defines: MAX_INFLIGHT, MAX_HIST_DEVS, MAX_PROCS, SLOT_MAX,
 * HAVE_BLOCK_RQ_INSERT.
 */
#include "common.h"

#ifndef MAX_INFLIGHT
#define MAX_INFLIGHT 16384
#endif
#ifndef MAX_HIST_DEVS
#define MAX_HIST_DEVS 256
#endif
#ifndef MAX_PROCS
#define MAX_PROCS 4096
#endif
#ifndef SLOT_MAX
#define SLOT_MAX 36 /* 2^36 ns = 68.7 s */
#endif

enum op { OP_READ = 0, OP_WRITE = 1, OP_FLUSH = 2, OP_DISCARD = 3, OP_OTHER = 4 };
enum kind { KIND_TOTAL = 0, KIND_QUEUE = 1, KIND_DEVICE = 2 };

#define TOT_INSERTED 0
#define TOT_ISSUED 1
#define TOT_COMPLETED 2       /* completions matched to an issue */
#define TOT_UNMATCHED 3       /* completions without an issue seen (lost) */
#define TOT_OVERWRITTEN 4     /* issue found the slot taken by another request */
#define TOT_N 5

struct rq_key {
    u32 dev;
    u32 op;
    u64 sector;
};

struct rq_val {
    u64 insert_ns;
    u64 issue_ns;
    u32 tgid;
    u32 bytes;
    char comm[16];
};

struct hist_key {
    u32 dev;
    u8 op;
    u8 kind;
    u8 slot;
    u8 pad;
};

struct sum_key {
    u32 dev;
    u8 op;
    u8 kind;
    u16 pad;
};

struct sum_val {
    u64 count;
    u64 sum_ns;
    u64 bytes;
};

struct proc_key {
    u32 tgid;
    u32 dev;
    u32 op;
    char comm[16];
};

BPF_TABLE("lru_hash", struct rq_key, struct rq_val, inflight, MAX_INFLIGHT);
BPF_HASH(hist, struct hist_key, u64, MAX_HIST_DEVS * 5 * 3 * (SLOT_MAX + 2));
BPF_HASH(sums, struct sum_key, struct sum_val, MAX_HIST_DEVS * 5 * 3);
BPF_TABLE("lru_hash", struct proc_key, struct sum_val, procs, MAX_PROCS);
BPF_PERCPU_ARRAY(totals, u64, TOT_N);

static __always_inline void tot(int i)
{
    u64 *v = totals.lookup(&i);
    if (v)
        (*v)++;
}

/* rwbs (blk_fill_rwbs): an optional leading 'F' (preflush), then the op:
 * W write, R read, D discard (DE secure erase), F flush, N other. */
static __always_inline u32 op_of(const char *rwbs)
{
    char c0 = rwbs[0], c1 = rwbs[1];
    if (c0 == 'F') {
        if (c1 == 'W')
            return OP_WRITE;
        if (c1 == 'R')
            return OP_READ;
        if (c1 == 'D')
            return OP_DISCARD;
        return OP_FLUSH;
    }
    if (c0 == 'R')
        return OP_READ;
    if (c0 == 'W')
        return OP_WRITE;
    if (c0 == 'D')
        return OP_DISCARD;
    return OP_OTHER;
}

static __always_inline void observe(u32 dev, u32 op, u8 kind, u64 ns, u64 bytes)
{
    u64 slot = bpf_log2l(ns);
    if (slot > SLOT_MAX)
        slot = SLOT_MAX + 1;
    struct hist_key hk = {.dev = dev, .op = op, .kind = kind, .slot = slot};
    u64 zero = 0;
    u64 *c = hist.lookup_or_try_init(&hk, &zero);
    if (c)
        __sync_fetch_and_add(c, 1);
    struct sum_key sk = {.dev = dev, .op = op, .kind = kind};
    struct sum_val z = {};
    struct sum_val *s = sums.lookup_or_try_init(&sk, &z);
    if (s) {
        __sync_fetch_and_add(&s->count, 1);
        __sync_fetch_and_add(&s->sum_ns, ns);
        __sync_fetch_and_add(&s->bytes, bytes);
    }
}

#ifdef HAVE_BLOCK_RQ_INSERT
TRACEPOINT_PROBE(block, block_rq_insert)
{
    struct rq_key k = {.dev = args->dev, .op = op_of(args->rwbs), .sector = args->sector};
    struct rq_val v = {};
    v.insert_ns = bpf_ktime_get_ns();
    v.tgid = bpf_get_current_pid_tgid() >> 32;
    v.bytes = args->bytes;
    bpf_get_current_comm(&v.comm, sizeof(v.comm));
    if (inflight.lookup(&k))
        tot(TOT_OVERWRITTEN);
    inflight.update(&k, &v);
    tot(TOT_INSERTED);
    return 0;
}
#endif

TRACEPOINT_PROBE(block, block_rq_issue)
{
    struct rq_key k = {.dev = args->dev, .op = op_of(args->rwbs), .sector = args->sector};
    u64 now = bpf_ktime_get_ns();
    struct rq_val *old = inflight.lookup(&k);
    tot(TOT_ISSUED);
    if (old && old->insert_ns && !old->issue_ns) {
        /* seen at insert: keep the submitter, add the issue time */
        old->issue_ns = now;
        return 0;
    }
    if (old)
        tot(TOT_OVERWRITTEN);
    struct rq_val v = {};
    v.issue_ns = now;
    v.tgid = bpf_get_current_pid_tgid() >> 32;
    v.bytes = args->bytes;
    bpf_get_current_comm(&v.comm, sizeof(v.comm));
    inflight.update(&k, &v);
    return 0;
}

TRACEPOINT_PROBE(block, block_rq_complete)
{
    struct rq_key k = {.dev = args->dev, .op = op_of(args->rwbs), .sector = args->sector};
    struct rq_val *v = inflight.lookup(&k);
    if (!v || !v->issue_ns) {
        tot(TOT_UNMATCHED);
        return 0;
    }
    u64 now = bpf_ktime_get_ns();
    u64 start = v->insert_ns ? v->insert_ns : v->issue_ns;
    u64 total = now - start;
    u64 bytes = v->bytes;
    observe(k.dev, k.op, KIND_TOTAL, total, bytes);
    observe(k.dev, k.op, KIND_DEVICE, now - v->issue_ns, 0);
    if (v->insert_ns)
        observe(k.dev, k.op, KIND_QUEUE, v->issue_ns - v->insert_ns, 0);

    struct proc_key pk = {.tgid = v->tgid, .dev = k.dev, .op = k.op};
    __builtin_memcpy(pk.comm, v->comm, 16);
    struct sum_val z = {};
    struct sum_val *p = procs.lookup_or_try_init(&pk, &z);
    if (p) {
        __sync_fetch_and_add(&p->count, 1);
        __sync_fetch_and_add(&p->sum_ns, total);
        __sync_fetch_and_add(&p->bytes, bytes);
    }
    inflight.delete(&k);
    tot(TOT_COMPLETED);
    return 0;
}

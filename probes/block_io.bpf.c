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
 * Maps (cost: insert/issue = array arithmetic only, no hash map, no lock;
 * complete = the same + one per-CPU latency lookup + one per-CPU process
 * lookup. Hash map updates cost ~250 ns each on the measured host, array
 * access next to nothing; see docs/performance.md):
 *   inflight  array of sets   a 4-way set-associative table of in-flight
 *                             requests (dev, op, sector -> insert/issue
 *                             time, tgid): the set is a hash of the
 *                             key, a request takes a free way, else evicts
 *                             the way seen first (as an LRU would: a
 *                             request that never completes is pushed out,
 *                             never leaked). Completion frees the way by
 *                             zeroing its times. No lock: a way is written
 *                             by the issuing CPU before the request reaches
 *                             the driver and read by the completing CPU
 *                             after it comes back; two CPUs placing two
 *                             requests into the same set at the same
 *                             instant may pick the same free way, and the
 *                             loser's completion counts as unmatched (lost)
 *   lat       percpu_hash     (dev, op) -> log2 slots and sum_ns per kind,
 *                             bytes (no atomics: per CPU; Python sums the
 *                             CPUs; the count is the sum of the slots, so
 *                             buckets and _count always agree). Allocated
 *                             on first use (BPF_F_NO_PREALLOC): memory only
 *                             for the (dev, op) pairs seen
 *   procs     lru_percpu_hash (tgid, dev, op) -> total-latency slots, sum_ns,
 *                             bytes (the process's name is user space's)
 *   totals    percpu_array    see TOT_* (block_io.h)
 *
 * kind: 0 = total (first seen -> complete), 1 = queue (insert -> issue,
 * only when insert was seen), 2 = device (issue -> complete).
 * Slot s holds latencies in [2^(s-1), 2^s) ns (bpf_log2l); SLOT_MAX + 1
 * holds everything at or above 2^SLOT_MAX ns.
 *
 * Per-CPU values are updated without atomics: tracepoint programs never
 * nest on one CPU (the kernel skips a nested run and counts it in the
 * program's recursion misses, which the loader adds to the lost events).
 *
 * The layouts user space reads (lat, procs, totals), ops, kinds and TOT_*
 * live in block_io.h (shared with agent/ebpf/block_io.py, checked by a
 * test).
 *
 * Defines: MAX_INFLIGHT (a power of two), MAX_HIST_DEVS, MAX_PROCS, SLOT_MAX,
 * HAVE_BLOCK_RQ_INSERT.
 */
#include "common.h"
#include "block_io.h"

#ifndef MAX_INFLIGHT
#define MAX_INFLIGHT 16384 /* a power of two */
#endif
#define INFLIGHT_WAYS 4
#define INFLIGHT_SETS (MAX_INFLIGHT / INFLIGHT_WAYS)
#ifndef MAX_HIST_DEVS
#define MAX_HIST_DEVS 256
#endif
#ifndef MAX_PROCS
#define MAX_PROCS 4096
#endif

/* The in-flight table is the kernel's own: user space never reads it. */
struct rq_key {
    u32 dev;
    u32 op;
    u64 sector;
};

/* One in-flight request. Free when insert_ns == issue_ns == 0. */
struct rq_val {
    u64 sector;
    u32 dev;
    u32 op;
    u64 insert_ns;
    u64 issue_ns;
    u32 tgid;
    u32 bytes;
};

struct rq_set {
    struct rq_val way[INFLIGHT_WAYS];
};

BPF_ARRAY(inflight, struct rq_set, INFLIGHT_SETS);
BPF_F_TABLE("percpu_hash", struct lat_key, struct lat_val, lat, MAX_HIST_DEVS * OP_N, BPF_F_NO_PREALLOC);
BPF_TABLE("lru_percpu_hash", struct proc_key, struct proc_val, procs, MAX_PROCS);
BPF_ARRAY(proc_zero, struct proc_val, 1); /* never written: the initial value of a procs entry */
BPF_PERCPU_ARRAY(totals, u64, TOT_N);
BPF_ARRAY(lat_zero, struct lat_val, 1); /* never written: the initial value of a lat entry (too big for the stack) */

static __always_inline void tot(int i)
{
    u64 *v = totals.lookup(&i);
    if (v)
        (*v)++;
}

/* The set a request lives in: a multiplicative hash of its key. */
static __always_inline struct rq_set *set_of(struct rq_key *k)
{
    u64 x = (k->sector ^ ((u64)k->dev << 40) ^ ((u64)k->op << 60)) * 0x9E3779B97F4A7C15ULL;
    u32 idx = (u32)(x >> 32) & (INFLIGHT_SETS - 1);
    return inflight.lookup(&idx);
}

static __always_inline int busy(struct rq_val *w)
{
    return w->insert_ns || w->issue_ns;
}

static __always_inline int same(struct rq_val *w, struct rq_key *k)
{
    return w->sector == k->sector && w->dev == k->dev && w->op == k->op;
}

/* The way holding request k, or NULL. */
static __always_inline struct rq_val *find(struct rq_set *set, struct rq_key *k)
{
#pragma unroll
    for (int i = 0; i < INFLIGHT_WAYS; i++) {
        struct rq_val *w = &set->way[i];
        if (busy(w) && same(w, k))
            return w;
    }
    return NULL;
}

/* A way for a new request: a free one, else the one seen first (the
 * eviction of an LRU: a request that never completes is pushed out, never
 * leaked; its completion, if it ever comes, counts as unmatched). */
static __always_inline struct rq_val *place(struct rq_set *set)
{
    struct rq_val *victim = &set->way[0];
    u64 oldest = ~0ULL;
#pragma unroll
    for (int i = 0; i < INFLIGHT_WAYS; i++) {
        struct rq_val *w = &set->way[i];
        if (!busy(w))
            return w;
        u64 seen = w->insert_ns ? w->insert_ns : w->issue_ns;
        if (seen < oldest) {
            oldest = seen;
            victim = w;
        }
    }
    return victim;
}

static __always_inline void fill(struct rq_val *w, struct rq_key *k, u64 insert_ns, u64 issue_ns, u32 bytes)
{
    w->sector = k->sector;
    w->dev = k->dev;
    w->op = k->op;
    w->tgid = bpf_get_current_pid_tgid() >> 32;
    w->bytes = bytes;
    w->issue_ns = issue_ns;
    w->insert_ns = insert_ns; /* busy from here on */
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

static __always_inline u32 slot_of(u64 ns)
{
    u32 slot = bpf_log2l(ns);
    return slot > SLOT_MAX ? SLOT_MAX + 1 : slot;
}

#ifdef HAVE_BLOCK_RQ_INSERT
TRACEPOINT_PROBE(block, block_rq_insert)
{
    struct rq_key k = {.dev = args->dev, .op = op_of(args->rwbs), .sector = args->sector};
    struct rq_set *set = set_of(&k);
    if (!set)
        return 0;
    tot(TOT_INSERTED);
    struct rq_val *w = find(set, &k);
    if (w)
        tot(TOT_OVERWRITTEN); /* rare: the key is taken */
    else
        w = place(set);
    fill(w, &k, bpf_ktime_get_ns(), 0, args->bytes);
    return 0;
}
#endif

TRACEPOINT_PROBE(block, block_rq_issue)
{
    struct rq_key k = {.dev = args->dev, .op = op_of(args->rwbs), .sector = args->sector};
    struct rq_set *set = set_of(&k);
    if (!set)
        return 0;
    u64 now = bpf_ktime_get_ns();
    tot(TOT_ISSUED);
    struct rq_val *w = find(set, &k);
    if (w && w->insert_ns && !w->issue_ns) {
        /* seen at insert: keep the submitter, add the issue time */
        w->issue_ns = now;
        return 0;
    }
    if (w)
        tot(TOT_OVERWRITTEN);
    else
        w = place(set);
    fill(w, &k, 0, now, args->bytes);
    return 0;
}

TRACEPOINT_PROBE(block, block_rq_complete)
{
    struct rq_key k = {.dev = args->dev, .op = op_of(args->rwbs), .sector = args->sector};
    struct rq_set *set = set_of(&k);
    struct rq_val *v = set ? find(set, &k) : NULL;
    if (!v || !v->issue_ns) {
        tot(TOT_UNMATCHED);
        return 0;
    }
    u64 now = bpf_ktime_get_ns();
    u64 issue = v->issue_ns, insert = v->insert_ns;
    u64 start = insert ? insert : issue;
    u64 total = now - start;
    u64 bytes = v->bytes;

    struct lat_key lk = {.dev = k.dev, .op = k.op};
    struct lat_val *l = lat.lookup(&lk);
    if (!l) {
        /* first I/O of this (dev, op) on this CPU: the update fills this
         * CPU's value (zeroed slots) and zeroes the other CPUs' */
        int zi = 0;
        struct lat_val *z = lat_zero.lookup(&zi);
        if (z) {
            lat.insert(&lk, z);
            l = lat.lookup(&lk);
        }
    }
    if (l) {
        l->slots[KIND_TOTAL * NSLOTS + slot_of(total)]++;
        l->sum_ns[KIND_TOTAL] += total;
        l->slots[KIND_DEVICE * NSLOTS + slot_of(now - issue)]++;
        l->sum_ns[KIND_DEVICE] += now - issue;
        if (insert) {
            l->slots[KIND_QUEUE * NSLOTS + slot_of(issue - insert)]++;
            l->sum_ns[KIND_QUEUE] += issue - insert;
        }
        l->bytes += bytes;
    }

    struct proc_key pk = {.tgid = v->tgid, .dev = k.dev, .op = k.op};
    struct proc_val *p = procs.lookup(&pk);
    if (!p) {
        int zi = 0;
        struct proc_val *z = proc_zero.lookup(&zi);
        if (z) {
            procs.insert(&pk, z);
            p = procs.lookup(&pk);
        }
    }
    if (p) {
        p->slots[slot_of(total)]++;
        p->sum_ns += total;
        p->bytes += bytes;
    }
    v->insert_ns = 0;
    v->issue_ns = 0; /* free */
    tot(TOT_COMPLETED);
    return 0;
}

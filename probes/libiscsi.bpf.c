/* kvmscope: iSCSI command latency inside QEMU, from uprobes on libiscsi.
 *
 * QEMU's iscsi block driver (block-iscsi module, `<disk type='network'
 * protocol='iscsi'>`) is a user-space initiator: its I/O never reaches the
 * host's block layer, so the block tracepoints cannot see it. libiscsi.so.7
 * exports the calls every command goes through:
 *   iscsi_scsi_command_async(iscsi, lun, task, cb, data, priv)  submission
 *   scsi_free_scsi_task(task)          the task freed: QEMU frees it in its
 *                                      completion path, after its callback
 *                                      woke the request's coroutine
 *   iscsi_task_mgmt_abort_task_async(iscsi, task, ...)  QEMU giving up
 *   iscsi_reconnect(iscsi)             a new login after a lost connection
 *                                      (NOP timeout, TCP reset)
 *   iscsi_set_targetname(iscsi, name), iscsi_full_connect_{sync,async}(
 *   iscsi, portal, lun)                what the context is connected to
 *                                      (only at open: a QEMU started before
 *                                      the probe is attributed by the agent
 *                                      from its domain XML instead)
 * Latency = submission -> free, per (process, context, LUN, op); the op
 * comes from the CDB's opcode (TASK_CDB_OFFSET in libiscsi.h).
 *
 * Cost: a uprobe is a breakpoint trap per call (~1-3 us here, far more
 * than a tracepoint); two per command. See docs/performance.md.
 *
 * Maps:
 *   inflight  lru_hash          (tgid, task) -> start, ctx, lun, op; a task
 *                               never freed is pushed out, never leaked
 *   lat       lru_percpu_hash   (ctx, tgid, lun, op) -> log2 slots, sum_ns
 *                               (per CPU: no atomics; QEMU's threads run on
 *                               any CPU; Python sums the CPUs)
 *   ctxs      lru_hash          (ctx, tgid) -> aborts, reconnects (atomic),
 *                               target, portal, lun
 *   totals    percpu_array      TOT_* (libiscsi.h)
 *
 * Defines: SLOT_MAX, MAX_INFLIGHT, MAX_LUNS, MAX_CTXS.
 */
#include <uapi/linux/ptrace.h>
#include "common.h"
#include "libiscsi.h"

#ifndef MAX_INFLIGHT
#define MAX_INFLIGHT 16384
#endif
#ifndef MAX_LUNS
#define MAX_LUNS 4096
#endif
#ifndef MAX_CTXS
#define MAX_CTXS 1024
#endif

BPF_TABLE("lru_hash", struct task_key, struct task_val, inflight, MAX_INFLIGHT);
BPF_TABLE("lru_percpu_hash", struct lun_key, struct lun_val, lat, MAX_LUNS);
BPF_TABLE("lru_hash", struct ctx_key, struct ctx_val, ctxs, MAX_CTXS);
BPF_PERCPU_ARRAY(totals, u64, TOT_N);
BPF_ARRAY(lat_zero, struct lun_val, 1); /* never written: the initial value of a lat entry */
BPF_ARRAY(ctx_zero, struct ctx_val, 1); /* never written: the initial value of a ctxs entry */

static __always_inline void tot(int i)
{
    u64 *v = totals.lookup(&i);
    if (v)
        (*v)++;
}

/* SCSI opcodes (SBC-4) -> op */
static __always_inline u32 op_of_cdb(u8 c)
{
    switch (c) {
    case 0x08: case 0x28: case 0xa8: case 0x88: /* READ(6/10/12/16) */
        return IOP_READ;
    case 0x0a: case 0x2a: case 0xaa: case 0x8a: /* WRITE(6/10/12/16) */
    case 0x2e: case 0xae: case 0x8e:             /* WRITE AND VERIFY */
    case 0x41: case 0x93: case 0x89:             /* WRITE SAME(10/16), COMPARE AND WRITE */
        return IOP_WRITE;
    case 0x35: case 0x91: /* SYNCHRONIZE CACHE(10/16) */
        return IOP_FLUSH;
    case 0x42: /* UNMAP */
        return IOP_DISCARD;
    }
    return IOP_OTHER;
}

/* at most SLOT_MAX + 1; checked in 64 bits, see slot_of in block_io.bpf.c */
static __always_inline u64 slot_of(u64 ns)
{
    u64 slot = bpf_log2l(ns);
    if (slot > SLOT_MAX)
        slot = SLOT_MAX + 1;
    return slot;
}

/* the context's entry, created zeroed (lun -1) when missing */
static __always_inline struct ctx_val *ctx_entry(u64 iscsi)
{
    struct ctx_key k = {.ctx = iscsi, .tgid = bpf_get_current_pid_tgid() >> 32};
    struct ctx_val *v = ctxs.lookup(&k);
    if (v)
        return v;
    int zi = 0;
    struct ctx_val *z = ctx_zero.lookup(&zi);
    if (!z)
        return NULL;
    ctxs.insert(&k, z);
    v = ctxs.lookup(&k);
    if (v)
        v->lun = -1;
    return v;
}

int on_command(struct pt_regs *ctx)
{
    u64 task = PT_REGS_PARM3(ctx);
    u8 opcode = 0;
    bpf_probe_read_user(&opcode, 1, (void *)(task + TASK_CDB_OFFSET));
    struct task_key k = {.task = task, .tgid = bpf_get_current_pid_tgid() >> 32};
    struct task_val v = {.start_ns = bpf_ktime_get_ns(), .ctx = PT_REGS_PARM1(ctx),
                         .lun = (u32)PT_REGS_PARM2(ctx), .op = op_of_cdb(opcode)};
    inflight.update(&k, &v);
    tot(TOT_SUBMITTED);
    return 0;
}

int on_free(struct pt_regs *ctx)
{
    if (!PT_REGS_PARM1(ctx))
        return 0; /* scsi_free_scsi_task(NULL): the agent's own calibration of the trap's cost */
    struct task_key k = {.task = PT_REGS_PARM1(ctx), .tgid = bpf_get_current_pid_tgid() >> 32};
    struct task_val *t = inflight.lookup(&k);
    if (!t) {
        tot(TOT_UNTIMED);
        return 0;
    }
    u64 ns = bpf_ktime_get_ns() - t->start_ns;
    struct lun_key lk = {.ctx = t->ctx, .tgid = k.tgid, .lun = t->lun, .op = t->op};
    inflight.delete(&k);
    struct lun_val *l = lat.lookup(&lk);
    if (!l) {
        int zi = 0;
        struct lun_val *z = lat_zero.lookup(&zi);
        if (z) {
            lat.insert(&lk, z);
            l = lat.lookup(&lk);
        }
    }
    if (l) {
        l->slots[slot_of(ns)]++;
        l->sum_ns += ns;
    }
    tot(TOT_COMPLETED);
    return 0;
}

int on_abort(struct pt_regs *ctx)
{
    struct ctx_val *v = ctx_entry(PT_REGS_PARM1(ctx));
    if (v)
        __sync_fetch_and_add(&v->aborts, 1);
    tot(TOT_ABORTS);
    return 0;
}

int on_reconnect(struct pt_regs *ctx)
{
    struct ctx_val *v = ctx_entry(PT_REGS_PARM1(ctx));
    if (v)
        __sync_fetch_and_add(&v->reconnects, 1);
    tot(TOT_RECONNECTS);
    return 0;
}

int on_targetname(struct pt_regs *ctx)
{
    struct ctx_val *v = ctx_entry(PT_REGS_PARM1(ctx));
    if (v)
        bpf_probe_read_user_str(v->target, sizeof(v->target), (void *)PT_REGS_PARM2(ctx));
    return 0;
}

int on_full_connect(struct pt_regs *ctx)
{
    struct ctx_val *v = ctx_entry(PT_REGS_PARM1(ctx));
    if (v) {
        bpf_probe_read_user_str(v->portal, sizeof(v->portal), (void *)PT_REGS_PARM2(ctx));
        v->lun = (s32)PT_REGS_PARM3(ctx);
    }
    return 0;
}

/* Layouts and constants of probes/libiscsi.bpf.c that user space reads
 * (map keys and values, totals indexes, ops, slots).
 *
 * Mirrored by ctypes in agent/ebpf/libiscsi.py; tests/unit/
 * test_probe_layouts.py compiles this file with cc (with the -DSLOT_MAX
 * the loader passes) and compares every field's name, offset and size and
 * every constant. Needs common.h first.
 */
#ifndef KVMSCOPE_LIBISCSI_H
#define KVMSCOPE_LIBISCSI_H

#ifndef SLOT_MAX
#define SLOT_MAX 36 /* 2^36 ns = 68.7 s */
#endif
#define NSLOTS (SLOT_MAX + 2)

/* Where libiscsi keeps the CDB in its public struct scsi_task
 * (include/scsi-lowlevel.h: int status, cdb_size, xfer_dir, expxferlen,
 * then unsigned char cdb[16]); the same in every libiscsi.so.7 (1.x ABI).
 * Seen in the library's own scsi_cdb_* constructors, which store the
 * opcode at byte 0x10 of the task they allocate. */
#define TASK_CDB_OFFSET 16
#define TARGET_LEN 224 /* iSCSI names are at most 223 bytes (RFC 7143 4.2.7.1) */
#define PORTAL_LEN 64

/* in order: BLOCK_OPS (agent/ebpf/decode.py), from the CDB's opcode */
enum iscsi_op { IOP_READ = 0, IOP_WRITE = 1, IOP_FLUSH = 2, IOP_DISCARD = 3, IOP_OTHER = 4, IOP_N = 5 };

/* totals indexes */
#define TOT_SUBMITTED 0   /* iscsi_scsi_command_async calls */
#define TOT_COMPLETED 1   /* tasks freed after a submission was seen (timed) */
#define TOT_UNTIMED 2     /* tasks freed whose submission was not seen (before attach, or evicted) */
#define TOT_ABORTS 3      /* iscsi_task_mgmt_abort_task_async calls */
#define TOT_RECONNECTS 4  /* iscsi_reconnect calls */
#define TOT_N 5

/* one QEMU process's commands to one LUN through one iSCSI context */
struct lun_key {
    u64 ctx; /* struct iscsi_context * in the process */
    u32 tgid;
    u32 lun;
    u32 op;
    u32 pad;
};

struct lun_val {
    u64 slots[NSLOTS]; /* log2 ns: slot s = [2^(s-1), 2^s) */
    u64 sum_ns;
};

/* a submitted task, until scsi_free_scsi_task */
struct task_key {
    u64 task; /* struct scsi_task * */
    u32 tgid;
    u32 pad;
};

struct task_val {
    u64 start_ns;
    u64 ctx;
    u32 lun;
    u32 op;
};

/* one iSCSI context of one process: what it connects to and its events */
struct ctx_key {
    u64 ctx;
    u32 tgid;
    u32 pad;
};

struct ctx_val {
    u64 aborts;
    u64 reconnects;
    s32 lun; /* -1: no iscsi_full_connect_* seen */
    u32 pad;
    char target[TARGET_LEN];
    char portal[PORTAL_LEN];
};

#endif

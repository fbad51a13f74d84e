"""What the lab's VMs boot: Debian's kernel (/boot/vmlinuz-*, preferring 6.1,
with /lib/modules/<ver>) and a busybox-static initramfs built on the fly
(cpio newc + gzip, in Python). Its /init (template deploy/lab/guest-init.sh)
insmods the virtio modules in dependency order (found with `modinfo -k VER`;
.ko.xz/.gz/.zst decompressed here) and keeps an O_DIRECT dd load on every
disk. A kernel-initiator host kind would reuse pick_guest_kernel(),
ordered_modules() and Cpio with its own module list and /init."""

import glob
import gzip
import io
import lzma
import os
import stat

from .common import HERE, LabError, run, run_bytes

GUEST_MODULES = ["virtio_ring", "virtio", "virtio_pci_modern_dev",
                 "virtio_pci_legacy_dev", "virtio_pci", "virtio_blk"]


def pick_guest_kernel():
    cands = []
    for path in glob.glob("/boot/vmlinuz-*"):
        ver = os.path.basename(path)[len("vmlinuz-"):]
        if os.path.isdir(f"/lib/modules/{ver}"):
            cands.append((ver.startswith("6.1."), ver, path))
    if not cands:
        raise LabError("no guest kernel: need /boot/vmlinuz-<ver> with "
                       "/lib/modules/<ver> (Debian linux-image-amd64)")
    cands.sort()
    _, ver, path = cands[-1]
    return ver, path


def module_file(ver, mod):
    p = run(["modinfo", "-k", ver, "-n", mod], check=False)
    path = (p.stdout or "").strip()
    if p.returncode != 0 or not path or not os.path.exists(path):
        raise LabError(f"kernel module {mod} not found for {ver}: "
                       f"{(p.stderr or '').strip()}")
    return path


def module_deps(ver, mod):
    p = run(["modinfo", "-k", ver, "-F", "depends", mod], check=False)
    return [d for d in (p.stdout or "").strip().split(",") if d]


def read_module(path):
    with open(path, "rb") as f:
        data = f.read()
    if path.endswith(".xz"):
        return lzma.decompress(data)
    if path.endswith(".gz"):
        return gzip.decompress(data)
    if path.endswith(".zst"):
        return run_bytes(["zstd", "-d", "-c", path])
    return data


def ordered_modules(ver, wanted=GUEST_MODULES, deps=module_deps):
    """wanted modules with their dependencies first, each once."""
    order = []

    def add(m):
        m = m.replace("-", "_")
        if m in order:
            return
        for d in deps(ver, m):
            add(d)
        order.append(m)

    for m in wanted:
        add(m)
    return order


class Cpio:
    """Minimal cpio 'newc' writer."""

    def __init__(self):
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(self, name, mode, data=b"", rdev=(0, 0), nlink=1):
        nameb = name.encode() + b"\0"
        hdr = "070701" + "".join(f"{v:08X}" for v in (
            self.ino, mode, 0, 0, nlink, 0, len(data), 0, 0,
            rdev[0], rdev[1], len(nameb), 0))
        self.ino += 1
        self.buf.write(hdr.encode() + nameb)
        self.buf.write(b"\0" * ((4 - (110 + len(nameb)) % 4) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * ((4 - len(data) % 4) % 4))

    def dir(self, name):
        self._entry(name, stat.S_IFDIR | 0o755, nlink=2)

    def file(self, name, data, mode=0o644):
        self._entry(name, stat.S_IFREG | mode, data)

    def chardev(self, name, major, minor):
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def finish(self):
        self._entry("TRAILER!!!", 0, nlink=1)
        return self.buf.getvalue()


def build_initramfs(ver, out_path):
    busybox = "/bin/busybox"
    with open(busybox, "rb") as f:
        bb = f.read()
    if b"ld-linux" in bb[:4096] or b"/lib64/ld-" in bb[:8192]:
        raise LabError(f"{busybox} is dynamically linked; install busybox-static")
    mods = ordered_modules(ver)
    with open(os.path.join(HERE, "guest-init.sh")) as f:
        init = f.read().replace("@MODULES@", " ".join(mods))
    c = Cpio()
    for d in ("bin", "dev", "proc", "sys", "tmp", "lib", "lib/modules"):
        c.dir(d)
    c.chardev("dev/console", 5, 1)
    c.chardev("dev/null", 1, 3)
    c.file("bin/busybox", bb, 0o755)
    c.file("init", init.encode(), 0o755)
    for m in mods:
        c.file(f"lib/modules/{m}.ko", read_module(module_file(ver, m)))
    data = gzip.compress(c.finish(), compresslevel=6)
    tmp = out_path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, out_path)
    return mods
